"""Absolute position embeddings: sinusoidal and learned, 1D and 2D, with resampling to a new grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from visionformers._validate import check_number, fail, is_int

__all__ = [
    "sincos_1d",
    "sincos_2d",
    "SinusoidalPositionEmbedding",
    "LearnedPositionEmbedding",
    "resample_pos_embed",
    "LearnedPositionEmbedding2D",
]


def sincos_1d(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(N,) positions -> (N, dim): [sin(p w_i), cos(p w_i)] with w_i = base^(-2i/dim) (Vaswani et al. 2017, sec. 3.5).

    Layout is sin half then cos half (as MAE / DiT), not interleaved.
    """
    if not is_int(dim) or dim <= 0 or dim % 2:
        fail("dim", dim, "an even embedding dimension")
    check_number("base", base, above=0)
    omega = base ** (-torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]  # (N, D/2)
    return torch.cat((angles.sin(), angles.cos()), dim=1).float()


def sincos_2d(grid_size: tuple[int, int], dim: int, base: float = 10000.0) -> torch.Tensor:
    """(H*W, dim) fixed 2D sin-cos table (MAE, He et al. 2022): half the channels encode x, half y.

    Matches MAE's ``get_2d_sincos_pos_embed``: the first dim/2 channels use the column (x) index.
    """
    if not is_int(dim) or dim <= 0 or dim % 4:
        fail("dim", dim, "an embedding dimension divisible by 4 for 2D sin-cos")
    h, w = grid_size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat((sincos_1d(xs.flatten(), dim // 2, base), sincos_1d(ys.flatten(), dim // 2, base)), dim=1)


class SinusoidalPositionEmbedding(nn.Module):
    """Fixed 1D sinusoidal table, added to (B, N, dim) tokens."""

    def __init__(self, dim: int, max_len: int = 8192, base: float = 10000.0):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("table", sincos_1d(torch.arange(max_len), dim, base), persistent=False)

    def forward(self, num_tokens: int, offset: int = 0) -> torch.Tensor:
        if offset + num_tokens > self.max_len:
            fail("sequence length", offset + num_tokens, f"at most max_len={self.max_len}")
        return self.table[offset : offset + num_tokens]  # (N, dim)


class LearnedPositionEmbedding(nn.Module):
    """Learned 1D table (GPT-2, BERT): one vector per position up to ``max_len``."""

    def __init__(self, max_len: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.randn(max_len, dim) * init_std)

    def forward(self, num_tokens: int, offset: int = 0) -> torch.Tensor:
        if offset + num_tokens > self.max_len:
            fail("sequence length", offset + num_tokens, f"at most max_len={self.max_len} positions of this model")
        return self.weight[offset : offset + num_tokens]  # (N, dim)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a learned (1, P + H*W, C) grid table to ``new_size`` (non-square too), keeping prefix tokens.

    Bicubic with antialiasing, the convention of timm's ``resample_abs_pos_embed``.
    """
    if pos_embed.ndim == 2:
        pos_embed = pos_embed[None]
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(n)
        if side * side != n:
            fail("old_size", None, f"the (H, W) grid of a non-square table with {n} positions")
        old_size = (side, side)
    if old_size[0] * old_size[1] != n:
        fail("old_size", old_size, f"a grid with {n} positions")
    if tuple(new_size) == tuple(old_size):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = rearrange(grid, "1 (h w) c -> 1 c h w", h=old_size[0], w=old_size[1])
    grid = F.interpolate(grid.float(), size=tuple(new_size), mode=mode, antialias=antialias, align_corners=False)
    grid = rearrange(grid, "1 c h w -> 1 (h w) c").to(pos_embed.dtype)
    return torch.cat((prefix, grid), dim=1)


class LearnedPositionEmbedding2D(nn.Module):
    """Learned table over a (H, W) patch grid (+ prefix tokens), resampled when asked for another grid."""

    def __init__(self, grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 0, init_std: float = 0.02):
        super().__init__()
        self.grid_size, self.num_prefix_tokens = tuple(grid_size), num_prefix_tokens
        n = num_prefix_tokens + grid_size[0] * grid_size[1]
        self.weight = nn.Parameter(torch.randn(1, n, dim) * init_std)

    def forward(self, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """-> (1, P + H*W, dim) for ``grid_size`` (the trained grid when None)."""
        if grid_size is None or tuple(grid_size) == self.grid_size:
            return self.weight
        return resample_pos_embed(self.weight, grid_size, self.grid_size, self.num_prefix_tokens)
