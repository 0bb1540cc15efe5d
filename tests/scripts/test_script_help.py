"""Every script, example and benchmark answers --help (argparse formats help strings with %, so a stray % breaks it)."""
import subprocess
import sys
from pathlib import Path

import pytest
from _unet_script_helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for d in ("train_scripts", "sample_scripts", "examples") for p in (ROOT / d).glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help_prints_usage_and_exits_zero(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(path).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


BENCHMARKS = sorted((ROOT / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_help_prints_usage(path):
    # benchmarks parse sys.argv themselves and are run as scripts: run them so (importing torch, ~2 s each)
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and "--help" in done.stdout


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_option_has_help_with_its_default(path, monkeypatch):
    import argparse

    captured = []

    def capture(self, *args, **kwargs):
        captured.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        load_script(path).main([])
    parser = captured[0]
    text = parser.format_help()
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), path.name
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{path.name}: {name} has no help text"
        if action.option_strings and not action.required:
            shown = parser._get_formatter()._expand_help(action)
            assert "default" in shown, f"{path.name}: {name} does not show its default"
    assert text.startswith("usage:")
