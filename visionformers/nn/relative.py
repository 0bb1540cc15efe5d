"""Relative position biases: ALiBi, T5 buckets and the Swin window table, each an additive attention bias."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["alibi_slopes", "alibi_bias", "t5_relative_position_bucket", "T5RelativeBias", "WindowRelativeBias",
           "window_relative_index"]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Head slopes 2^(-8i/n) for n a power of two, interleaved otherwise (Press et al. 2022, sec. 3)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start**i for i in range(1, n + 1)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_two(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


def alibi_bias(num_heads: int, num_queries: int, num_keys: int, device=None) -> torch.Tensor:
    """(1, H, Nq, Nk) bias -slope_h * |i - j| (queries aligned to the end of the keys)."""
    qpos = torch.arange(num_queries, device=device)[:, None] + (num_keys - num_queries)
    dist = (qpos - torch.arange(num_keys, device=device)[None, :]).abs()
    return -alibi_slopes(num_heads).to(device)[None, :, None, None] * dist[None, None]


def t5_relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucketing of key - query offsets (Raffel et al. 2020, sec. 2.1): exact for small offsets, log-spaced
    up to ``max_distance``; bidirectional buckets split the range by sign."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


class T5RelativeBias(nn.Module):
    """Learned per-head scalar for each relative-position bucket; computed once and shared by all layers."""

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, num_queries: int, num_keys: int, offset: int | None = None) -> torch.Tensor:
        """-> (1, H, Nq, Nk); queries sit at positions offset.. (default: aligned to the end of the keys)."""
        offset = num_keys - num_queries if offset is None else offset
        device = self.embedding.weight.device
        qpos = torch.arange(offset, offset + num_queries, device=device)[:, None]
        kpos = torch.arange(num_keys, device=device)[None, :]
        buckets = t5_relative_position_bucket(kpos - qpos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1)[None]  # (1, H, Nq, Nk)


def window_relative_index(window: tuple[int, int], table_window: tuple[int, int]) -> torch.Tensor:
    """(N, N) rows of a (2Th-1)(2Tw-1) relative-position table for the offsets of a (Wh, Ww) window, N = Wh * Ww;
    the window may be smaller than the table's (Th, Tw) (Liu et al. 2021, sec. 3.2, "relative position bias")."""
    (wh, ww), (th, tw) = window, table_window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): offsets in [-(W-1), W-1]
    return (rel[0] + th - 1) * (2 * tw - 1) + (rel[1] + tw - 1)


class WindowRelativeBias(nn.Module):
    """Swin's relative position bias table over a (Wh, Ww) window (Liu et al. 2021, eq. 4)."""

    def __init__(self, window_size: tuple[int, int], num_heads: int):
        super().__init__()
        wh, ww = window_size
        self.window_size, self.num_heads = (wh, ww), num_heads
        self.table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.register_buffer("index", window_relative_index(self.window_size, self.window_size), persistent=False)

    def forward(self, window: tuple[int, int] | None = None) -> torch.Tensor:
        """-> (H, N, N) for the table's window, or for a smaller ``window`` (a stage grid smaller than the table's)."""
        index = self.index if window in (None, self.window_size) else window_relative_index(window, self.window_size)
        n = index.shape[0]
        return self.table[index.flatten().to(self.table.device)].view(n, n, -1).permute(2, 0, 1)  # (H, N, N)
