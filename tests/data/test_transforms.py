import numpy as np
import pytest
import torch
from PIL import Image

from visionformers.data import (
    DigitsDataset,
    classification_eval_transform,
    classification_train_transform,
    diffusion_train_transform,
    mixup_cutmix,
    smooth_one_hot,
)


def _gradient_image(w=40, h=30):
    x = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    return Image.fromarray(np.stack([x, x, 255 - x], axis=-1), "RGB")


def test_diffusion_transform_range_shape_and_flip():
    img = _gradient_image()
    out = diffusion_train_transform(16)(img)
    assert type(out) is torch.Tensor and out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert -1 <= out.min() < -0.5 and 0.5 < out.max() <= 1  # the crop trims the horizontal extremes
    torch.manual_seed(0)
    flipped = [diffusion_train_transform(16, random_flip=True)(img) for _ in range(16)]
    assert any(torch.equal(f, out.flip(-1)) for f in flipped) and any(torch.equal(f, out) for f in flipped)
    rand = diffusion_train_transform(16, center_crop=False)(img)
    assert rand.shape == (3, 16, 16)


def test_classification_transforms_normalise_pil_and_unit_tensors():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    ev = classification_eval_transform(16, crop_pct=1.0, mean=mean, std=std)
    out = ev(Image.new("RGB", (20, 20), (255, 255, 255)))
    assert out.shape == (3, 16, 16) and torch.allclose(out, torch.full_like(out, 2.0), atol=1e-4)
    torch.manual_seed(0)
    tr = classification_train_transform(24, mean=(0.5,), std=(0.5,))
    x = DigitsDataset("train", transform=tr)[0]["pixel_values"]  # a [0, 1] grayscale tensor in
    assert x.shape == (1, 24, 24) and type(x) is torch.Tensor
    assert classification_train_transform(24, randaugment_num_ops=0)(_gradient_image()).shape == (3, 24, 24)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="resolution"):
        diffusion_train_transform(0)
    with pytest.raises(ValueError, match="interpolation"):
        diffusion_train_transform(8, interpolation="lanczos3")
    with pytest.raises(ValueError, match="crop_pct"):
        classification_eval_transform(8, crop_pct=1.5)


def test_smooth_one_hot_rows_sum_to_one():
    t = smooth_one_hot(torch.tensor([0, 3, 9]), 10, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert torch.allclose(t[1, 3], torch.tensor(0.9 + 0.01)) and torch.allclose(t[1, 0], torch.tensor(0.01))


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mixup_cutmix_targets_are_distributions(mixup_alpha, cutmix_alpha):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 4])
    for _ in range(5):
        mixed, targets = mixup_cutmix(images, labels, 5, mixup_alpha, cutmix_alpha, 0.1, generator=g)
        assert mixed.shape == images.shape and targets.shape == (6, 5)
        assert torch.allclose(targets.sum(1), torch.ones(6)) and (targets >= 0).all()
    if mixup_alpha == cutmix_alpha == 0:
        assert torch.equal(mixed, images) and torch.allclose(targets, smooth_one_hot(labels, 5, 0.1))


def test_cutmix_target_weight_equals_pasted_area():
    # image i is the constant i, so the fraction of pixels still equal to i is the weight of its own label
    n, h, w = 4, 16, 12
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, h, w).contiguous()
    labels = torch.arange(n)
    g = torch.Generator().manual_seed(3)
    seen_partial = False
    for _ in range(20):
        mixed, targets = mixup_cutmix(images, labels, n, 0.0, 1.0, 0.0, generator=g)
        own = (mixed == images).float().mean(dim=(1, 2, 3))
        partner = (mixed == images.flip(0)).float().mean(dim=(1, 2, 3))
        assert torch.allclose(targets[labels, labels], own) and torch.allclose(targets[labels, labels.flip(0)], partner)
        seen_partial |= bool((own < 1).any())
    assert seen_partial


def test_mixup_is_the_convex_combination_its_targets_say():
    images, labels = torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 3])
    mixed, targets = mixup_cutmix(images, labels, 4, 0.5, 0.0, 0.0, generator=torch.Generator().manual_seed(1))
    lam = targets[0, 0]
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)


def test_mixup_cutmix_is_reproducible_and_validates():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    a = mixup_cutmix(images, labels, 4, generator=torch.Generator().manual_seed(7))
    b = mixup_cutmix(images, labels, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="labels"):
        mixup_cutmix(images, torch.tensor([0, 1, 2, 4]), 4)
    with pytest.raises(ValueError, match="label_smoothing"):
        mixup_cutmix(images, labels, 4, label_smoothing=1.0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        mixup_cutmix(images, labels, 4, mixup_alpha=-1.0)
