"""The demo's grading: classifier accuracy, and FID / KID on the digit classifier's features with the protocol note."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from visionformers import demo
from visionformers.data import DigitsDataset


@pytest.fixture
def one_thread():
    """The classifier trains with 1,200 tiny steps: a second intra-op thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_grade_reports_fid_and_kid_with_counts_extractor_and_protocol(tmp_path, one_thread):
    test = DigitsDataset("test", image_size=8, channels=1)
    (tmp_path / "images").mkdir()
    items = []
    for i in range(40):  # held-out real digits stand in for samples: FID / KID near the real-vs-real floor
        arr = ((test.images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "images" / f"{i:06d}.png")
        items.append({"file": f"images/{i:06d}.png", "class_label": int(test.labels[i])})
    (tmp_path / "settings.json").write_text(json.dumps({"images": items}))
    noise = tmp_path / "noise"
    (noise / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for item in items:
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(noise / item["file"])
    (noise / "settings.json").write_text(json.dumps({"images": items}))
    real, bad = demo.grade(tmp_path), demo.grade(noise)
    assert real["sample_accuracy"] > 0.8 and 0 < real["fid"] < bad["fid"] / 3 and real["kid"] < bad["kid"]
    line = real["fid_kid_line"]
    assert "FID: " in line and "KID: " in line and "(real n=1433, fake n=40, digits-classifier)" in line
    assert line.endswith("[below the standard protocol: real n=1433 < 10,000, fake n=40 < 50,000]")


def test_grade_distribution_of_tensors_equals_grade_of_the_same_pngs(tmp_path, one_thread):
    """examples/quality_per_call.py grades sampled tensors: the same figures as the demo's PNG path."""
    test = DigitsDataset("test", image_size=8, channels=1)
    images = test.images[:40] + 0.01 * torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    (tmp_path / "images").mkdir()
    items = []
    for i in range(40):
        arr = ((images[i, 0].clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "images" / f"{i:06d}.png")
        items.append({"file": f"images/{i:06d}.png", "class_label": int(test.labels[i])})
    (tmp_path / "settings.json").write_text(json.dumps({"images": items}))
    from_pngs, from_tensors = demo.grade(tmp_path), demo.grade_distribution(images)
    assert from_tensors["num_real"] == 1433
    for key in ("fid", "kid", "kid_std"):
        assert from_tensors[key] == pytest.approx(from_pngs[key], rel=1e-6, abs=1e-9), key
