"""Reference features cached on disk, keyed by everything that determines them.

The key holds the extractor's name and the SHA-256 of its weights (not a directory name: a second classifier saved
at the same path is a different key), the reference source (the folder's absolute path and a fingerprint of its
file list, sizes and modification times; or the embedded digits and their split), the resolution, the channels,
the resize policy and the number of images. A cache directory holds one ``ref-<hash of key>.npz`` per key, so a
changed run computes fresh features instead of reading stale ones; a cache FILE given explicitly is read only
when its key matches, else refused with the fields that differ. Files are plain arrays (``allow_pickle=False``),
written atomically.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np

from visionformers._validate import fail

CACHE_FORMAT = 1  # bump when the layout changes: older files are then refused, not misread


def reference_key(extractor, source: str, *, resolution: int, channels: int, resize: str, num_images: int) -> dict:
    """The cache key of one extractor's features of one reference set (``source`` names the set and its split)."""
    if not getattr(extractor, "fingerprint", ""):
        fail("extractor", getattr(extractor, "name", type(extractor).__name__),
             "an extractor with a 'fingerprint' (its weights' hash, set by build_feature_extractor / "
             "dinov2_features): without one, two networks could share a cache entry")
    return {
        "format": CACHE_FORMAT, "extractor": getattr(extractor, "name", type(extractor).__name__),
        "extractor_weights_sha256": extractor.fingerprint, "source": source,
        "resolution": int(resolution), "channels": int(channels), "resize": resize, "num_images": int(num_images),
    }


def cache_file(cache: str | os.PathLike, key: dict) -> str:
    """``cache`` itself when it names a .npz file, else ``cache/ref-<hash of key>.npz``."""
    cache = os.fspath(cache)
    if cache.endswith(".npz"):
        return cache
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache, f"ref-{digest}.npz")


def save_reference(path: str | os.PathLike, key: dict, features: dict[str, np.ndarray]) -> None:
    """Write ``features`` (name -> array) with their key; atomic (temporary file, fsync, rename)."""
    from visionformers._io import atomic_write_bytes

    path = os.fspath(path)
    if "key" in features:
        fail("features", sorted(features), "feature names other than 'key'")
    buf = io.BytesIO()
    np.savez(buf, key=np.str_(json.dumps(key, sort_keys=True)), **features)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_reference(path: str | os.PathLike, key: dict) -> dict[str, np.ndarray]:
    """Features cached at ``path``; a file made for another key is refused, naming each field that differs."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference cache {path!r} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile) or "key" not in z.files:
            raise ValueError("no key")
        with z:
            stored = json.loads(str(z["key"]))
            arrays = {k: z[k] for k in z.files if k != "key"}
    except (ValueError, OSError, EOFError, json.JSONDecodeError):
        fail("reference cache", path, "a .npz written by save_reference (with its key)")
    diff = [f"{k}: {stored.get(k)!r} in the cache, {v!r} in this run" for k, v in key.items() if stored.get(k) != v]
    if diff:
        raise ValueError(f"reference cache {path!r} was made for another setting ({'; '.join(diff)}); pass a cache "
                         "directory (one file per setting) or delete the file")
    return arrays
