"""Rotary position embeddings (Su et al. 2021, "RoFormer", eq. 34): 1D and axial 2D.

Both produce (cos, sin) tables of shape (N, head_dim) that ``apply_rotary`` applies to q and k in the
"rotate half" layout (pairs (i, i + D/2)), so q_m . k_n depends only on m - n.
"""
from __future__ import annotations

import torch
from torch import nn

from visionformers._validate import check_number, fail, is_int

__all__ = ["apply_rotary", "rotate_half", "RotaryEmbedding", "RotaryEmbedding2D"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., N, D) by position: x * cos + rotate_half(x) * sin; cos/sin broadcast to x.

    When cos covers fewer channels than D (partial rotary), the remaining channels pass unchanged.
    """
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :d], x[..., d:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class RotaryEmbedding(nn.Module):
    """1D RoPE: theta_i = base^(-2i/D); position m rotates pair i by m * theta_i."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if not is_int(dim) or dim <= 0 or dim % 2:
            fail("dim", dim, "an even rotary dimension")
        check_number("base", base, above=0)
        self.dim = dim
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor | int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int N (for offset..offset+N-1) or a (N,) tensor -> (cos, sin), each (N, dim)."""
        if isinstance(positions, int):
            positions = torch.arange(offset, offset + positions, device=self.inv_freq.device)
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (N, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (N, D) in rotate-half layout
        return angles.cos(), angles.sin()


class RotaryEmbedding2D(nn.Module):
    """Axial 2D RoPE for image tokens (Heo et al. 2024, "Rotary Position Embedding for ViT", eq. 9).

    Half of each head's channels rotate with the row index, the other half with the column index, so
    q . k depends only on the 2D offset between patches. Works for any (H, W) grid, non-square too.
    """

    def __init__(self, dim: int, base: float = 100.0):
        super().__init__()
        if not is_int(dim) or dim <= 0 or dim % 4:
            fail("dim", dim, "a head dimension divisible by 4 for axial 2D RoPE")
        check_number("base", base, above=0)
        self.dim = dim
        quarter = dim // 4
        inv_freq = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, grid_size: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cos, sin) of shape (num_prefix + H*W, dim); prefix tokens (cls, registers) get no rotation."""
        h, w = grid_size
        rows = torch.arange(h, device=self.inv_freq.device).float()
        cols = torch.arange(w, device=self.inv_freq.device).float()
        ry = rows[:, None, None] * self.inv_freq  # (H, 1, D/4)
        rx = cols[None, :, None] * self.inv_freq  # (1, W, D/4)
        half = torch.cat((ry.expand(h, w, -1), rx.expand(h, w, -1)), dim=-1).reshape(h * w, -1)  # (HW, D/2)
        angles = torch.cat((half, half), dim=-1)  # (HW, D) rotate-half layout
        cos, sin = angles.cos(), angles.sin()
        if num_prefix_tokens:
            cos = torch.cat((cos.new_ones(num_prefix_tokens, self.dim), cos))
            sin = torch.cat((sin.new_zeros(num_prefix_tokens, self.dim), sin))
        return cos, sin
