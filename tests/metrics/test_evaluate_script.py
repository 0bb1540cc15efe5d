"""evaluate.py end to end on CPU: keyed reference cache, bad input, sampling from a model dir, 2 processes."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _unet_script_helpers import SAMPLE, TINY, TRAIN, load_script, run  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "sample_scripts" / "evaluate.py"


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(path, n, seed, shift=0, size=16):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.clip(rng.normal(100 + shift, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path / f"{i:03d}.png")
    return path


FIGURE = r"([\w\-()=]+): (-?[\d.]+(?:e[-+]\d+)?)(?: \+- [\d.e+-]+)? \(real n=(\d+), fake n=(\d+)"


def _figures(text):
    return {m[0]: (float(m[1]), int(m[2]), int(m[3])) for m in re.findall("^" + FIGURE, text, re.M)}


def test_cache_dir_round_trip_with_every_line_labelled(evaluate, tmp_path, capsys):
    real, fake = _folder(tmp_path / "real", 12, 0), _folder(tmp_path / "fake", 10, 1, shift=60)
    argv = ["--real", str(real), "--fake", str(fake), "--feature_extractor", "random_conv", "--metrics", "fid", "kid",
            "pr", "--cache", str(tmp_path / "cache"), "--resolution", "16", "--kid_subsets", "5",
            "--kid_subset_size", "6", "--device", "cpu", "--real_baseline"]
    assert evaluate.main(argv) == 0
    first = capsys.readouterr().out
    assert "computed, cached in" in first and len(os.listdir(tmp_path / "cache")) == 1
    figures = _figures(first)
    assert figures["FID"][1:] == (12, 10) and figures["KID"][1:] == (12, 10) and figures["FID"][0] > 0
    assert 0 <= figures["precision(k=3)"][0] <= 1 and 0 <= figures["recall(k=3)"][0] <= 1
    for line in first.splitlines():
        if re.search(FIGURE, line):  # extractor named, small n flagged
            assert "random_conv(seed=0, dim=64)" in line and "below the standard protocol" in line
    assert "real-vs-real baseline: FID" in first and "(real n=6, fake n=6" in first
    assert evaluate.main(argv) == 0
    second = capsys.readouterr().out
    assert "read from" in second and _figures(second) == figures


def test_second_classifier_at_the_same_path_and_another_real_folder_are_recomputed(evaluate, tmp_path, capsys):
    import visionformers as vf

    real, other, fake = _folder(tmp_path / "r", 6, 0), _folder(tmp_path / "o", 6, 2, shift=50), _folder(tmp_path / "f", 5, 1)
    clf = tmp_path / "best"
    base = ["--fake", str(fake), "--feature_extractor", f"visionformers:{clf}", "--metrics", "fid",
            "--resolution", "16", "--device", "cpu"]
    cached = [*base, "--cache", str(tmp_path / "cache")]
    figures = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        tiny = vf.create_model("vit_tiny_patch4_32", num_classes=10, img_size=16, depth=1, embed_dim=32, num_heads=2)
        vf.save_pretrained(tiny, clf)
        assert evaluate.main([*cached, "--real", str(real)]) == 0
        out = capsys.readouterr().out
        assert "computed" in out  # a new classifier under the old name: a new key, never the old features
        assert evaluate.main([*base, "--real", str(real)]) == 0  # no cache at all: the same figure
        figures.append(_figures(out)["FID"][0])
        assert figures[-1] == _figures(capsys.readouterr().out)["FID"][0]
    assert figures[0] != figures[1]
    assert evaluate.main([*cached, "--real", str(other)]) == 0  # another --real folder: computed, not ignored
    assert "computed" in capsys.readouterr().out and len(os.listdir(tmp_path / "cache")) == 3


def test_mismatching_cache_file_is_refused_with_the_reason(evaluate, tmp_path, capsys):
    real, fake = _folder(tmp_path / "real", 4, 0), _folder(tmp_path / "fake", 4, 1)
    base = ["--real", str(real), "--fake", str(fake), "--metrics", "fid", "--cache", str(tmp_path / "c.npz"),
            "--device", "cpu", "--feature_extractor", "random_conv:0"]
    assert evaluate.main([*base, "--resolution", "16"]) == 0
    assert evaluate.main([*base, "--resolution", "8"]) == 2
    err = capsys.readouterr().err
    assert "resolution: 16 in the cache, 8 in this run" in err
    assert evaluate.main([*base, "--resolution", "16", "--channels", "1"]) == 2
    assert "channels: 3 in the cache, 1 in this run" in capsys.readouterr().err
    base[-1] = "random_conv:1"
    assert evaluate.main([*base, "--resolution", "16"]) == 2
    assert "extractor: 'random_conv(seed=0, dim=64)' in the cache" in capsys.readouterr().err


def test_empty_folder_and_too_few_images_are_clear_errors(evaluate, tmp_path, capsys):
    real, one = _folder(tmp_path / "real", 4, 0), _folder(tmp_path / "one", 1, 1)
    (tmp_path / "empty").mkdir()
    base = ["--real", str(real), "--feature_extractor", "random_conv", "--resolution", "16", "--device", "cpu"]
    assert evaluate.main([*base, "--fake", str(tmp_path / "empty")]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert evaluate.main([*base, "--fake", str(one), "--metrics", "fid"]) == 2
    assert "covariance needs at least 2 images" in capsys.readouterr().err
    assert evaluate.main([*base, "--fake", str(one), "--metrics", "is"]) == 2
    assert "IS and sFID need an inception:PATH extractor" in capsys.readouterr().err


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
    assert "--real" in proc.stderr and "no_such_dir" in proc.stderr


def test_sampling_in_one_go_matches_the_saved_pngs(evaluate, tmp_path, capsys):
    """--model_path samples exactly what sample_unet.py writes (same seeds, labels, 8-bit pixels)."""
    out = tmp_path / "run"
    load_script(TRAIN).main([*TINY, "--max_train_steps", "1", "--output_dir", str(out)])
    common = ["--num_inference_steps", "2", "--guidance_scale", "2.0", "--seed", "3"]
    load_script(SAMPLE).main(["--model_path", str(out / "model"), "--num_images", "6", "--output_dir",
                              str(tmp_path / "pngs"), *common])
    real = _folder(tmp_path / "real", 5, 0, size=8)
    base = ["--real", str(real), "--feature_extractor", "random_conv", "--resolution", "8", "--channels", "1", "--metrics", "fid", "kid", "--kid_subset_size", "4", "--device", "cpu", "--batch_size", "4"]
    assert evaluate.main([*base, "--fake", str(tmp_path / "pngs" / "images")]) == 0
    from_pngs = _figures(capsys.readouterr().out)
    assert evaluate.main([*base, "--model_path", str(out / "model"), "--num_samples", "6", *common,
                          "--save_npz", str(tmp_path / "s.npz")]) == 0
    text = capsys.readouterr().out
    assert _figures(text) == from_pngs and from_pngs["FID"][1:] == (5, 6)
    assert "6 samples of" in text and "guidance 2.0" in text
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (6, 8, 8, 1) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [0, 1, 2, 3, 4, 5]
        png0 = np.asarray(Image.open(tmp_path / "pngs" / "images" / "000000.png"))
        assert np.array_equal(z["arr_0"][0, :, :, 0], png0)


def test_two_processes_give_the_same_figures(tmp_path):
    real, fake = _folder(tmp_path / "real", 11, 0), _folder(tmp_path / "fake", 9, 1, shift=40)
    args = ["--real", str(real), "--fake", str(fake), "--feature_extractor", "random_conv", "--metrics", "fid", "kid",
            "pr", "--resolution", "16", "--kid_subset_size", "5", "--kid_subsets", "3", "--batch_size", "2"]
    one = run(SCRIPT, args, nproc=1).stdout
    two = run(SCRIPT, args, nproc=2).stdout
    assert "processes: 2" in two and "processes: 1" in one
    lines = lambda text: [ln for ln in text.splitlines() if re.search(FIGURE, ln)]  # noqa: E731
    assert len(lines(one)) == 4 and lines(one) == lines(two)


def test_fd_dinov2_from_a_timm_file(evaluate, tmp_path, capsys):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=1, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "dinov2.pth")
    real, fake = _folder(tmp_path / "real", 6, 0), _folder(tmp_path / "fake", 5, 1, shift=50)
    argv = ["--real", str(real), "--fake", str(fake), "--feature_extractor", "random_conv", "--dinov2",
            str(tmp_path / "dinov2.pth"), "--metrics", "fid", "fd_dinov2", "--resolution", "16", "--device", "cpu",
            "--cache", str(tmp_path / "cache")]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("FD-DINOv2:"))
    assert "(real n=6, fake n=5, dinov2)" in line and _figures(out)["FD-DINOv2"][0] > 0
    assert len(os.listdir(tmp_path / "cache")) == 2  # one cache entry per extractor
    assert evaluate.main(argv) == 0 and _figures(capsys.readouterr().out) == _figures(out)
