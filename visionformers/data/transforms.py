"""Image transforms for generative training and for classification, plus Mixup/CutMix with label smoothing.

Every transform takes a PIL image or a (C, H, W) tensor (uint8, or float in [0, 1]) and returns a float32
tensor. The soft targets of ``mixup_cutmix`` go straight into ``F.cross_entropy(logits, targets)``, which
accepts class probabilities as targets.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from visionformers._validate import check_choice, check_number, check_tensor, fail

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class ToSignedUnit(torch.nn.Module):
    """Map a float image from [0, 1] to [-1, 1], the range diffusion models are trained in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2 - 1).as_subclass(torch.Tensor)  # drop the tv_tensors.Image wrapper


class _PlainTensor(torch.nn.Module):
    """Unwrap tv_tensors so callers and default_collate see a plain torch.Tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.as_subclass(torch.Tensor)


def _interp(interpolation: str) -> InterpolationMode:
    check_choice("interpolation", interpolation, _INTERPOLATIONS)
    return _INTERPOLATIONS[interpolation]


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(name, value, "a positive int (pixels)")


def diffusion_train_transform(
    resolution: int, center_crop: bool = True, random_flip: bool = False, interpolation: str = "bilinear"
) -> v2.Compose:
    """Resize the short side to ``resolution``, crop a square (center or random), maybe flip, scale to [-1, 1].

    The same function with ``random_flip=False, center_crop=True`` is the deterministic evaluation transform.
    """
    _check_size("resolution", resolution)
    steps = [
        v2.Resize(resolution, interpolation=_interp(interpolation), antialias=True),
        v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), ToSignedUnit()]
    return v2.Compose(steps)


def classification_train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment_num_ops: int = 2,
    randaugment_magnitude: int = 9,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """RandomResizedCrop + flip + RandAugment (Cubuk et al. 2020) + normalisation, the DeiT/timm recipe.

    ``randaugment_num_ops=0`` turns RandAugment off. ``mean``/``std`` need one entry per channel
    (e.g. ``(0.5,), (0.5,)`` for grayscale digits).
    """
    _check_size("image_size", image_size)
    if not (0 < scale[0] <= scale[1] <= 1):
        fail("scale", scale, "(min, max) with 0 < min <= max <= 1")
    if not 0 <= hflip <= 1:
        fail("hflip", hflip, "a probability in [0, 1]")
    steps = [v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=_interp(interpolation),
                                  antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if randaugment_num_ops > 0:
        steps.append(v2.RandAugment(num_ops=randaugment_num_ops, magnitude=randaugment_magnitude))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
              _PlainTensor()]
    return v2.Compose(steps)


def classification_eval_transform(
    image_size: int,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """Resize the short side to ``image_size / crop_pct``, center-crop ``image_size``, normalise (timm's eval)."""
    _check_size("image_size", image_size)
    if not 0 < crop_pct <= 1:
        fail("crop_pct", crop_pct, "a fraction in (0, 1]")
    return v2.Compose([
        v2.Resize(int(image_size / crop_pct), interpolation=_interp(interpolation), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
        _PlainTensor(),
    ])


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int labels -> (B, num_classes) targets: 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere.

    Label smoothing as in Szegedy et al. 2016 (Inception-v3, Sec. 7); each row sums to 1.
    """
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().unsqueeze(1), 1.0 - smoothing + off)


def _numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    # torch has no Beta sampler that takes a Generator, so a torch draw seeds a numpy one: seeded runs stay
    # reproducible from the caller's torch.Generator (or torch's global seed when generator is None).
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return np.random.default_rng(seed)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Box (y0, y1, x0, x1) of area ~ (1 - lam) H W at a uniform center, clipped to the image (Yun et al. 2019, Sec. 3.1)."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def mixup_cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    label_smoothing: float = 0.1,
    generator: torch.Generator | None = None,
    switch_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with its reverse (images.flip(0)) by Mixup or CutMix; return (mixed images, soft targets).

    Mixup (Zhang et al. 2018, Eq. 1): x = lam x_i + (1 - lam) x_j, lam ~ Beta(mixup_alpha, mixup_alpha).
    CutMix (Yun et al. 2019, Eq. 1): paste a box of x_j into x_i, lam ~ Beta(cutmix_alpha, cutmix_alpha), then
    lam = 1 - box area / image area, so the target weights equal the pixel fractions exactly.
    With both alphas > 0, CutMix is chosen with probability ``switch_prob`` (the DeiT/timm recipe); with both 0
    the images are unchanged and only label smoothing applies. Targets: lam y_i + (1 - lam) y_j of
    ``smooth_one_hot`` rows, so each sums to 1. One lam per batch, as in timm's default "batch" mode.

    :param images: (B, C, H, W) float.
    :param labels: (B,) int class indices in [0, num_classes).
    :returns: mixed images (B, C, H, W), targets (B, num_classes) float32.
    """
    check_tensor("images", images, ndim=4, floating=True)
    check_tensor("labels", labels, ndim=1, integer=True)
    if labels.shape[0] != images.shape[0]:
        fail("labels", labels, f"one label per image ({images.shape[0]})")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        fail("num_classes", num_classes, "a positive int")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        fail("labels", labels, f"class indices in [0, {num_classes})")
    check_number("mixup_alpha", mixup_alpha, at_least=0)
    check_number("cutmix_alpha", cutmix_alpha, at_least=0)
    if not 0 <= label_smoothing < 1:
        fail("label_smoothing", label_smoothing, "a float in [0, 1)")
    if not 0 <= switch_prob <= 1:
        fail("switch_prob", switch_prob, "a probability in [0, 1]")

    rng = _numpy_rng(generator)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    partner = images.flip(0)
    if alpha == 0:
        mixed = images
    elif use_cutmix:
        h, w = images.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(h, w, lam, rng)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the exact pasted fraction, not the sampled one
    else:
        mixed = images * lam + partner * (1.0 - lam)
    own = smooth_one_hot(labels, num_classes, label_smoothing)
    targets = own * lam + own.flip(0) * (1.0 - lam)
    return mixed, targets
