"""One run per output directory: a lock file holding the PID and host of the run that uses it.

``<output_dir>/.lock`` is created atomically (written under a temporary name, then hard-linked into place, which
fails when the name exists), so two runs starting together cannot both get it. A lock whose process is gone (same
host, PID no longer running) is stale, left by a killed run, and is taken over; a lock of another host cannot be
checked from here and is refused with the command to remove it. The lock is released when the run ends (also on an
exception, and at interpreter exit).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
_HELD: dict[str, "OutputDirLock"] = {}  # lock files held by this process, by path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that PID
        return True
    return True


def check_writable(output_dir: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Create ``output_dir`` and write, fsync and remove a probe file in it, so that a read-only or full
    filesystem is found before training rather than at the first save. Errors name ``flag``."""
    path = Path(output_dir)
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag}={str(output_dir)!r} is not writable ({e.strerror or e}); choose a writable "
                         "directory") from None
    return path


class OutputDirLock:
    """The lock of one output directory; :meth:`acquire` refuses a directory another live run holds."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def owner(self) -> dict | None:
        """The lock file's {"pid", "host", "time"}, {} when unreadable, None when there is no lock file."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def is_stale(self, owner: dict) -> bool:
        """A lock of this host whose process has ended, or of this very process (a run that raised and is
        followed by another in the same interpreter: one process trains one run at a time)."""
        pid, host = owner.get("pid"), owner.get("host")
        if host != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool):
            return False
        return pid == os.getpid() or not _alive(pid)

    def acquire(self) -> OutputDirLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = self.path.with_name(f".lock-{os.getpid()}.tmp")
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic, and fails when a lock exists
                    break
                except FileExistsError:
                    owner = self.owner()
                    if owner is None:
                        continue  # released meanwhile
                    if not owner or not self.is_stale(owner):
                        who = (f"process {owner.get('pid')} on {owner.get('host')} since {owner.get('time')}"
                               if owner else "an unreadable lock file")
                        raise ValueError(
                            f"--output_dir={str(self.path.parent)!r} is in use by another run ({who}); wait for it, "
                            f"choose another --output_dir, or remove {str(self.path)!r} if that run is gone")
                    # stale: move it aside under a unique name (only one starter wins), then retry the link
                    try:
                        os.replace(self.path, self.path.with_name(f".lock-stale-{os.getpid()}.tmp"))
                    except FileNotFoundError:
                        pass
                    self.path.with_name(f".lock-stale-{os.getpid()}.tmp").unlink(missing_ok=True)
            else:
                raise ValueError(f"could not lock --output_dir={str(self.path.parent)!r}: the lock keeps changing")
        finally:
            tmp.unlink(missing_ok=True)
        self.held = True
        _HELD[str(self.path)] = self
        return self

    def release(self) -> None:
        if not self.held:
            return
        owner = self.owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False
        _HELD.pop(str(self.path), None)


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


__all__ = ["LOCK_NAME", "OutputDirLock", "check_writable"]
