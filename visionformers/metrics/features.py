"""Feature extractors for FID/KID and the batch iteration shared by every metric.

A feature extractor is any callable ``images (B, C, H, W) float in [-1, 1] -> features (B, D)``. Three are
provided: a visionformers (or timm-style) classifier's pre-logits features, torchvision's Inception-v3 pool3
features from a LOCAL weights file, and a fixed random conv net for tests and smoke runs.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from visionformers._validate import check_tensor, fail

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def _match_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Grayscale -> RGB by repetition, RGB -> grayscale by the channel mean, else unchanged."""
    if channels is None or x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    fail("images", x, f"1 or {channels} channels")


def _resize(x: torch.Tensor, size: int | tuple[int, int] | None) -> torch.Tensor:
    if size is None:
        return x
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    # antialias only acts when shrinking, where it stops aliasing from changing the statistics
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


class ClassifierFeatures(nn.Module):
    """Pre-logits features of a classifier: ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(
        self,
        model: nn.Module | Callable,
        image_size: int | tuple[int, int] | None = None,
        in_chans: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        """
        :param model: a visionformers/timm classifier (``forward_features`` + ``forward_head``), or any callable
            whose output is flattened to (B, D).
        :param image_size: resize inputs to this size; None reads ``model.config.img_size`` when present.
        :param in_chans: the model's channels (1 <-> 3 converted); None reads ``model.config.in_chans``.
        :param mean, std: when given, inputs are mapped from [-1, 1] to [0, 1] and normalised with them (use the
            normalisation the classifier was trained with); None feeds [-1, 1] as-is (the digits convention).
        """
        super().__init__()
        config = getattr(model, "config", None)
        self.model = model.eval() if isinstance(model, nn.Module) else model
        self.image_size = image_size if image_size is not None else getattr(config, "img_size", None)
        self.in_chans = in_chans if in_chans is not None else getattr(config, "in_chans", None)
        self.mean = None if mean is None else torch.tensor(mean).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, -1, 1, 1)
        self.use_head = hasattr(model, "forward_features") and hasattr(model, "forward_head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, D)."""
        x = _resize(_match_channels(x, self.in_chans), self.image_size)
        if self.mean is not None:
            x = ((x + 1) / 2 - self.mean.to(x)) / self.std.to(x)
        if self.use_head:
            out = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        else:
            out = self.model(x)
        return out.flatten(1)  # (B, D)


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 pool3 features (2048-d) at 299x299, weights from a local file.

    Note: torchvision's Inception-v3 is not the TF graph of pytorch-fid/clean-fid, so figures are comparable
    only with figures computed with the same weights file, not with published FIDs.
    """

    input_size = 299
    dim = 2048

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        import torchvision

        from visionformers.hub import load_weights_file  # lazy, as build_feature_extractor's model zoo import

        sd = load_weights_file(weights_path, "weights_path")
        has_aux = any(k.startswith("AuxLogits.") for k in sd)
        # weights=None: never download; init_weights=False: the file overwrites every parameter anyway.
        net = torchvision.models.inception_v3(
            weights=None, aux_logits=has_aux, transform_input=False, init_weights=False
        )
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[:3]
            raise ValueError(
                f"weights_path={os.fspath(weights_path)!r} is not a torchvision inception_v3 state dict: "
                + " ".join(first)
            ) from None
        net.fc = nn.Identity()  # keep the 2048-d average-pooled ("pool3") features
        self.net = net.eval()
        self.name = f"inception_v3({os.path.basename(os.fspath(weights_path))})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [-1, 1] -> (B, 2048). transform_input=False: the weights expect [-1, 1]."""
        x = _resize(_match_channels(x, 3), self.input_size)
        return self.net(x)


class RandomConvFeatures(nn.Module):
    """A fixed random 3-layer conv net: FOR TESTS AND SMOKE RUNS ONLY; its figures mean nothing elsewhere."""

    def __init__(self, dim: int = 64, seed: int = 0, image_size: int = 32):
        super().__init__()
        self.image_size, self.dim = image_size, dim
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        g = torch.Generator().manual_seed(seed)  # seeded here, so the net is the same in every process
        with torch.no_grad():
            for p in self.net.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        self.eval()
        self.name = f"random_conv(seed={seed}, dim={dim})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [-1, 1] -> (B, dim)."""
        return self.net(_resize(_match_channels(x, 3), self.image_size))


def build_feature_extractor(spec: str) -> nn.Module:
    """``"inception:PATH"`` | ``"visionformers:DIR"`` (a save_pretrained classifier) | ``"random_conv[:SEED]"``."""
    kind, _, arg = spec.partition(":")
    if kind == "inception" and arg:
        return InceptionFeatures(arg)
    if kind == "visionformers" and arg:
        if not os.path.isdir(arg):
            raise FileNotFoundError(f"feature_extractor={spec!r}: {arg!r} is not a folder made by save_pretrained")
        from visionformers.hub import from_pretrained  # lazy: only this option needs the model zoo

        model = from_pretrained(arg)
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            fail("feature_extractor", spec, f"a classifier directory (ViT / Swin); {arg!r} holds a {type(model).__name__}")
        extractor = ClassifierFeatures(model)
        extractor.name = f"visionformers({os.path.basename(os.path.normpath(arg))})"
        return extractor
    if kind == "random_conv" and (not arg or arg.isdigit()):
        return RandomConvFeatures(seed=int(arg or 0))
    fail("feature_extractor", spec, "'inception:PATH', 'visionformers:DIR' or 'random_conv[:SEED]' (tests only)")


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        if "pixel_values" not in batch:
            fail("batch", sorted(batch), "a dict with a 'pixel_values' key")
        labels = batch.get("label", batch.get("labels"))
        return batch["pixel_values"], None if labels is None else torch.as_tensor(labels)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (torch.as_tensor(batch[1]) if len(batch) > 1 else None)
    fail("batch", type(batch).__name__, "a tensor, a dict with 'pixel_values', or an (images, labels) tuple")


def iter_image_batches(source, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (images (B, C, H, W), labels (B,) or None) from any image source.

    ``source``: a (N, C, H, W) tensor; an ``(images, labels)`` tuple of tensors; a map-style Dataset of
    dicts/tuples (batched in order); or any iterable of batches (e.g. a DataLoader).
    """
    if isinstance(source, torch.Tensor):
        check_tensor("images", source, ndim=4, floating=True)
        for i in range(0, len(source), batch_size):
            yield source[i : i + batch_size], None
        return
    if isinstance(source, tuple) and len(source) == 2 and all(isinstance(s, torch.Tensor) for s in source):
        images, labels = source
        if len(images) != len(labels):
            fail("labels", labels, f"one label per image ({len(images)})")
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]
        return
    if isinstance(source, Dataset) and not isinstance(source, torch.utils.data.IterableDataset):
        source = DataLoader(source, batch_size=batch_size, shuffle=False)
    for batch in source:
        images, labels = _split_batch(batch)
        check_tensor("images", images, ndim=4, floating=True)
        yield images, labels


def model_device(model) -> torch.device:
    """The device of a module's first parameter; CPU for parameterless modules and plain callables."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")
