"""Finding, checking and cleaning the checkpoints of an output directory (written by
:mod:`visionformers.training.checkpoint`): ``checkpoint-<step>`` directories, their ``state.json`` (validated), sizes
and SHA-256 checksums, ``latest`` resolution, pruning, and the leftovers (``.tmp-``, ``.trash-``, ``.prev-``) of a
killed run."""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from visionformers._io import sha256_file
from visionformers._validate import fail, is_int
from visionformers.hub import read_json

logger = logging.getLogger("visionformers.training.checkpoint")

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
PREV_PREFIX = ".prev-"  # the last complete copy of a directory while its replacement is renamed into place
STATE_NAME = "state.json"
FORMAT_VERSION = 2  # 2: each file's size and SHA-256; 1 (still read): sizes only
MAX_STEP = 2**53  # a step count JSON, Python and every tracker hold exactly
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step in a ``checkpoint-<step>`` name, else None (temporary and trashed directories give None)."""
    m = _NAME_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def validate_state(state, source: str) -> dict:
    """Check the values of a parsed ``state.json`` (types, ranges, required keys); errors name ``source``."""
    def bad(what: str):
        raise ValueError(f"{source}: {what}; was it written by save_checkpoint?")

    if not isinstance(state, dict):
        bad(f"expected a JSON object, got {type(state).__name__}")
    missing = [k for k in ("step", "files") if k not in state]
    if missing:
        bad(f"required key(s) {missing} are missing")
    version = state.get("format_version", 1)
    if not is_int(version) or not 1 <= version <= FORMAT_VERSION:
        bad(f"format_version={version!r} is not readable here (accepted: 1..{FORMAT_VERSION})")
    if not is_int(state["step"]) or not 0 <= state["step"] <= MAX_STEP:
        bad(f"step={state['step']!r} is not an int in [0, {MAX_STEP}]")
    if not is_int(state.get("world_size", 1)) or state.get("world_size", 1) < 1:
        bad(f"world_size={state.get('world_size')!r} is not an int >= 1")
    for key in ("train_state", "config"):
        if not isinstance(state.get(key, {}), dict):
            bad(f"{key!r} is a {type(state[key]).__name__}, not a JSON object")
    inner = state.get("train_state", {}).get("step", state["step"])
    if inner != state["step"]:
        bad(f"train_state step={inner!r} differs from step={state['step']!r}")
    files = state["files"]
    if not isinstance(files, dict) or not files:
        bad(f"'files' is a {type(files).__name__}, not a non-empty object of file name -> size and checksum")
    for name, entry in files.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name.startswith(TMP_PREFIX):
            bad(f"file name {name!r} leaves the checkpoint directory")
        size, digest = (entry, None) if version == 1 else (
            (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None))
        if not is_int(size) or size < 0 or (version > 1 and not (isinstance(digest, str) and _HEX64.match(digest))):
            bad(f"entry {name!r}: {entry!r} is not " + ("a size" if version == 1 else "{'size': int, 'sha256': hex}"))
    return state


def read_state(path: str | os.PathLike) -> dict:
    """Parse and validate ``state.json`` of a checkpoint; errors name the file."""
    file = Path(path) / STATE_NAME
    if not file.is_file() or file.is_symlink():
        raise FileNotFoundError(f"{str(file)!r} is missing: {str(path)!r} is not a complete checkpoint")
    return validate_state(read_json(file, "checkpoint state"), repr(str(file)))


def _file_entries(state: dict) -> dict[str, tuple[int, str | None]]:
    """{name: (size, sha256 or None)} of a validated state (format 1 recorded sizes only)."""
    if state.get("format_version", 1) == 1:
        return {name: (size, None) for name, size in state["files"].items()}
    return {name: (e["size"], e["sha256"]) for name, e in state["files"].items()}


def checkpoint_problem(path: str | os.PathLike, verify: bool = False) -> str | None:
    """What makes ``path`` unusable as a checkpoint, or None: ``state.json`` missing or invalid, its step not the
    directory's, a link inside it, a listed file missing or of the wrong size, and with ``verify`` a file whose
    SHA-256 differs from the one recorded."""
    path = Path(path)
    try:
        state = read_state(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        return str(e).splitlines()[0]
    named = checkpoint_step(path)
    if named is not None and named != state["step"]:
        return f"its state.json says step {state['step']}, its name step {named}"
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                rel = os.path.relpath(os.path.join(dirpath, name), path)
                return f"{rel!r} is a symbolic link; checkpoints hold plain files only"
    for name, (size, digest) in _file_entries(state).items():
        f = path / name
        if not f.is_file():
            return f"{name!r} is missing"
        if f.stat().st_size != size:
            return f"{name!r} has {f.stat().st_size} bytes, {size} recorded"
        if verify and digest is not None and sha256_file(f) != digest:
            return f"{name!r} does not match its recorded SHA-256 (the file was altered or damaged)"
    return None


def is_complete(path: str | os.PathLike, verify: bool = False) -> bool:
    """True when ``state.json`` is valid and every file it lists exists with the recorded size (and, with
    ``verify``, the recorded SHA-256)."""
    return checkpoint_problem(path, verify) is None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-<step>`` directories of ``output_dir``, oldest first."""
    return [p for p in reversed(candidates(Path(output_dir))) if is_complete(p)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step; incomplete and temporary directories are ignored."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def candidates(output_dir: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` directory of ``output_dir``, newest first, complete or not."""
    if not output_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in output_dir.iterdir() if p.is_dir()]
    return [p for step, p in sorted(((s, p) for s, p in found if s is not None), reverse=True)]


def resolve_checkpoint(output_dir: str | os.PathLike, spec: str | None) -> Path | None:
    """``--resume_from_checkpoint`` -> a checkpoint directory, or None to start fresh.

    ``"latest"``: the newest checkpoint of ``output_dir`` whose files match their recorded sizes and checksums;
    damaged or incomplete ones are skipped with a warning naming them. None (a new run) only when there is no
    checkpoint at all: when every one is damaged this refuses, naming them, rather than overwrite them.
    Otherwise a path, or a name inside ``output_dir``, that must be a verified checkpoint.
    """
    if spec is None or spec == "":
        return None
    if spec == "latest":
        skipped = []
        for path in candidates(Path(output_dir)):
            problem = checkpoint_problem(path, verify=True)
            if problem is None:
                if skipped:
                    logger.warning("skipped damaged or incomplete checkpoint(s): %s; resuming from %s",
                                   "; ".join(skipped), path.name)
                return path
            skipped.append(f"{path.name} ({problem})")
        if skipped:
            raise ValueError(f"--resume_from_checkpoint latest: {str(output_dir)!r} holds no usable checkpoint, only "
                             f"damaged or incomplete ones: {'; '.join(skipped)}; repair or move them away (starting "
                             "over would overwrite them)")
        logger.info("no checkpoint in %s; starting a new run", output_dir)
        return None
    path = Path(spec)
    if not path.exists() and (Path(output_dir) / spec).exists():
        path = Path(output_dir) / spec
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={spec!r} is not a directory (nor a name in "
                                f"{str(output_dir)!r}); pass 'latest' or a checkpoint-<step> directory")
    problem = checkpoint_problem(path, verify=True)
    if problem is not None:
        raise ValueError(f"resume_from_checkpoint={spec!r} is not a usable checkpoint: {problem}; pass 'latest' to "
                         "pick the newest usable one")
    return path


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None,
                      keep: tuple[str | os.PathLike | None, ...] = ()) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; never the newest one, nor any in ``keep``
    (the checkpoint a run resumed from). Returns the removed paths."""
    if total_limit is None:
        return []
    if isinstance(total_limit, bool) or not isinstance(total_limit, int) or total_limit < 1:
        fail("total_limit", total_limit, "None or an int >= 1")
    found = list_checkpoints(output_dir)
    protected = {Path(k).resolve() for k in keep if k is not None}
    if found:
        protected.add(found[-1].resolve())
    removable = [p for p in found if p.resolve() not in protected]
    excess = len(found) - total_limit
    removed = []
    for p in removable[:max(0, excess)]:
        trash = p.with_name(f"{TRASH_PREFIX}{p.name}")
        os.replace(p, trash)  # atomic: from here on `latest` no longer sees it
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(p)
    return removed


def recover_interrupted(output_dir: str | os.PathLike) -> list[Path]:
    """Put back a ``.prev-<name>`` copy whose replacement never reached its place (a kill between the two renames
    of :func:`_publish`); drop it when the replacement is there. Returns the restored paths."""
    output_dir, restored = Path(output_dir), []
    if not output_dir.is_dir():
        return restored
    for prev in sorted(output_dir.iterdir()):
        if not prev.name.startswith(PREV_PREFIX) or not prev.is_dir():
            continue
        final = output_dir / prev.name[len(PREV_PREFIX):]
        if final.exists():  # the replacement was renamed into place: the old copy is redundant
            shutil.rmtree(prev, ignore_errors=True)
        else:
            os.replace(prev, final)
            restored.append(final)
            logger.warning("restored %s, whose replacement was interrupted", final)
    _fsync_dir(output_dir)
    return restored


def remove_stale(output_dir: str | os.PathLike) -> None:
    """Restore interrupted replacements (:func:`recover_interrupted`), then remove ``.tmp-*`` / ``.trash-*``
    leftovers of a killed run (call on the main process, holding the output directory's lock, before saving)."""
    output_dir = Path(output_dir)
    recover_interrupted(output_dir)
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


__all__ = [
    "PREFIX", "TMP_PREFIX", "TRASH_PREFIX", "PREV_PREFIX", "STATE_NAME", "FORMAT_VERSION", "MAX_STEP",
    "checkpoint_step", "validate_state", "read_state", "sha256_file", "checkpoint_problem", "is_complete",
    "candidates", "list_checkpoints", "latest_checkpoint", "resolve_checkpoint", "prune_checkpoints",
    "recover_interrupted", "remove_stale",
]
