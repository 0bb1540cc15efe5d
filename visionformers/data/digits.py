"""The embedded default dataset: 1,797 8x8 handwritten digits (UCI optdigits, CC BY 4.0; see assets/digits/).

The split is fixed in code and needs no RNG: within each class, in file order, every fifth image (positions
0, 5, 10, ...) is a test image. That gives 364 test and 1,433 train images, each class in both in the same
4:1 ratio, identical on every machine and numpy/torch version.
"""
from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from visionformers._validate import check_choice, fail
from visionformers.data.captions import CAPTION_TEMPLATES, DIGIT_NAMES, digit_caption, pick_template



def find_digits_file(package_dir: Path = Path(__file__).resolve().parent, prefix: str = sys.prefix) -> Path:
    """assets/digits/digits.csv.gz of a source checkout, else the copy a wheel installs under <prefix>/share
    (pyproject's data-files); the checkout path when neither exists, for the error message."""
    checkout = package_dir.parents[1] / "assets" / "digits" / "digits.csv.gz"
    installed = Path(prefix) / "share" / "visionformers" / "digits" / "digits.csv.gz"
    return checkout if checkout.is_file() or not installed.is_file() else installed


DIGITS_PATH = find_digits_file()
NUM_IMAGES = 1797
NUM_TRAIN, NUM_TEST = 1433, 364
SPLITS = ("train", "test", "all")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MAX_PIXEL = 16  # each 8x8 pixel counts the "on" bits of a 4x4 block, so 0..16

# (path, image_size, interpolation) -> (images (N, 1, H, W) float32 in [0, 1], labels (N,) int64), all 1,797.
_CACHE: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def read_digits_file(path: str | os.PathLike = DIGITS_PATH) -> tuple[np.ndarray, np.ndarray]:
    """Raw data: pixels (1797, 8, 8) uint8 in 0..16 and labels (1797,) int64, in file order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"digits data file {path!r} does not exist; it ships as assets/digits/digits.csv.gz in the repository "
            "and as share/visionformers/digits/digits.csv.gz in a wheel install (or pass data_path=)"
        )
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (1797, 65): 64 pixels, then the label
    pixels = table[:, :-1].reshape(-1, 8, 8).astype(np.uint8)  # row-major 8x8
    return pixels, table[:, -1]


def split_indices(labels: np.ndarray | torch.Tensor, split: str) -> np.ndarray:
    """Indices of ``split``: per class, every fifth image in file order is a test image."""
    check_choice("split", split, SPLITS)
    labels = np.asarray(labels)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        is_test[np.flatnonzero(labels == c)[::5]] = True
    if split == "all":
        return np.arange(len(labels))
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def load_digits(
    image_size: int = 32, interpolation: str = "bilinear", data_path: str | os.PathLike = DIGITS_PATH
) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits resized: images (N, 1, H, W) float32 in [0, 1], labels (N,) int64. Cached per size."""
    key = (os.fspath(data_path), image_size, interpolation)
    if key not in _CACHE:
        pixels, labels = read_digits_file(data_path)
        x = torch.from_numpy(pixels).float().div_(MAX_PIXEL).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        if image_size != x.shape[-1]:
            # antialias only acts when shrinking; bicubic can overshoot, so clamp back into [0, 1].
            smooth = interpolation != "nearest"
            x = F.interpolate(
                x, size=(image_size, image_size), mode=interpolation, antialias=smooth,
                **({"align_corners": False} if smooth else {}),
            ).clamp_(0.0, 1.0)
        _CACHE[key] = (x.contiguous(), torch.from_numpy(labels))
    return _CACHE[key]


class DigitsDataset(Dataset):
    """The UCI 8x8 digits as a map-style dataset of {"pixel_values", "label", "caption"} dicts."""

    classes = DIGIT_NAMES
    caption_templates = CAPTION_TEMPLATES

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        channels: int = 1,
        captions: bool = True,
        random_flip: bool = False,
        random_captions: bool = False,
        interpolation: str = "bilinear",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        templates: Sequence[str] = CAPTION_TEMPLATES,
        data_path: str | os.PathLike = DIGITS_PATH,
    ):
        """
        :param split: "train" (1,433 images), "test" (364) or "all" (1,797); see the module docstring.
        :param image_size: output height = width; 8 keeps the native resolution.
        :param channels: 1 (grayscale) or 3 (the gray value repeated, for RGB models).
        :param captions: add a "caption" string made from the label with one of ``templates``.
        :param random_flip: horizontal flip with probability 1/2 (mirrors digits, so off by default).
        :param random_captions: pick the template at random per call (training); else index % len(templates).
        :param interpolation: "bilinear", "bicubic" or "nearest" resize from 8x8.
        :param transform: optional callable on the (C, H, W) image in [0, 1] (e.g. a classification transform);
            its output is used as-is. Without it, "pixel_values" are scaled to [-1, 1].
        :param generator: torch RNG for flips and random captions; None uses the global RNG, which a DataLoader
            seeds per worker. With num_workers > 0 leave it None: each worker would copy one generator state
            and repeat the others' draws.
        """
        check_choice("split", split, SPLITS)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= 4096:
            fail("image_size", image_size, "an int in [1, 4096] (8 is the native resolution)")
        check_choice("channels", channels, (1, 3))
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        if len(templates) == 0:
            fail("templates", templates, "a non-empty sequence of format strings with {name} and/or {digit}")
        self.split, self.image_size, self.channels = split, image_size, channels
        self.captions, self.random_flip, self.random_captions = captions, random_flip, random_captions
        self.transform, self.generator, self.templates = transform, generator, tuple(templates)
        images, labels = load_digits(image_size, interpolation, data_path)
        idx = torch.from_numpy(split_indices(labels, split))
        self._unit_images = images[idx]  # (N, 1, H, W) in [0, 1]: this split only (a copy)
        self.labels = labels[idx]  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> torch.Tensor:
        """The whole split as one (N, C, H, W) float32 batch in [-1, 1], without flips (for metrics)."""
        return (self._unit_images * 2 - 1).expand(-1, self.channels, -1, -1).contiguous()

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index={index} is out of range for a {self.split} split of {len(self)} images")
        index = index % len(self)
        x = self._unit_images[index].expand(self.channels, -1, -1)  # (C, H, W) in [0, 1]
        if self.random_flip and bool(torch.rand((), generator=self.generator) < 0.5):
            x = x.flip(-1)
        x = self.transform(x) if self.transform is not None else x * 2 - 1
        label = int(self.labels[index])
        item = {"pixel_values": x.contiguous(), "label": label}
        if self.captions:
            t = pick_template(index, len(self.templates), self.random_captions, self.generator)
            item["caption"] = digit_caption(label, t, self.templates)
        return item
