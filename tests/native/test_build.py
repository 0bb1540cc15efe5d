"""The build cache of the native kernels: built once, verified before every load, never trusted beyond that."""
import concurrent.futures
import ctypes
import hashlib
import logging
import os
import stat
import subprocess
import sys
import time

import pytest

from visionformers.native import build as _native

CAN_BUILD = sys.platform.startswith("linux") and _native._compiler() is not None and _native.enabled()
needs_compiler = pytest.mark.skipif(not CAN_BUILD, reason="needs Linux with a C compiler")
TINY = "int vf_tiny_add(int a, int b) { return a + b; }\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache and source directory holding ``tiny.c``, and a process that has loaded and warned nothing."""
    sources = tmp_path / "src"
    sources.mkdir()
    (sources / "tiny.c").write_text(TINY)
    monkeypatch.setenv("VISIONFORMERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VISIONFORMERS_NATIVE", raising=False)
    monkeypatch.setattr(_native, "_SOURCES", sources)
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "_tidied", set())
    monkeypatch.setattr(_native, "_warned", False)
    return tmp_path


@pytest.fixture
def opened(monkeypatch):
    """Every path given to dlopen; each must hash to the digest recorded beside it at that moment."""
    paths, real = [], ctypes.CDLL

    def checked(path, *args, **kwargs):
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert digest == open(path + ".sha256").read(), f"dlopen of an unverified library {path}"
        paths.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(_native.ctypes, "CDLL", checked)
    return paths


def compile_calls(monkeypatch):
    calls, real = [], subprocess.run
    monkeypatch.setattr(_native.subprocess, "run", lambda cmd, **kw: (calls.append(cmd), real(cmd, **kw))[1])
    return calls


def build_tiny():
    """Build ``tiny.c`` without loading it (this process must not map a file that the test then damages)."""
    return _native._build("tiny", _native._SOURCES / "tiny.c", _native._compiler())


@needs_compiler
def test_builds_once_into_a_private_cache_and_records_the_digest(cache, opened, monkeypatch):
    lib = _native.load("tiny", symbols=["vf_tiny_add"])
    assert lib is not None and lib.vf_tiny_add(2, 3) == 5
    for directory in (cache / "cache", cache / "cache" / "native"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    (library,) = (cache / "cache" / "native").glob("tiny-*.so")
    assert [str(library)] == opened
    assert not library.stat().st_mode & 0o022
    assert (cache / "cache" / "native" / (library.name + ".sha256")).read_text() == \
        hashlib.sha256(library.read_bytes()).hexdigest()
    left = sorted(p.name for p in library.parent.iterdir())
    assert left == [library.name, library.name + ".lock", library.name + ".sha256"]  # no temporary
    calls = compile_calls(monkeypatch)
    stamp = library.stat().st_mtime_ns
    assert build_tiny() == library and library.stat().st_mtime_ns == stamp and calls == []  # cached
    (cache / "src" / "tiny.c").write_text(TINY + "/* another version */\n")
    assert build_tiny() not in (None, library) and len(calls) == 1  # a new source, a new library


@needs_compiler
@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no record", "group-writable"])
def test_a_damaged_library_is_rebuilt_never_loaded(cache, opened, damage):
    library = build_tiny()
    data = library.read_bytes()
    if damage == "truncated":  # as a crash mid-write left it (loading it killed processes with SIGBUS)
        library.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        library.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "no record":
        (library.parent / (library.name + ".sha256")).unlink()
    else:
        library.chmod(0o770)
    if damage == "no record":  # as a build killed before it recorded the digest: rebuilt quietly
        lib = _native.load("tiny", symbols=["vf_tiny_add"])
    else:
        with pytest.warns(RuntimeWarning, match="does not match the SHA-256"):
            lib = _native.load("tiny", symbols=["vf_tiny_add"])
    assert lib is not None and lib.vf_tiny_add(4, 5) == 9 and opened == [str(library)]
    assert library.read_bytes() == data or damage != "group-writable"  # rebuilt whole
    assert not library.stat().st_mode & 0o022


@needs_compiler
def test_builds_started_together_compile_once(cache, monkeypatch):
    calls = compile_calls(monkeypatch)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # each holds its own lock file descriptor
        built = list(pool.map(lambda _: build_tiny(), range(3)))
    assert built[0] is not None and built == built[:1] * 3 and len(calls) == 1


@needs_compiler
@pytest.mark.parametrize("where", ["library directory", "cache directory"])
def test_a_directory_others_can_write_is_not_loaded_from(cache, opened, where):
    build_tiny()
    directory = cache / "cache" / ("native" if where == "library directory" else "")
    directory.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="writable by"):
        assert _native.load("tiny") is None
    assert opened == []


@needs_compiler
def test_a_sticky_directory_above_the_cache_is_fine(cache, opened):
    (cache / "cache").mkdir(mode=0o700)
    (cache / "cache").chmod(0o1777)  # as /tmp: others may add files but not rename ours
    assert _native.load("tiny") is not None and len(opened) == 1


@needs_compiler
def test_files_and_directories_of_another_user_are_refused(cache, monkeypatch):
    library = build_tiny()
    assert _native._digest(library) is not None and _native._unsafe_reason(library.parent) is None
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)  # as if this process ran as another user
    assert _native._digest(library) is None
    assert "must belong to uid" in _native._unsafe_reason(library.parent)


@needs_compiler
def test_a_library_missing_a_function_falls_back(cache, opened):
    with pytest.warns(RuntimeWarning, match="lacks vf_absent"):
        assert _native.load("tiny", symbols=["vf_tiny_add", "vf_absent"]) is None
    _native._loaded.clear()
    kernel = _native.Kernel("tiny", lambda lib: lib.vf_absent, lambda lib: True)  # configure looks up a missing one
    assert kernel.get() is None
    assert _native.Kernel("tiny", lambda lib: None, lambda lib: lib.vf_tiny_add(1, 1) == 2).get() is not None


@needs_compiler
def test_kernel_keeps_a_library_only_when_its_self_check_passes(cache):
    configured = []
    ok = _native.Kernel("tiny", configured.append, lambda lib: True)
    assert ok.get() is not None and ok.get() is ok.get() and len(configured) == 1  # decided once
    with ok.disabled():
        assert ok.get() is None
    assert ok.get() is not None
    with pytest.warns(RuntimeWarning, match="self-check"):
        assert _native.Kernel("tiny", lambda lib: None, lambda lib: False).get() is None


@needs_compiler
def test_a_failed_build_is_remembered_until_the_source_changes(cache, monkeypatch):
    (cache / "src" / "broken.c").write_text("this is not C\n")
    calls = compile_calls(monkeypatch)
    with pytest.warns(RuntimeWarning, match="does not compile"):
        assert _native.load("broken") is None
    assert len(calls) == 2  # -march=native, then without it
    markers = sorted((cache / "cache" / "native").glob("broken-*.failed"))
    assert len(markers) == 2 and "error" in markers[0].read_text()
    assert not list((cache / "cache" / "native").glob("*.so"))  # nothing half-built is left
    _native._loaded.clear()  # as a new process
    assert _native.load("broken") is None and len(calls) == 2  # not compiled again
    _native._loaded.clear()
    (cache / "src" / "broken.c").write_text(TINY.replace("tiny", "broken"))  # fixed: a new key, compiled again
    assert _native.load("broken", symbols=["vf_broken_add"]) is not None and len(calls) == 3


def test_temporaries_of_killed_builds_are_removed_but_not_a_running_one(cache):
    directory = cache / "cache" / "native"
    directory.mkdir(parents=True, mode=0o700)
    (cache / "cache").chmod(0o700)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = _native._host_tag()
    names = {
        f".build-{dead.pid}-{host}-abc.so": False,  # its process is gone
        f".build-{os.getpid()}-{host}-abc.so": True,  # a build in progress
        f".build-{dead.pid}-00000000-abc.so": True,  # another machine's, still young
        "tmpq1w2e3.so": True,  # an older release's temporary, young
        "tmpr4t5y6.so": False,  # ... and old
        ".gemm-0.so.sha256.x1y2.tmp": False,  # a half-written record, old
        "gemm-0123456789abcdef.so": True,  # a library
    }
    old = time.time() - _native.STALE_SECONDS - 60
    for name in names:
        (directory / name).write_bytes(b"")
    for name in ("tmpr4t5y6.so", ".gemm-0.so.sha256.x1y2.tmp"):
        os.utime(directory / name, (old, old))
    assert _native.library_dir() == directory
    assert sorted(p.name for p in directory.iterdir()) == sorted(name for name, kept in names.items() if kept)


def test_no_compiler_means_plain_pytorch_silently(cache, monkeypatch, recwarn):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(cache / "src"))  # no cc, no gcc
    assert _native.load("tiny") is None and _native.Kernel("tiny", print, lambda lib: True).get() is None
    assert not recwarn.list


@needs_compiler
@pytest.mark.parametrize("problem", ["cache path is a file", "compiler missing"])
def test_an_unusable_cache_or_compiler_gives_one_warning_at_most(cache, monkeypatch, problem, caplog):
    caplog.set_level(logging.DEBUG)
    if problem == "cache path is a file":
        (cache / "blocker").write_text("a file where the cache directory would go")
        monkeypatch.setenv("VISIONFORMERS_CACHE", str(cache / "blocker"))
    else:
        monkeypatch.setenv("CC", str(cache / "no-such-cc"))
    with pytest.warns(RuntimeWarning) as record:
        assert _native.load("tiny") is None
        (cache / "src" / "other.c").write_text(TINY.replace("tiny", "other"))
        assert _native.load("other") is None
    assert len(record) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]  # nothing in the middle of a progress bar


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), ("OFF", False), (" no ", False),
                                       ("1", True), ("True", True), ("on", True), ("YES", True)])
def test_native_switch_spellings(cache, monkeypatch, value, on):
    monkeypatch.setenv("VISIONFORMERS_NATIVE", "1")
    possible = _native.enabled()
    monkeypatch.setenv("VISIONFORMERS_NATIVE", value)
    assert _native.enabled() == (on and possible)
    if not on:
        assert _native.load("tiny") is None and not (cache / "cache").exists()


@pytest.mark.parametrize("name, value", [("VISIONFORMERS_NATIVE", "maybe"), ("VISIONFORMERS_NATIVE", ""),
                                         ("VISIONFORMERS_CACHE", "")])
def test_a_bad_switch_is_an_error_naming_it_when_read(cache, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}='{value}' is not accepted"):
        _native.load("tiny")


def test_no_timing_decides_anything():
    source = open(_native.__file__).read()
    assert "perf_counter" not in source and "monotonic" not in source and "worth_it" not in source


@needs_compiler
def test_a_link_through_a_directory_others_can_write_is_refused(cache, opened, monkeypatch):
    (cache / "shared").mkdir()
    (cache / "shared").chmod(0o777)  # not sticky: anyone may swap the link below for one of theirs
    (cache / "shared" / "link").symlink_to(cache / "private", target_is_directory=True)
    (cache / "private").mkdir(mode=0o700)
    monkeypatch.setenv("VISIONFORMERS_CACHE", str(cache / "shared" / "link"))
    with pytest.warns(RuntimeWarning, match="shared, above the cache, is writable by others"):
        assert _native.load("tiny") is None
    assert opened == []
