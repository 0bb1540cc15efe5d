"""Optional native kernels: C sources in the package, compiled on first use and cached per machine.

A kernel is a plain C file built with the system compiler (``$CC``, else ``cc``) and OpenMP into a shared
library, loaded with ``ctypes``. It runs inside PyTorch's own OpenMP runtime (Linux wheels ship
``libgomp.so.1``, which the library resolves to), so it shares PyTorch's threads. Where anything is
missing (not Linux, no compiler, a failed build or self-check) ``load`` returns None and callers use
their PyTorch path: native code only ever makes things faster, never required.

The build is keyed by the source, the compiler, the flags and the CPU (``-march=native`` code must not
run on another CPU of a shared home directory), written to a temporary file and renamed into place, so
processes that start together (``accelerate launch``) never load a half-written library.

Environment: ``VISIONFORMERS_NATIVE=0`` turns native kernels off; ``VISIONFORMERS_CACHE`` sets the cache
directory (default ``$XDG_CACHE_HOME/visionformers``, else ``~/.cache/visionformers``).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["enabled", "load", "cache_dir", "Kernel"]

_log = logging.getLogger(__name__)
_SOURCES = Path(__file__).parent / "csrc"
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the second where the compiler does not know -march=native
_COMMON_FLAGS = ["-std=c99", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]  # fp-contract: fused multiply-adds
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_UNSET = object()


def enabled() -> bool:
    """Whether native kernels may be used here: Linux, PyTorch built with OpenMP, not switched off."""
    return (
        os.environ.get("VISIONFORMERS_NATIVE", "1") != "0"
        and sys.platform.startswith("linux")
        and torch.backends.openmp.is_available()
    )


def cache_dir() -> Path:
    if os.environ.get("VISIONFORMERS_CACHE"):
        return Path(os.environ["VISIONFORMERS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "visionformers"


def _cpu_identity() -> str:
    """Model name and feature flags of this CPU (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def _build(name: str, source: Path, compiler: str) -> Path | None:
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # + shared headers
    out_dir = cache_dir() / "native"
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([text, compiler.encode(), " ".join(flags).encode(), _cpu_identity().encode()]))
        target = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
        except OSError as err:
            _log.info("native kernel %s: cache %s not writable (%s)", name, out_dir, err)
            return None
        cmd = [compiler, *flags, *_COMMON_FLAGS, str(source), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            done = None
            _log.info("native kernel %s: %s failed: %s", name, compiler, err)
        if done is not None and done.returncode == 0:
            os.replace(tmp, target)
            return target
        Path(tmp).unlink(missing_ok=True)
        if done is not None:
            _log.info("native kernel %s: `%s` failed:\n%s", name, " ".join(cmd), done.stderr[-2000:])
    return None


def load(name: str) -> ctypes.CDLL | None:
    """The library built from ``csrc/<name>.c``, or None where native kernels are unavailable.

    Built once per machine and source; the answer is remembered for the process.
    """
    if not enabled():
        return None
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            _log.info("native kernel %s: no C compiler found (set $CC)", name)
        else:
            try:  # an optional fast path: whatever goes wrong here, callers fall back to PyTorch
                path = _build(name, _SOURCES / f"{name}.c", compiler)
                lib = None if path is None else ctypes.CDLL(str(path))
            except Exception as err:  # noqa: BLE001
                _log.info("native kernel %s: not available: %s", name, err)
        _loaded[name] = lib
        return lib


class Kernel:
    """One native library for one Python module: built and loaded on first use, its functions' signatures set by
    ``configure(lib)``, and kept only if ``self_check(lib)`` (the kernel against PyTorch ops) passes and, where
    the gain depends on the machine, ``worth_it(lib)`` (a measurement) says so.

    ``get()`` returns the library or None (then the caller runs PyTorch ops); the answer is remembered.
    """

    def __init__(self, name: str, configure: Callable[[ctypes.CDLL], None], self_check: Callable[[ctypes.CDLL], bool],
                 worth_it: Callable[[ctypes.CDLL], bool] | None = None):
        self.name, self._configure, self._self_check, self._worth_it = name, configure, self_check, worth_it
        self._lib: ctypes.CDLL | None | object = _UNSET

    def get(self) -> ctypes.CDLL | None:
        if self._lib is _UNSET:
            lib = load(self.name)
            if lib is not None:
                self._configure(lib)
                if not self._self_check(lib):
                    _log.warning("native kernel %s disagrees with PyTorch in its self-check; using PyTorch ops", self.name)
                    lib = None
                elif self._worth_it is not None and not self._worth_it(lib):
                    _log.info("native kernel %s: no faster than PyTorch on this machine; not used", self.name)
                    lib = None
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
