"""Sampling many images reproducibly, on one process or split over many, plus grid / PNG helpers.

Image ``i`` is drawn from its own generator seeded with ``seed + i`` (its starting noise, and the per-step noise
of a stochastic sampler). Images are cut into fixed chunks of ``batch_size`` by index and chunk ``j`` runs on
process ``j % num_processes``, so every chunk sees the same batch whatever the process count: the result is
bit-identical on 1 or N processes.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visionformers import diffusion


def chunks(num_images: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]


def sample_chunk(
    model: Callable,
    indices: range | list[int],
    sched,
    shape: tuple[int, ...],
    *,
    seed: int,
    cond: dict | None = None,
    uncond: dict | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor:
    """Images ``indices`` (len(indices), *shape) in [-1, 1] from ``visionformers.diffusion.sample``; image i uses its
    own CPU generator seeded with ``seed + i`` (its starting noise and a stochastic sampler's per-step noise).

    ``cond`` / ``uncond`` hold the model inputs of these images (batch dim = len(indices)); ``kwargs`` go to
    ``diffusion.sample`` (sampler, steps, prediction_type, guidance_scale, guidance_rescale, guidance_interval).
    """
    gens = [torch.Generator().manual_seed(seed + i) for i in indices]
    return diffusion.sample(model, (len(gens), *shape), sched, generator=gens, device=device,
                            uncond=uncond or None, **kwargs, **(cond or {})).float()


def sample_distributed(
    model: Callable,
    num_images: int,
    batch_size: int,
    make_inputs: Callable[[range], tuple[dict, dict | None]],
    *,
    accelerator=None,
    collective_model: bool = False,
    progress: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """All ``num_images`` images, chunked by index and spread over processes; the main process gets the
    (N, C, H, W) CPU tensor in index order, the others None.

    :param make_inputs: chunk indices -> (cond, uncond) model inputs for those images.
    :param collective_model: True when a forward is a collective (FSDP): every process then runs the same
        number of chunks, repeating its last one as padding.
    :param kwargs: passed to :func:`sample_chunk` (sched, shape, seed, sampler, steps, ...).
    """
    from tqdm.auto import tqdm

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    all_chunks = chunks(num_images, batch_size)
    mine = all_chunks[rank::world]
    rounds = math.ceil(len(all_chunks) / world) if collective_model else len(mine)
    results = []
    for r in tqdm(range(rounds), desc="sampling", disable=not (progress and rank == 0), leave=False):
        idx = mine[min(r, len(mine) - 1)] if mine else all_chunks[0]
        cond, uncond = make_inputs(idx)
        images = sample_chunk(model, idx, cond=cond, uncond=uncond, **kwargs).cpu()
        if r < len(mine):
            results.append((list(idx), images))
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    if rank != 0:
        return None
    ordered = sorted(((i, img) for idx, imgs in results for i, img in zip(idx, imgs)), key=lambda p: p[0])
    return torch.stack([img for _, img in ordered])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8; non-finite values (a diverged sampler) are a ValueError
    rather than black pixels."""
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ValueError(f"the sampled images hold {bad} non-finite value(s) (NaN or inf) of {images.numel()}: the "
                         "sampler diverged, so no image is written; try another --sampler, a lower --guidance_scale "
                         "or more --num_inference_steps, or check the model's weights")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, upscale: int = 1) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one PIL image, ``nrow`` images per row (default: ~square), ``upscale``d by
    nearest-neighbour so tiny digits stay visible."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]  # (H, W, C) tile
    img = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return img


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically, with the umask's mode (``visionformers._io.atomic_write``)."""
    from visionformers._io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
