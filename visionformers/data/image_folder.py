"""A user's own images: a torchvision ``ImageFolder`` tree (class subfolders) or one flat folder.

Layouts
- class folders: ``root/<class>/**/<image>``; classes are the sorted subfolder names, labels their indices
  (as torchvision's ImageFolder). Images lying directly in ``root`` are then ignored (counted in a warning).
- flat: images directly in ``root`` (not recursive) and no subfolder holding images; unconditional, every
  label is -1 (an int rather than None, so torch's default_collate still batches it).

Images: links to folders are followed, each folder once (a link loop does not repeat images); 16-bit images
(PIL "I;16") are scaled to 8 bits; transparent pixels are composited onto white. One warning at construction
counts images with transparency and images smaller than ``resolution`` (upscaled), beside skipped broken files.

Captions, first match wins: the JSON-lines ``captions_file`` (see ``visionformers.data.captions``), then a
``<image stem>.txt`` file beside the image, then the class name with "_" read as a space (class folders)
or "" (flat).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from visionformers._validate import check_choice, fail
from visionformers.data.captions import load_captions, read_sidecar_caption
from visionformers.data.transforms import diffusion_train_transform

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
CHECKS = ("verify", "load", "none")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _images_under(folder: str) -> list[str]:
    """Every image file below ``folder``, sorted, following the same walk as torchvision's ImageFolder; links to
    folders are followed, but a folder already visited (a link loop, or two links to one folder) only once."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    return found


def find_images(root: str) -> tuple[list[str], list[int], list[str], int]:
    """(paths, labels, classes, ignored top-level images) for ``root``; see the module docstring for layouts."""
    entries = sorted(os.listdir(root))
    top_images = [os.path.join(root, e) for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    per_class = {d: _images_under(os.path.join(root, d)) for d in subdirs}
    classes = [d for d in subdirs if per_class[d]]
    if classes:
        paths = [p for c in classes for p in per_class[c]]
        labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
        return paths, labels, classes, len(top_images)
    return top_images, [-1] * len(top_images), [], 0


def folder_fingerprint(paths: list[str], root: str) -> str:
    """SHA-256 over each image's path relative to ``root``, size and modification time, in order: the key of
    caches of a folder's images (latent caches, reference features), which changes when a file does."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _inspect(path: str, check: str) -> tuple[bool, str, tuple[int, int]]:
    """(readable, PIL mode, (width, height)) from the header; with ``check`` an integrity check: PIL's verify()
    reads the header and, for PNG, every chunk's CRC; "load" decodes the whole image."""
    try:
        with Image.open(path) as im:
            mode, size = _alpha_mode(im), im.size
            if check != "none":
                im.verify() if check == "verify" else im.load()
        return True, mode, size
    except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for broken files
        return check == "none", "", (0, 0)


def _alpha_mode(im: Image.Image) -> str:
    """The image's mode, reported as "RGBA" for a palette image with transparency."""
    return "RGBA" if im.mode == "P" and "transparency" in im.info else im.mode


HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
BACKGROUND = 255  # transparent pixels become white, as a viewer shows them on a white page


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    """``im`` as "RGB" or "L": 16-bit images scaled to 8 bits (PIL's convert clips them to white), transparency
    composited onto a white background (PIL's convert drops alpha, leaving what the hidden pixels hold)."""
    if im.mode in HIGH_BIT_MODES:
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "I" and arr.max(initial=0) > 65535:
            scale = 255.0 / max(arr.max(), 1.0)  # a 32-bit image: its own range
        else:
            scale = 255.0 / 65535.0
        im = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    elif _alpha_mode(im) in ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,))
        im = Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert(mode)


class ImageFolderDataset(Dataset):
    """User images as a map-style dataset of {"pixel_values", "label", "caption"} dicts."""

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        captions_file: str | os.PathLike | None = None,
        channels: int = 3,
        interpolation: str = "bilinear",
        transform: Callable | None = None,
        check: str = "verify",
    ):
        """
        :param root: a folder in one of the two layouts of the module docstring.
        :param resolution: output height = width (short side resized, then a square crop).
        :param center_crop: center crop; False takes a random crop (training).
        :param random_flip: horizontal flip with probability 1/2.
        :param captions_file: optional JSON-lines file of {"file_name", "text"} rows, paths relative to root.
        :param channels: 3 (PIL "RGB") or 1 (PIL "L").
        :param transform: optional callable on the PIL image replacing the default
            resize/crop/flip/[-1, 1] pipeline (e.g. ``classification_train_transform``).
        :param check: construction-time integrity check: "verify" (PIL verify, cheap), "load" (full decode,
            slow but catches truncated JPEGs), "none". Failing files are skipped with one warning.
        """
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"root={root!r} is not an existing folder")
        check_choice("channels", channels, (1, 3))
        check_choice("check", check, CHECKS)
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            fail("resolution", resolution, "a positive int (pixels)")
        paths, labels, self.classes, ignored = find_images(root)
        if not paths:
            raise ValueError(
                f"root={root!r} holds no images; expected files with extensions {list(IMG_EXTENSIONS)} directly "
                "in it (flat layout) or in class subfolders"
            )
        found = [_inspect(p, check) for p in paths]
        ok = [good for good, _, _ in found]
        bad = [p for p, good in zip(paths, ok) if not good]
        alpha = sum(good and mode in ALPHA_MODES for good, mode, _ in found)
        small = sum(good and 0 < min(size) < resolution for good, _, size in found)
        self.root, self.channels = root, channels
        self.paths = [p for p, good in zip(paths, ok) if good]
        self.labels = [lab for lab, good in zip(labels, ok) if good]
        self.num_skipped = len(bad)
        notes = []
        if bad:
            shown = ", ".join(os.path.relpath(p, root) for p in bad[:5]) + (", ..." if len(bad) > 5 else "")
            notes.append(f"skipped {len(bad)} unreadable or truncated image(s) ({shown})")
        if ignored:
            notes.append(f"ignored {ignored} image(s) directly in root (class-folder layout uses subfolders only)")
        if alpha:
            notes.append(f"{alpha} image(s) have transparency: composited onto a white background")
        if small:
            notes.append(f"{small} of {len(self.paths)} image(s) are smaller than resolution={resolution} and are "
                         "upscaled (blurrier than the rest)")
        if notes:
            warnings.warn(f"ImageFolderDataset({root!r}): " + "; ".join(notes), stacklevel=2)
        if not self.paths:
            raise ValueError(f"root={root!r}: all {len(bad)} images failed the {check!r} check")
        self.captions = load_captions(captions_file) if captions_file is not None else {}
        if captions_file is not None:
            rels = {os.path.relpath(p, root).replace(os.sep, "/") for p in self.paths}
            if not rels & set(self.captions):
                example = f" (e.g. {next(iter(self.captions))!r})" if self.captions else ""
                raise ValueError(f"captions_file={os.fspath(captions_file)!r}: none of its {len(self.captions)} "
                                 f"file_name(s){example} is an image under root={root!r}; file_name is the path "
                                 f"relative to root, e.g. {sorted(rels)[0]!r}")
        self.transform = transform or diffusion_train_transform(resolution, center_crop, random_flip, interpolation)

    def __len__(self) -> int:
        return len(self.paths)

    def caption(self, index: int) -> str:
        """The caption of item ``index`` (see the module docstring for the order of sources)."""
        path = self.paths[index]
        rel = os.path.relpath(path, self.root).replace(os.sep, "/")
        if rel in self.captions:
            return self.captions[rel]
        sidecar = read_sidecar_caption(path)
        if sidecar is not None:
            return sidecar
        label = self.labels[index]
        return self.classes[label].replace("_", " ") if label >= 0 else ""

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                image = to_mode(im, "RGB" if self.channels == 3 else "L")
        except OSError as e:  # a file that passed "verify" yet fails to decode (e.g. a truncated JPEG)
            raise OSError(f"cannot decode image {path!r} ({e}); build the dataset with check='load' to skip it") from e
        return {"pixel_values": self.transform(image), "label": self.labels[index], "caption": self.caption(index)}
