"""Feature extractors for FID/KID and the batch iteration shared by every metric.

A feature extractor is any callable ``images (B, C, H, W) float in [-1, 1] -> features (B, D)``; one with an
``outputs(x)`` method returns several named feature sets. Provided: Inception-v3 (pytorch-fid's or torchvision's
weights, from a LOCAL file: pool3 features, logits for IS, spatial features for sFID), a DINOv2 ViT (FD-DINOv2),
a visionformers (or timm-style) classifier's pre-logits features, and a fixed random conv net for tests.
Input channels: grey (1) is repeated to RGB, RGB is used as is, other channel counts are refused.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from visionformers._io import sha256_file
from visionformers._validate import check_choice, check_tensor, fail
from visionformers.metrics.inception import inception_from_state_dict

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


RESIZE_POLICIES = ("pytorch_fid", "clean", "bilinear_antialias", "bicubic_antialias")


def resize_images(x: torch.Tensor, size: int | tuple[int, int] | None, policy: str = "pytorch_fid") -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] resized to ``size`` by one of ``RESIZE_POLICIES``:

    - ``"pytorch_fid"``: pytorch-fid's ``F.interpolate(bilinear, align_corners=False)`` without antialiasing,
      applied to the [0, 1] image as pytorch-fid does (the comparable default for published FIDs);
    - ``"clean"``: clean-fid's ``mode="clean"`` (Parmar et al. 2022): PIL bicubic on each channel of the float
      [0, 255] image (PIL's filter widens when shrinking, so it antialiases), clipped to [0, 255];
    - ``"bilinear_antialias"`` / ``"bicubic_antialias"``: torch's antialiased filters (classifier features; the
      second is EDM2's DINOv2 resize).
    """
    if policy not in RESIZE_POLICIES:
        fail("resize", policy, f"one of {list(RESIZE_POLICIES)}")
    if size is None:
        return x
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if policy == "pytorch_fid":
        x01 = F.interpolate((x + 1) / 2, size=size, mode="bilinear", align_corners=False)
        return 2 * x01 - 1
    if policy == "clean":
        from PIL import Image

        arr = ((x.detach().float().cpu() + 1) * 127.5).numpy()  # (B, C, H, W) float in [0, 255]
        out = np.stack([
            np.stack([np.asarray(Image.fromarray(ch, mode="F").resize(size[::-1], resample=Image.BICUBIC)) for ch in img])
            for img in arr
        ]).clip(0, 255)
        return torch.from_numpy(out).to(x.device, x.dtype) / 127.5 - 1
    mode = "bilinear" if policy == "bilinear_antialias" else "bicubic"
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def extractor_outputs(extractor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """An extractor's named outputs: ``extractor.outputs(x)`` where defined (Inception: pool, logits, spatial),
    else ``{"pool": extractor(x)}``."""
    if hasattr(extractor, "outputs"):
        return extractor.outputs(x)
    return {"pool": extractor(x)}


class ClassifierFeatures(nn.Module):
    """Pre-logits features of a classifier: ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(
        self,
        model: nn.Module | Callable,
        image_size: int | tuple[int, int] | None = None,
        in_chans: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        resize: str = "bilinear_antialias",
    ):
        """
        :param model: a visionformers/timm classifier (``forward_features`` + ``forward_head``), or any callable
            whose output is flattened to (B, D).
        :param image_size: resize inputs to this size; None reads ``model.config.img_size`` when present.
        :param in_chans: the model's channels (1 <-> 3 converted); None reads ``model.config.in_chans``.
        :param mean, std: when given, inputs are mapped from [-1, 1] to [0, 1] and normalised with them (use the
            normalisation the classifier was trained with); None feeds [-1, 1] as-is (the digits convention).
        :param resize: one of ``RESIZE_POLICIES`` (see :func:`resize_images`).
        """
        super().__init__()
        config = getattr(model, "config", None)
        self.model = model.eval() if isinstance(model, nn.Module) else model
        self.image_size = image_size if image_size is not None else getattr(config, "img_size", None)
        self.in_chans = in_chans if in_chans is not None else getattr(config, "in_chans", None)
        self.mean = None if mean is None else torch.tensor(mean).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, -1, 1, 1)
        self.use_head = hasattr(model, "forward_features") and hasattr(model, "forward_head")
        check_choice("resize", resize, RESIZE_POLICIES)
        self.resize = resize
        self.name = type(model).__name__
        self.fingerprint = ""  # the weights' hash, set by build_feature_extractor (cache keys need it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, D)."""
        x = resize_images(_match_channels(x, self.in_chans), self.image_size, self.resize)
        if self.mean is not None:
            x = ((x + 1) / 2 - self.mean.to(x)) / self.std.to(x)
        if self.use_head:
            out = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        else:
            out = self.model(x)
        return out.flatten(1)  # (B, D)


class InceptionFeatures(nn.Module):
    """Inception-v3 features at 299x299 from a LOCAL weights file (nothing is downloaded).

    With pytorch-fid's file (``pt_inception-2015-12-05-6726825d.pth``) these are pytorch-fid's features (its FID
    blocks, resize and [0, 1] -> [-1, 1] normalisation), named ``inception-pytorch-fid``: the network of published
    FID / IS / sFID. torchvision's ImageNet weights are accepted too, named ``inception-torchvision``: their
    figures are comparable only with figures computed with the same file. Grey images are repeated to RGB.
    """

    input_size = 299
    dim = 2048

    def __init__(self, weights_path: str | os.PathLike, resize: str = "pytorch_fid"):
        super().__init__()
        from visionformers.hub import load_weights_file  # lazy, as build_feature_extractor's model zoo import

        check_choice("resize", resize, RESIZE_POLICIES)
        state = load_weights_file(weights_path, "weights_path")
        self.net = inception_from_state_dict(state, f"weights_path={os.fspath(weights_path)!r}")
        self.resize = resize
        self.name = "inception-pytorch-fid" if self.net.variant == "pytorch_fid" else "inception-torchvision"
        self.fingerprint = sha256_file(weights_path)

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1 or 3, H, W) in [-1, 1] -> {"pool": (B, 2048), "logits": (B, classes), "spatial": (B, 2023)}."""
        x = resize_images(_match_channels(x, 3), self.input_size, self.resize)
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [-1, 1] -> pool3 features (B, 2048)."""
        return self.outputs(x)["pool"]


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_features(path: str | os.PathLike, image_size: int = 224, num_heads: int | None = None) -> ClassifierFeatures:
    """FD-DINOv2's extractor (Stein et al. 2023; EDM2, Karras et al. 2024): the final-norm CLS token of a DINOv2
    ViT on 224x224 images resized by torch's antialiased bicubic and normalised with ImageNet's mean / std.

    ``path``: a local timm DINOv2-style weights file (``vit_large_patch14_dinov2``: converted with
    ``vf.convert.from_timm``, its position table resampled to ``image_size``) or a visionformers ViT directory.
    ``num_heads``: a timm file's head count when its width has no published one (DINOv2 S/B/L/g: 6/12/16/24).
    """
    from visionformers import convert
    from visionformers.hub import WEIGHTS_NAME, from_pretrained, load_weights_file

    path = os.fspath(path)
    if os.path.isdir(path):
        model = from_pretrained(path)
        fingerprint = sha256_file(os.path.join(path, WEIGHTS_NAME), os.path.join(path, "config.json"))
    else:
        state = load_weights_file(path, "dinov2")
        if "blocks.0.attn.qkv.weight" not in state or "cls_token" not in state:
            fail("dinov2", path, "a timm DINOv2-style ViT state dict (keys 'cls_token', 'patch_embed.proj.weight', "
                 "'blocks.N.attn.qkv.weight', 'norm.weight') or a visionformers ViT directory")
        config, converted = convert.from_timm(state, img_size=image_size, num_heads=num_heads, return_config=True)
        model = convert.build_model(config, converted)
        fingerprint = sha256_file(path)
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        fail("dinov2", path, f"a ViT; it holds a {type(model).__name__}")
    extractor = ClassifierFeatures(model.eval(), in_chans=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                   resize="bicubic_antialias")
    extractor.name, extractor.fingerprint = "dinov2", fingerprint
    return extractor


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
        self.fingerprint = self.name  # the seed and size determine every weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [-1, 1] -> (B, dim)."""
        return self.net(resize_images(_match_channels(x, 3), self.image_size, "bilinear_antialias"))


def build_feature_extractor(spec: str, resize: str = "pytorch_fid") -> nn.Module:
    """``"inception:PATH"`` | ``"visionformers:DIR"`` (a save_pretrained classifier) | ``"random_conv[:SEED]"``.

    ``resize`` (one of ``RESIZE_POLICIES``) is how images reach the extractor's input size.
    """
    check_choice("resize", resize, RESIZE_POLICIES)
    kind, _, arg = spec.partition(":")
    if kind == "inception" and arg:
        return InceptionFeatures(arg, resize=resize)
    if kind == "visionformers" and arg:
        if not os.path.isdir(arg):
            raise FileNotFoundError(f"feature_extractor={spec!r}: {arg!r} is not a folder made by save_pretrained")
        from visionformers.hub import WEIGHTS_NAME, from_pretrained  # lazy: only this option needs the model zoo

        model = from_pretrained(arg)
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            fail("feature_extractor", spec, f"a classifier directory (ViT / Swin); {arg!r} holds a {type(model).__name__}")
        extractor = ClassifierFeatures(model, resize=resize)
        extractor.name = f"visionformers({os.path.basename(os.path.normpath(arg))})"
        extractor.fingerprint = sha256_file(os.path.join(arg, WEIGHTS_NAME), os.path.join(arg, "config.json"))
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
