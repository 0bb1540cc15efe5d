import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "sample_scripts" / "evaluate.py"


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(path, n, seed, shift=0):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.clip(rng.normal(100 + shift, 40, size=(16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path / f"{i:03d}.png")
    return path


def _figures(text):
    return {m[0]: (float(m[1]), int(m[2]), int(m[3]))
            for m in re.findall(r"(FID|KID): (-?[\d.]+(?:e[-+]\d+)?).*\(real n=(\d+), fake n=(\d+)\)", text)}


def test_folders_with_cache_round_trip(evaluate, tmp_path, capsys):
    real, fake = _folder(tmp_path / "real", 12, 0), _folder(tmp_path / "fake", 10, 1, shift=60)
    cache = tmp_path / "stats.npz"
    argv = ["--real", str(real), "--fake", str(fake), "--feature_extractor", "random_conv", "--metrics", "fid", "kid",
            "--cache", str(cache), "--resolution", "16", "--kid_subsets", "5", "--kid_subset_size", "6",
            "--device", "cpu"]
    assert evaluate.main(argv) == 0
    first = capsys.readouterr().out
    assert cache.is_file() and "wrote reference statistics" in first
    figures = _figures(first)
    assert figures["FID"][1:] == (12, 10) and figures["KID"][1:] == (12, 10) and figures["FID"][0] > 0
    assert evaluate.main(argv) == 0
    second = capsys.readouterr().out
    assert "statistics from" in second and _figures(second) == figures


def test_digits_as_the_reference(evaluate, tmp_path, capsys):
    fake = _folder(tmp_path / "fake", 8, 2)
    argv = ["--real", "digits", "--digits_split", "test", "--fake", str(fake), "--feature_extractor", "random_conv:1",
            "--metrics", "fid", "--device", "cpu"]
    assert evaluate.main(argv) == 0
    assert _figures(capsys.readouterr().out)["FID"][1:] == (364, 8)


def test_cache_from_another_extractor_is_refused(evaluate, tmp_path, capsys):
    real, fake = _folder(tmp_path / "real", 4, 0), _folder(tmp_path / "fake", 4, 1)
    base = ["--real", str(real), "--fake", str(fake), "--metrics", "fid", "--cache", str(tmp_path / "c.npz"),
            "--resolution", "16", "--device", "cpu"]
    assert evaluate.main(base + ["--feature_extractor", "random_conv:0"]) == 0
    assert evaluate.main(base + ["--feature_extractor", "random_conv:1"]) == 2
    assert "was made with" in capsys.readouterr().err


def test_wrong_path_is_one_line_and_nonzero(tmp_path):
    fake = _folder(tmp_path / "fake", 2, 0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--real", str(tmp_path / "no_such_dir"), "--fake", str(fake),
         "--feature_extractor", "random_conv", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "no_such_dir" in proc.stderr
