"""The evaluation protocol: features over processes, every metric from them, small sample sizes flagged.

Features: image indices are cut into fixed chunks of ``batch_size`` and chunk ``j`` runs on process
``j % num_processes`` (as sampling does), so every chunk is the same batch whatever the process count and the
gathered features, hence every figure, are the same on 1 or N processes.

Standard protocol (ADM, Dhariwal & Nichol 2021; EDM2, Karras et al. 2024): 50,000 generated images for FID,
sFID, IS, KID and FD-DINOv2, against the reference set's statistics; 10,000 reference images for precision /
recall. A figure from fewer images carries a note saying so.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from visionformers._validate import check_choice, fail
from visionformers.metrics.features import extractor_outputs
from visionformers.metrics.fid import MetricResult, compute_statistics, frechet_distance, kid_from_features
from visionformers.metrics.inception_score import inception_score
from visionformers.metrics.precision_recall import precision_recall

METRICS = ("fid", "kid", "is", "sfid", "pr", "fd_dinov2")
FEATURE_OF = {"fid": "pool", "kid": "pool", "is": "logits", "sfid": "spatial", "pr": "pool", "fd_dinov2": "dinov2"}
PROTOCOL_FAKE = 50_000  # generated images of every metric's standard protocol
PROTOCOL_REAL = 10_000  # reference images below which a figure is flagged (P/R: ADM's 10,000 reference batch)


def extract_distributed(
    num_images: int,
    load_chunk: Callable[[range], torch.Tensor],
    extractors: Sequence,
    batch_size: int,
    *,
    accelerator=None,
    device: str | torch.device = "cpu",
    keep_uint8: bool = False,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Every extractor's outputs for images ``0 .. num_images - 1``, on every process, in index order.

    :param load_chunk: indices -> (B, C, H, W) images in [-1, 1] (read or sampled on the process that runs it).
    :param extractors: each output name ("pool", "logits", ...) is prefixed with ``"<i>."`` for extractor i.
    :param keep_uint8: also return the images as "images", (N, H, W, C) uint8 (an ADM-style sample batch).
    """
    from tqdm.auto import tqdm

    from visionformers.training.sampling import chunks, to_uint8

    if num_images < 1:
        fail("num_images", num_images, "at least 1 image")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = chunks(num_images, batch_size)[rank::world]
    results = []
    with torch.no_grad():
        for idx in tqdm(mine, desc="features", disable=not (progress and rank == 0), leave=False):
            images = load_chunk(idx).to(device, torch.float32)
            if images.ndim != 4 or images.shape[0] != len(idx):
                fail("images", images, f"a (B, C, H, W) batch of the {len(idx)} requested images")
            out = {f"{i}.{k}": v.float().cpu().numpy()
                   for i, ext in enumerate(extractors) for k, v in extractor_outputs(ext, images).items()}
            if keep_uint8:
                out["images"] = to_uint8(images.cpu())
            results.append((idx.start, out))
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    results.sort(key=lambda r: r[0])
    return {k: np.concatenate([r[1][k] for r in results]) for k in results[0][1]}


def protocol_note(metric: str, num_real: int, num_fake: int) -> str:
    """Why a figure is below the standard protocol ('' when it is not)."""
    short = []
    if metric != "is" and num_real < PROTOCOL_REAL:
        short.append(f"real n={num_real} < {PROTOCOL_REAL:,}")
    if num_fake < PROTOCOL_FAKE:
        short.append(f"fake n={num_fake} < {PROTOCOL_FAKE:,}")
    return "below the standard protocol: " + ", ".join(short) if short else ""


def compute_metric(
    metric: str,
    real: dict[str, np.ndarray],
    fake: dict[str, np.ndarray],
    extractor: str,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    k: int = 3,
    device: str | torch.device = "cpu",
) -> list[MetricResult]:
    """One metric (two for "pr") between feature dicts keyed like ``FEATURE_OF``'s values, with its note."""
    check_choice("metric", metric, METRICS)
    key = FEATURE_OF[metric]
    if key not in fake or (metric != "is" and key not in real):
        fail("metric", metric, f"features {key!r}, which this extractor does not give ({extractor}); "
             "IS and sFID need an inception:PATH extractor, FD-DINOv2 needs --dinov2")
    f = fake[key]
    n_real, n_fake = (len(real[key]) if key in real else 0), len(f)
    note = protocol_note(metric, n_real, n_fake)

    def result(name, value, std=None):
        return MetricResult(name, value, n_real, n_fake, std=std, extractor=extractor, note=note)

    if metric == "is":
        return [result("IS", *inception_score(f, is_splits))]
    if metric == "kid":
        return [result("KID", *kid_from_features(real[key], f, kid_subsets, kid_subset_size))]
    if metric == "pr":
        precision, recall = precision_recall(real[key], f, k=k, device=device)
        return [result(f"precision(k={k})", precision), result(f"recall(k={k})", recall)]
    r, g = compute_statistics(real[key], keep_features=False), compute_statistics(f, keep_features=False)
    name = {"fid": "FID", "sfid": "sFID", "fd_dinov2": "FD-DINOv2"}[metric]
    return [result(name, frechet_distance(r.mu, r.sigma, g.mu, g.sigma))]


def split_in_two(features: dict[str, np.ndarray], seed: int = 0) -> tuple[dict, dict]:
    """The reference set cut in two halves by a seeded permutation (folders are often sorted by class)."""
    n = len(next(iter(features.values())))
    if n < 4:
        fail("reference", f"{n} images", "at least 4 images for a real-vs-real baseline")
    perm = np.random.default_rng(seed).permutation(n)
    a, b = perm[: n // 2], perm[n // 2 :]
    return {k: v[a] for k, v in features.items()}, {k: v[b] for k, v in features.items()}
