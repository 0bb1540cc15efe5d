"""Parity with torchmetrics' feature-level FID/KID (torchmetrics is in the test extra), and GPU runs."""
import numpy as np
import pytest
import torch

from visionformers.data import DigitsDataset
from visionformers.metrics import (
    RandomConvFeatures,
    extract_features,
    frechet_distance,
    kid_from_features,
)


def test_fid_and_kid_match_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import _compute_fid
    from torchmetrics.image.kid import poly_mmd
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 24))
    y = rng.normal(size=(120, 24)) * 1.3 + 0.2
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ref_fid = _compute_fid(xt.mean(0), torch.cov(xt.T), yt.mean(0), torch.cov(yt.T))
    assert frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)) == pytest.approx(
        float(ref_fid), rel=1e-6)
    ref_kid = poly_mmd(xt, yt, degree=3, gamma=None, coef=1.0)  # k = (x.y / d + 1)^3 on all 120 of each
    ours, _ = kid_from_features(x, y, num_subsets=1, subset_size=120)
    assert ours == pytest.approx(float(ref_kid), rel=1e-9)


@pytest.mark.gpu
def test_features_on_cuda_match_cpu():
    ds = DigitsDataset("test", image_size=32, channels=3)
    ext = RandomConvFeatures(dim=32)
    cpu = extract_features(ds.images, ext, batch_size=128)
    gpu = extract_features(ds.images, ext.to("cuda"), batch_size=128)  # device taken from the module
    assert np.allclose(cpu, gpu, atol=1e-4)
