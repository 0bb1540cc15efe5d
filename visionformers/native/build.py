"""Optional native kernels: C sources in ``csrc/``, compiled on first use and cached per machine.

A kernel is a plain C file built with the system compiler (``$CC``, else ``cc``) and OpenMP into a shared
library, loaded with ``ctypes``. It runs inside PyTorch's own OpenMP runtime (Linux wheels ship
``libgomp.so.1``, which the library resolves to), so it shares PyTorch's threads. Where anything is
missing (not Linux, no compiler, an unusable cache, a failed build) ``load`` returns None and callers use
their PyTorch path: native code only ever makes things faster, never required.

The cache is trusted only as far as it can be:

- A build is keyed by the source (with the shared headers), the compiler (its path, size and date), the flags
  and the CPU (``-march=native`` code must not run on another CPU of a shared home directory). It is written to
  a temporary file and renamed into place, under a lock (``<library>.lock``), so processes that start together
  (``accelerate launch``) build it once and never load a half-written library, and the SHA-256 of its bytes is recorded beside it (``<library>.sha256``, written
  atomically). A library is loaded only if its bytes still hash to that record (a truncated library would kill
  the process with SIGBUS), it is a regular file of this user that no one else may write, and its directory and
  every directory above it are writable by no one else (or sticky, as ``/tmp``). A mismatched library is rebuilt.
- The cache directory is created ``0700``.
- A failed compilation leaves a marker (``<library>.failed``, holding the compiler's message) keyed like the
  build, so later processes do not retry it; a changed source, compiler or flag set has a new key. Delete the
  marker to retry after fixing the toolchain.
- Temporary files of builds killed midway are removed: at once where their process is gone, after
  ``STALE_SECONDS`` otherwise (a build on another machine sharing the cache).

No compiler or a non-Linux system means plain PyTorch, silently; an unusable cache, a failed build or a
mismatched library gives one warning per process at most. Nothing here times code to choose what runs.

Environment (``visionformers._env``): ``VISIONFORMERS_NATIVE`` switches kernels on or off;
``VISIONFORMERS_CACHE`` sets the cache directory (default ``$XDG_CACHE_HOME/visionformers``, else
``~/.cache/visionformers``); ``$CC`` names the compiler.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from visionformers import _env

__all__ = ["enabled", "cache_dir", "library_dir", "load", "Kernel", "STALE_SECONDS"]

_log = logging.getLogger(__name__)
_SOURCES = Path(__file__).parent / "csrc"
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the second where the compiler does not know -march=native
_COMMON_FLAGS = ["-std=c99", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]  # fp-contract: fused multiply-adds
_COMPILE_TIMEOUT_S = 120
STALE_SECONDS = 600  # a temporary file this old is no build in progress (compilations stop after 120 s)
_TEMP = re.compile(r"\.build-(\d+)-([0-9a-f]{8})-.*\.so")  # .build-<pid>-<host>-<random>.so
_lock = threading.RLock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_tidied: set[Path] = set()  # library directories whose stale temporaries this process has removed
_warned = False
_UNSET = object()


def enabled() -> bool:
    """Whether native kernels may be used here: Linux, PyTorch built with OpenMP, not switched off
    (``VISIONFORMERS_NATIVE``; a bad value raises ValueError)."""
    return _env.native() and sys.platform.startswith("linux") and torch.backends.openmp.is_available()


def cache_dir() -> Path:
    """``$VISIONFORMERS_CACHE``, else ``$XDG_CACHE_HOME/visionformers``, else ``~/.cache/visionformers``."""
    chosen = _env.cache()
    if chosen is not None:
        return chosen
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "visionformers"


def _warn_once(message: str) -> None:
    """One warning per process: the kernels are an optional speed-up, so the first reason they are off is enough."""
    global _warned
    _log.debug(message)
    if not _warned:
        _warned = True
        warnings.warn(f"visionformers native kernels: {message}; using PyTorch ops", RuntimeWarning, stacklevel=3)


def _unsafe_reason(directory: Path) -> str | None:
    """Why libraries in ``directory`` could have been written by another user, or None: the directory must belong
    to this user and be writable by no one else; each directory above it must belong to this user or root and be
    writable by no one else unless sticky (as ``/tmp``, where others cannot rename what is ours)."""
    me = os.geteuid()
    resolved = directory.resolve()  # the directories above a symbolic link on the way count too
    for level, path in enumerate([resolved, *resolved.parents, *Path(os.path.abspath(directory)).parents]):
        st = os.stat(path)
        others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if level == 0 and (st.st_uid != me or others_write):
            return f"{path} must belong to uid {me} and be writable by no one else (it is uid {st.st_uid}, " \
                   f"mode {stat.filemode(st.st_mode)})"
        if level and (st.st_uid not in (me, 0) or (others_write and not st.st_mode & stat.S_ISVTX)):
            return f"{path}, above the cache, is writable by others (uid {st.st_uid}, mode {stat.filemode(st.st_mode)})"
    return None


def library_dir() -> Path | None:
    """The directory of built libraries (``cache_dir()/native``), created ``0700``; None, with one warning, where
    it cannot be created or another user could write to it. Stale temporaries of killed builds are removed once
    per process."""
    out = cache_dir() / "native"
    try:
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        out.mkdir(mode=0o700, exist_ok=True)
        reason = _unsafe_reason(out)
    except OSError as err:
        _warn_once(f"cache {out} is not usable ({err})")
        return None
    if reason is not None:
        _warn_once(f"not loading libraries from {out}: {reason}")
        return None
    if out not in _tidied:
        _tidied.add(out)
        _remove_stale_temporaries(out)
    return out


def _host_tag() -> str:
    return hashlib.sha256(platform.node().encode()).hexdigest()[:8]


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete what killed builds left: ``.build-<pid>-<host>-*.so`` of a process of this machine that is gone, and
    any temporary (also the ``tmp*.so`` of older releases and half-written records) older than ``STALE_SECONDS``.
    A build in progress keeps its files: its process is alive and its files are young."""
    host, now = _host_tag(), time.time()
    for path in directory.iterdir():
        name = path.name
        ours = _TEMP.fullmatch(name)
        older = name.startswith("tmp") and name.endswith(".so")  # an older release's temporary library
        temporary = ours or older or (name.startswith(".") and name.endswith(".tmp"))  # (or a record's)
        if not temporary:
            continue
        try:
            gone = ours and ours[2] == host and _process_gone(int(ours[1]))
            if gone or now - path.lstat().st_mtime > STALE_SECONDS:
                path.unlink()
        except OSError:  # removed by another process meanwhile, or not ours to remove
            continue


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` (split as a shell would, e.g. ``ccache gcc``), else ``cc``, else ``gcc``."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return None if found is None else [found]


def _compiler_identity(command: list[str]) -> bytes:
    """The compiler's command with the path, size and date of its executable: an upgraded compiler is a new key."""
    parts = [" ".join(command)]
    exe = shutil.which(command[-1]) if command else None
    if exe is not None:
        st = os.stat(exe)
        parts.append(f"{os.path.realpath(exe)} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(parts).encode()


def _cpu_identity() -> str:
    """Model name and feature flags of this CPU (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def _record(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _marker(library: Path) -> Path:
    return library.with_name(library.name[: -len(".so")] + ".failed")


def _digest(path: Path) -> str | None:
    """The SHA-256 of ``path``'s bytes if it is a regular file of this user that no one else may write, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        return hashlib.sha256(f.read()).hexdigest()


def _verified(library: Path) -> bool:
    """Whether ``library`` is safe to load: its bytes hash to the digest recorded when it was built."""
    try:
        recorded = _record(library).read_text().strip()
    except OSError:
        return False
    return _digest(library) == recorded


@contextlib.contextmanager
def _exclusive(library: Path) -> Iterator[None]:
    """Hold ``<library>.lock`` (an advisory ``flock``, released if the process dies) while checking and building."""
    fd = os.open(library.with_name(library.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _compile(name: str, source: Path, command: list[str], flags: list[str], target: Path) -> bool:
    """Compile ``source`` into ``target`` through a temporary file; record its digest. False where it failed (a
    compiler error leaves the marker)."""
    from visionformers._io import atomic_write_bytes

    fd, tmp = tempfile.mkstemp(prefix=f".build-{os.getpid()}-{_host_tag()}-", suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [*command, *flags, *_COMMON_FLAGS, str(source), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            message = f"$ {shlex.join(cmd)}\n{done.stderr[-4000:]}"
            atomic_write_bytes(_marker(target), message.encode())
            _log.debug("native kernel %s: compilation failed:\n%s", name, message)
            return False
        os.chmod(tmp, 0o700)  # whatever the umask: writable by this user only, as loading requires
        digest = _digest(Path(tmp))
        if digest is None:
            return False
        atomic_write_bytes(_record(target), digest.encode())
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.TimeoutExpired) as err:  # no such compiler, a full disk, a hung compiler
        _log.debug("native kernel %s: `%s` failed: %s", name, shlex.join(cmd), err)
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


def _build(name: str, source: Path, command: list[str]) -> Path | None:
    """The verified library built from ``source``, built (or rebuilt) here if needed; None where no flag set
    compiles, where a compilation failed before (its marker), or where the cache is unusable."""
    out_dir = library_dir()
    if out_dir is None:
        return None
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # + shared headers
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([text, _compiler_identity(command), " ".join(flags).encode(),
                                         _cpu_identity().encode()]))
        target = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
        with _exclusive(target):  # processes started together build once and wait for it
            if _verified(target):
                return target
            if target.exists() and _record(target).exists():  # else a build that never finished: rebuilt quietly
                _warn_once(f"{target} does not match the SHA-256 recorded when it was built; rebuilding it")
            elif _marker(target).exists():
                continue  # failed before with these flags: not retried by every process
            if _compile(name, source, command, flags, target):
                return target if _verified(target) else None
            if not _marker(target).exists():  # no compiler error (an OSError, a timeout): no other flags will help
                _warn_once(f"building {name} did not finish")
                return None
    _warn_once(f"{name} does not compile here (see {_marker(target)})")
    return None


def load(name: str, symbols: Sequence[str] = ()) -> ctypes.CDLL | None:
    """The library built from ``csrc/<name>.c``, or None where native kernels are unavailable or it lacks one of
    ``symbols``. Built once per machine and source; the answer is remembered for the process. A bad
    ``VISIONFORMERS_NATIVE`` or ``VISIONFORMERS_CACHE`` raises ValueError naming it."""
    if not enabled():
        return None
    with _lock:
        if name in _loaded:
            return _loaded[name]
        cache_dir()  # a bad VISIONFORMERS_CACHE is the user's error to see, not a missing kernel
        lib = None
        command = _compiler()
        if command is None:
            _log.debug("native kernel %s: no C compiler found (set $CC)", name)
        else:
            try:
                path = _build(name, _SOURCES / f"{name}.c", command)
            except OSError as err:  # a read-only cache, a full disk
                path = None
                _warn_once(f"cannot build {name} in {cache_dir()} ({err})")
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError as err:
                    _warn_once(f"{path} does not load ({err})")
            missing = [s for s in symbols if lib is not None and not hasattr(lib, s)]
            if missing:
                _warn_once(f"{path} lacks {', '.join(missing)}")
                lib = None
        _loaded[name] = lib
        return lib


class Kernel:
    """One native library for one Python module: built and loaded on first use, its functions' signatures set by
    ``configure(lib)``, and kept only if ``self_check(lib)`` (the kernel against PyTorch ops) passes. A library
    missing a function that ``configure`` or ``self_check`` looks up is not kept either.

    ``get()`` returns the library or None (then the caller runs PyTorch ops); the answer is remembered.
    """

    def __init__(self, name: str, configure: Callable[[ctypes.CDLL], None], self_check: Callable[[ctypes.CDLL], bool]):
        self.name, self._configure, self._self_check = name, configure, self_check
        self._lib: ctypes.CDLL | None | object = _UNSET

    def get(self) -> ctypes.CDLL | None:
        if self._lib is _UNSET:
            lib = load(self.name)
            if lib is not None:
                try:
                    self._configure(lib)
                    # the check may run inside a checkpointed forward: its own saved-tensor hooks keep what it
                    # saves out of what activation checkpointing records (which must match the recomputation)
                    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                        checked = self._self_check(lib)
                except AttributeError as err:  # a function missing from the library
                    _warn_once(f"{self.name} is incomplete ({err})")
                    checked = False
                else:
                    if not checked:
                        _warn_once(f"{self.name} disagrees with PyTorch in its self-check")
                lib = lib if checked else None
            self._lib = lib
        return self._lib

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside, ``get()`` is None: PyTorch ops only (comparisons, debugging; process-wide, not per thread)."""
        saved = self.get()
        self._lib = None
        try:
            yield
        finally:
            self._lib = saved
