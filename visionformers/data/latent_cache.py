"""Latents of a dataset encoded once by a VAE, cached on disk, reused by every later run and resume.

A denoiser trained in latent space (Rombach et al. 2022) reads the VAE's posterior for each image at every
step; encoding it once (as DiT's and fast-DiT's feature extraction does) takes the encoder off the training
loop. The cache holds, per image, the scaled posterior mean and standard deviation,
``(mean - shift_factor) * scaling_factor`` and ``std * scaling_factor``, so a training step draws a fresh latent
``mean + std * eps`` from its own generator. With ``flips`` the mirrored image is encoded too and cached as a
latent of its own; an item then picks one of the two at random (DiT's horizontal-flip augmentation).

Layout of a cache directory::

    manifest.json                         the key (below), the shard size and each shard's sha256
    shard-<key[:12]>-<k>.safetensors      items [k * shard_size, (k + 1) * shard_size): "moments" (n, F, 2, C, h, w)

The key is a hash of the VAE's weights and config, the data (source, file list with sizes and times, or the
embedded digits) and the transform settings. Shards are spread over processes (shard k is written by process
k % world), each written atomically; the main process then writes the manifest atomically. A later run reuses
every shard whose checksum matches the manifest of the same key; a cache of another key is rebuilt, and a
missing, partial or corrupt shard re-encoded, each with the reason printed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from visionformers._io import atomic_write_bytes, sha256_file
from visionformers._validate import check_int, check_path, fail
from visionformers.data.image_folder import folder_fingerprint
from visionformers.hub import save_state_dict

__all__ = ["LatentDataset", "build_latent_cache", "folder_fingerprint", "vae_fingerprint", "posterior_sample"]

MANIFEST = "manifest.json"
CACHE_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20  # a manifest of a few million shards' checksums is far below this


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 of the VAE's config and every weight (names, dtypes, shapes and bytes, in name order)."""
    import dataclasses

    h = hashlib.sha256(json.dumps(dataclasses.asdict(vae.config), sort_keys=True).encode())
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()




def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_manifest(directory: Path) -> dict | None:
    """The manifest as a dict, or None when absent or unreadable (the cache is then rebuilt)."""
    path = directory / MANIFEST
    if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    ok = (isinstance(manifest, dict) and isinstance(manifest.get("key"), dict)
          and isinstance(manifest.get("shards"), list) and all(isinstance(s, str) for s in manifest["shards"]))
    return manifest if ok else None


def _differences(old: dict, new: dict) -> str:
    names = {"vae": "another VAE (weights or config)", "data": "other data", "transform": "other transform settings",
             "flips": "flips on/off", "num_items": "another number of images", "latent_shape": "another latent shape",
             "shard_size": "another shard size", "version": "another cache version"}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(names.get(k, k) for k in diff)


def _shard_name(key_hash: str, k: int) -> str:
    return f"shard-{key_hash[:12]}-{k:06d}.safetensors"


@torch.no_grad()
def _encode_shard(vae, dataset: Dataset, lo: int, hi: int, flips: bool, batch_size: int, device) -> torch.Tensor:
    """Scaled posterior moments of items [lo, hi) -> (n, F, 2, C, h, w) float32, F = 2 with flips, else 1."""
    out = []
    for start in range(lo, hi, batch_size):
        x = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(hi, start + batch_size))])
        views = [x, x.flip(-1)] if flips else [x]  # (B, C, H, W) each
        moments = []
        for v in views:
            post = vae.encode(v.to(device, vae.conv_dtype))
            mean = vae.scale_latents(post.mean)
            std = post.std * vae.config.scaling_factor
            moments.append(torch.stack([mean, std], dim=1).float().cpu())  # (B, 2, C, h, w)
        out.append(torch.stack(moments, dim=1))  # (B, F, 2, C, h, w)
    return torch.cat(out)


def build_latent_cache(
    directory: str | os.PathLike,
    vae: torch.nn.Module,
    dataset: Dataset,
    key: dict,
    *,
    flips: bool = False,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    shard_size: int = 4096,
    log: Callable[[str], None] = print,
) -> LatentDataset:
    """Encode ``dataset`` (items with "pixel_values" in [-1, 1], no random augmentation) into ``directory``
    unless a valid cache of the same key is there; every process calls this, ``barrier`` syncs them.

    :param key: JSON-able description of the data and transform settings ({"data": ..., "transform": ...});
        the VAE's fingerprint, ``flips``, the item count and the latent shape are added here.
    :returns: a :class:`LatentDataset` over the cache (conditions read from ``dataset``).
    """
    check_path("directory", directory)
    check_int("batch_size", batch_size)
    check_int("shard_size", shard_size)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        fail("directory", str(directory), "a directory for the latent cache (this path is a file)")
    n = len(dataset)
    check_int("len(dataset)", n)
    c, f = vae.config, vae.config.factor
    size = dataset[0]["pixel_values"].shape[-1]
    if size % f:
        fail("dataset resolution", size, f"a multiple of the VAE's factor {f}")
    full_key = {"version": CACHE_VERSION, "vae": vae_fingerprint(vae), **key, "flips": bool(flips), "num_items": n,
                "latent_shape": [c.latent_channels, size // f, size // f], "shard_size": shard_size}
    key_hash = _key_hash(full_key)
    num_shards = math.ceil(n / shard_size)
    names = [_shard_name(key_hash, k) for k in range(num_shards)]
    manifest = _read_manifest(directory)
    same_key = manifest is not None and manifest["key"] == full_key and len(manifest["shards"]) == num_shards
    if manifest is None and directory.exists() and any(directory.glob("shard-*.safetensors")):
        reason = "its manifest is missing or unreadable"
    elif manifest is not None and not same_key:
        reason = f"it was built with {_differences(manifest['key'], full_key) or 'another layout'}"
    else:
        reason = None
    if reason and rank == 0:
        log(f"latent cache {str(directory)!r}: rebuilding, {reason}")
    directory.mkdir(parents=True, exist_ok=True)
    was_training = vae.training
    vae.eval()
    encoded = 0
    for k in range(rank, num_shards, world):
        path = directory / names[k]
        if same_key:
            if not path.is_file():
                why = "missing"
            elif sha256_file(path) != manifest["shards"][k]:
                why = "corrupt or partial (checksum mismatch)"
            else:
                continue
            log(f"latent cache {str(directory)!r}: shard {k} is {why}; encoding it again")
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        save_state_dict({"moments": _encode_shard(vae, dataset, lo, hi, flips, batch_size, device)}, path)
        encoded += hi - lo
    vae.train(was_training)
    barrier()
    if rank == 0:
        shards = [sha256_file(directory / name) for name in names]
        if not same_key or shards != manifest["shards"]:
            record = {"key": full_key, "shards": shards}
            atomic_write_bytes(directory / MANIFEST, json.dumps(record, indent=1).encode())
        for stale in directory.glob("shard-*.safetensors"):  # shards of another key
            if stale.name not in names:
                stale.unlink(missing_ok=True)
        log(f"latent cache {str(directory)!r}: {n} images"
            + (f" ({encoded} encoded here)" if encoded or reason or not same_key else " reused"))
    barrier()
    return LatentDataset(directory, dataset, names, shard_size, n, flips, full_key["latent_shape"])


class LatentDataset(Dataset):
    """Items {"latent_mean", "latent_std"} (C, h, w) from a latent cache, plus the base dataset's "label" and
    "caption". With flips an item is the image or its mirror with probability 1/2 (torch's RNG, which
    ``training.SeededItems`` seeds per item)."""

    def __init__(self, directory: Path, base: Dataset, names: list[str], shard_size: int, num_items: int,
                 flips: bool, latent_shape: list[int]):
        self.directory, self.base, self.names = Path(directory), base, names
        self.shard_size, self.num_items, self.flips = shard_size, num_items, flips
        self.latent_shape = tuple(latent_shape)
        self._handles: dict[int, object] = {}  # opened lazily, per process and DataLoader worker
        for k, name in enumerate(names):  # a shard of the wrong shape is an error here, not deep in a batch
            with safe_open(str(self.directory / name), framework="pt") as fh:
                shape = fh.get_slice("moments").get_shape()
            rows = min(shard_size, num_items - k * shard_size)
            expected = [rows, 2 if flips else 1, 2, *self.latent_shape]
            if list(shape) != expected:
                fail("latent cache shard", name, f"moments of shape {expected}, found {list(shape)}")

    def __len__(self) -> int:
        return self.num_items

    def _conditions(self, index: int) -> dict:
        base = self.base
        if hasattr(base, "caption") and hasattr(base, "labels"):  # an image folder: no image decode needed
            return {"label": base.labels[index], "caption": base.caption(index)}
        item = dict(base[index])  # the embedded digits: items are cheap
        item.pop("pixel_values", None)
        return item

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_items:
            raise IndexError(f"index={index} is out of range for a latent cache of {self.num_items} images")
        k, j = divmod(index, self.shard_size)
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.directory / self.names[k]), framework="pt")
        view = int(torch.rand(()) < 0.5) if self.flips else 0
        moments = self._handles[k].get_slice("moments")[j:j + 1, view:view + 1][0, 0]  # (2, C, h, w)
        return {"latent_mean": moments[0], "latent_std": moments[1], **self._conditions(index)}

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        return {**self.__dict__, "_handles": {}}


def posterior_sample(batch: dict, generator: torch.Generator, device) -> torch.Tensor:
    """A fresh scaled latent per item: latent_mean + latent_std * eps, eps from ``generator`` -> (B, C, h, w)."""
    mean = batch["latent_mean"].to(device, non_blocking=True)
    std = batch["latent_std"].to(device, non_blocking=True)
    eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype).to(device)
    return mean + std * eps
