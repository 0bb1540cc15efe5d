"""VISIONFORMERS_* switches: the usual spellings, and a clear error naming a bad value where it is read."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visionformers import _env
from visionformers._validate import script_errors

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("On", True), (" YES\n", True),
                                       ("0", False), ("FALSE", False), ("off", False), ("No", False)])
def test_flag_spellings(monkeypatch, value, on):
    monkeypatch.setenv("VISIONFORMERS_NATIVE", value)
    assert _env.native() is on


@pytest.mark.parametrize("value", ["", "2", "enabled", "none"])
def test_a_bad_flag_names_the_variable_the_value_and_the_choices(monkeypatch, value):
    monkeypatch.setenv("VISIONFORMERS_NATIVE", value)
    with pytest.raises(ValueError, match=f"VISIONFORMERS_NATIVE={value!r} .*true.*false"):
        _env.native()


def test_unset_switches_take_their_defaults(monkeypatch):
    names = ("VISIONFORMERS_NATIVE", "VISIONFORMERS_CACHE", "VISIONFORMERS_TRACEBACK")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    assert (_env.native(), _env.cache(), _env.traceback()) == (True, None, False)


@pytest.mark.parametrize("value, parsed", [("512", 512), (" 0 ", 0), ("", None), ("2G", None), ("-1", None),
                                           ("1.5", None), ("1_000", None)])
def test_integer_is_a_whole_number(monkeypatch, value, parsed):
    monkeypatch.setenv("VISIONFORMERS_TEST_INTEGER", value)
    if parsed is None:
        with pytest.raises(ValueError, match=f"VISIONFORMERS_TEST_INTEGER={value!r} .*whole number >= 0"):
            _env.integer("VISIONFORMERS_TEST_INTEGER", 7)
    else:
        assert _env.integer("VISIONFORMERS_TEST_INTEGER", 7) == parsed


def test_choice_and_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("VISIONFORMERS_TEST_CHOICE", " Always ")
    assert _env.choice("VISIONFORMERS_TEST_CHOICE", "auto", ["always", "never"]) == "always"
    monkeypatch.setenv("VISIONFORMERS_TEST_CHOICE", "sometimes")
    with pytest.raises(ValueError, match="VISIONFORMERS_TEST_CHOICE='sometimes' .*'always', 'never'"):
        _env.choice("VISIONFORMERS_TEST_CHOICE", "auto", ["always", "never"])
    monkeypatch.setenv("VISIONFORMERS_CACHE", str(tmp_path))
    assert _env.cache() == tmp_path
    monkeypatch.setenv("VISIONFORMERS_CACHE", " ")
    with pytest.raises(ValueError, match="VISIONFORMERS_CACHE=' ' .*directory path"):
        _env.cache()
    with pytest.raises(ValueError, match="name='PATH'"):
        _env.flag("PATH", False)  # only the package's own switches are read here


def test_bad_switches_never_stop_the_import():
    env = dict(os.environ, PYTHONPATH=str(REPO), VISIONFORMERS_NATIVE="maybe",
               VISIONFORMERS_CACHE="", VISIONFORMERS_TRACEBACK="")
    done = subprocess.run([sys.executable, "-c", "import visionformers, visionformers.vision, visionformers.text"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("value, reraised", [(None, False), ("0", False), ("off", False), ("1", True), ("yes", True)])
def test_traceback_switch(monkeypatch, value, reraised):
    def main():
        raise ValueError("steps=0 is not accepted")

    if value is None:
        monkeypatch.delenv("VISIONFORMERS_TRACEBACK", raising=False)
    else:
        monkeypatch.setenv("VISIONFORMERS_TRACEBACK", value)
    with pytest.raises(ValueError if reraised else SystemExit, match="steps=0"):
        script_errors(main)()
