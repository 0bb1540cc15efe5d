"""Generated images for evaluation, drawn chunk by chunk from a trained model directory (no PNGs written).

The one place that knows how to sample from a model directory for the metrics: ``evaluate.py --model_path``
calls :func:`model_dir_sampler` and feeds its chunks to the feature extractors as they are drawn.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from visionformers._validate import fail


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> the same images after a round trip through 8-bit pixels, as a PNG or ADM's .npz
    sample batch would store them: the features see what a saved sample would show."""
    from visionformers.training.sampling import to_uint8

    u8 = torch.from_numpy(to_uint8(images.cpu())).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
    return u8.float() / 127.5 - 1


def model_dir_sampler(
    model_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    sampler: str = "ddim",
    steps: int = 50,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    seed: int = 0,
    use_ema: bool = True,
) -> tuple[Callable[[range], torch.Tensor], dict]:
    """(``sample(indices) -> (B, C, H, W)`` 8-bit-quantised images in [-1, 1], ``{"conditioning", "num_classes"}``).

    The model directory is read by ``vf.load_pipeline`` (ours or a diffusers pipeline; latent models are decoded by
    their VAE). Image ``i`` uses seed ``seed + i`` and, for a class-conditional model, class ``i % num_classes``
    (balanced classes); text-conditional models are refused (they need prompts).
    """
    from visionformers import diffusion
    from visionformers.pipeline import load_pipeline
    from visionformers.training import sampling

    pipe = load_pipeline(model_path, device, use_ema=use_ema)
    kind = pipe.conditioning
    if kind == "text":
        fail("model_path", os.fspath(model_path), "a class-conditional or unconditional model (a text-conditional "
             "one needs prompts: sample it with sample_unet.py and evaluate the folder with --fake)")
    diffusion.check_sampler(sampler, pipe.schedule)
    if eta and sampler != "ddim":
        fail("eta", eta, "0 unless sampler is 'ddim'")
    fn = functools.partial(diffusion.sample_ddim, eta=eta) if eta else sampler

    def sample(indices: range) -> torch.Tensor:
        labels = [i % pipe.num_classes for i in indices] if kind == "class" else None
        cond, uncond = pipe.inputs(class_labels=labels, device=device)
        latents = sampling.sample_chunk(
            pipe.denoiser, indices, pipe.schedule, pipe.sample_shape, seed=seed, sampler=fn, steps=steps,
            prediction_type=pipe.prediction_type, guidance_scale=guidance_scale if kind != "none" else 1.0,
            cond=cond, uncond=uncond, device=device)
        return quantize_8bit(pipe.decode(latents).cpu())

    return sample, {"conditioning": kind, "num_classes": pipe.num_classes}


def save_npz(path: str | os.PathLike, images, labels=None) -> None:
    """An ADM-style sample batch: ``arr_0`` (N, H, W, C) uint8 and, for class-conditional samples, ``arr_1`` (N,)
    labels; written atomically."""
    import io

    import numpy as np

    from visionformers._io import atomic_write_bytes

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        fail("images", f"array of shape {images.shape}, dtype {images.dtype}", "an (N, H, W, C) uint8 array")
    buf = io.BytesIO()
    np.savez(buf, images, *([] if labels is None else [np.asarray(labels, dtype=np.int64)]))
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
