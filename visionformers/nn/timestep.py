"""Noise-level embeddings for diffusion networks: sinusoidal timestep embedding + MLP, and Fourier features."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_bool, check_int, check_number, check_tensor, fail, is_int

__all__ = ["timestep_embedding", "TimestepEmbedding", "FourierFeatures"]


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
) -> torch.Tensor:
    """(B,) possibly fractional timesteps -> (B, dim) sinusoids (Ho et al. 2020, after Vaswani et al. 2017).

    freq_i = max_period^(-i / (half - freq_shift)); output [cos, sin] when ``flip_sin_to_cos`` (DiT, diffusers'
    UNet2DModel) else [sin, cos] (the original DDPM code, with freq_shift=1).
    """
    check_tensor("t", t, ndim=1)
    check_int("dim", dim)
    half = dim // 2
    # freq_i divides by (half - freq_shift): at or past zero the sinusoids are inf / NaN
    check_number("freq_shift", freq_shift, below=half, note=f" (half the embedding dim, {dim} // 2 = {half})")
    check_number("max_period", max_period, above=0)
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * exponent.exp()[None, :]  # (B, half)
    emb = torch.cat((angles.cos(), angles.sin()) if flip_sin_to_cos else (angles.sin(), angles.cos()), dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of t followed by Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, freq_dim: int = 256, flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
        super().__init__()
        check_int("dim", dim)
        check_int("freq_dim", freq_dim)
        check_bool("flip_sin_to_cos", flip_sin_to_cos)
        check_number("freq_shift", freq_shift, below=freq_dim // 2,
                     note=f" (half the timestep features, freq_dim // 2 = {freq_dim // 2})")
        self.freq_dim, self.flip_sin_to_cos, self.freq_shift = freq_dim, flip_sin_to_cos, freq_shift
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, dim)."""
        emb = timestep_embedding(t, self.freq_dim, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        return self.project(emb)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The MLP alone: (B, freq_dim) features of t (sinusoids, or other features such as Fourier) -> (B, dim)."""
        return self.linear_2(F.silu(self.linear_1(features.to(self.linear_1.weight.dtype))))


class FourierFeatures(nn.Module):
    """Random Fourier features [sin(2 pi W t), cos(2 pi W t)] with fixed W ~ N(0, scale^2)
    (Tancik et al. 2020; used for continuous noise levels by Song et al. 2021)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if not is_int(dim) or dim < 2 or dim % 2:
            fail("dim", dim, "an even int >= 2 (sin and cos halves)")
        check_number("scale", scale, above=0)
        self.register_buffer("weight", torch.randn(dim // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, dim)."""
        angles = 2 * math.pi * t.float()[:, None] * self.weight[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)
