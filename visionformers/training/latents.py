"""Latent diffusion in the train and sample scripts: the VAE beside a denoiser, its shapes and its record.

A denoiser trained on a VAE's latents (Rombach et al. 2022) keeps, in its model directory, a copy of the VAE in
``vae/`` and, in ``diffusion.json``, ``"latent": {"vae": "vae", "channels", "size", "factor", "scaling_factor",
"shift_factor"}``; ``"channels"`` and ``"resolution"`` there stay the pixel ones. Sampling draws latents of the
recorded shape and decodes them, so ``sample_unet.py --model_path`` needs no extra flag.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from visionformers._validate import fail

__all__ = ["VAE_DIR", "load_vae", "denoiser_shape", "latent_settings", "sample_shape", "load_latent_decoder",
           "decode_latents", "latent_eval_batch", "latent_cache_key"]

VAE_DIR = "vae"


def load_vae(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """A visionformers AutoencoderKL directory (``save_pretrained``) -> the VAE, frozen, in eval mode."""
    from visionformers.hub import from_pretrained
    from visionformers.vision.autoencoder_kl import AutoencoderKL

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--vae={str(path)!r} is not a directory; expected a VAE saved with "
                                "vf.save_pretrained (e.g. train_vae.py's <output_dir>/model)")
    vae = from_pretrained(path)
    if not isinstance(vae, AutoencoderKL):
        fail("--vae", str(path), f"an AutoencoderKL directory (this one holds a {type(vae).__name__})")
    vae.requires_grad_(False)
    return vae.to(device).eval()


def denoiser_shape(vae: nn.Module, resolution: int, overrides: dict, data_channels: int) -> tuple[int, int]:
    """(in_channels, sample_size) of a denoiser on ``vae``'s latents of ``resolution``-pixel images; an explicit
    ``--model_overrides`` that disagrees, a resolution the VAE cannot divide or images of other channels than
    the VAE's is a ValueError."""
    c = vae.config
    if c.in_channels != data_channels:
        fail("--vae", f"a VAE of {c.in_channels} input channels", f"a VAE for the data's {data_channels} channel(s)")
    if resolution % c.factor:
        fail("--resolution", resolution, f"a multiple of the VAE's downsampling factor {c.factor} (--vae)")
    channels, size = c.latent_channels, resolution // c.factor
    for field, value in (("in_channels", channels), ("sample_size", size)):
        if field in overrides and overrides[field] != value:
            fail(f"--model_overrides {field}", overrides[field],
                 f"{value} or no override: with --vae the denoiser's {field} follows the VAE's latents "
                 f"({c.latent_channels} channels, --resolution {resolution} / factor {c.factor} = {size})")
    return channels, size


def latent_settings(vae: nn.Module, resolution: int) -> dict:
    c = vae.config
    return {"vae": VAE_DIR, "channels": c.latent_channels, "size": resolution // c.factor, "factor": c.factor,
            "scaling_factor": c.scaling_factor, "shift_factor": c.shift_factor}


def sample_shape(settings: dict) -> tuple[int, int, int]:
    """The denoiser's (C, H, W): the latent's when trained on latents, else the pixel image's."""
    latent = settings.get("latent")
    if latent:
        return (latent["channels"], latent["size"], latent["size"])
    return (settings["channels"], settings["resolution"], settings["resolution"])


def load_latent_decoder(model_path: str | os.PathLike, settings: dict, device) -> nn.Module | None:
    """The VAE stored beside a latent denoiser (``<model_path>/vae``), or None for a pixel-space one."""
    latent = settings.get("latent")
    if not latent:
        return None
    vae_dir = Path(model_path) / latent["vae"]
    if latent["vae"] != VAE_DIR or not vae_dir.is_dir():
        raise FileNotFoundError(f"{str(vae_dir)!r} is missing: a latent denoiser needs its VAE in {VAE_DIR}/")
    vae = load_vae(vae_dir, device)
    c = vae.config
    if (c.latent_channels, c.scaling_factor, c.shift_factor) != (latent["channels"], latent["scaling_factor"],
                                                                 latent["shift_factor"]):
        fail("VAE", str(vae_dir), f"the VAE recorded in diffusion.json ({latent})")
    return vae


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, C, H, W) in [-1, 1] on the CPU, ``batch_size`` at a time."""
    out = [vae.decode_latents(z.to(device, vae.conv_dtype)).float().cpu() for z in latents.split(batch_size)]
    return torch.cat(out)


@torch.no_grad()
def latent_eval_batch(vae: nn.Module, batch: dict, device) -> dict:
    """A fixed evaluation batch in latent space: the scaled posterior mean under "pixel_values" (the key the
    evaluation loss reads), from cached latents or encoded here from pixels."""
    if "latent_mean" in batch:
        x = batch["latent_mean"]
    else:
        x = vae.scale_latents(vae.encode(batch["pixel_values"].to(device, vae.conv_dtype)).mean).float().cpu()
    return {**batch, "pixel_values": x}


def latent_cache_key(args, dataset) -> dict:
    """What, besides the VAE, decides a latent cache's content: the data and the transform settings."""
    from visionformers.data.latent_cache import folder_fingerprint

    if args.train_data_dir is None:
        data = {"source": "digits", "split": "train", "num_items": len(dataset)}
    else:
        data = {"source": os.path.abspath(args.train_data_dir), "files": folder_fingerprint(dataset.paths, dataset.root)}
    transform = {"resolution": args.resolution, "center_crop": args.center_crop, "channels": dataset_channels(dataset)}
    return {"data": data, "transform": transform}


def dataset_channels(dataset) -> int:
    return int(dataset[0]["pixel_values"].shape[0])
