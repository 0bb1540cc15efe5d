"""Relative global attention: learned relative-position embeddings read by the queries (Shaw et al. 2018;
Huang et al. 2018, the Music Transformer).

Each head h learns one embedding E_r[h, d] (head_dim wide) per key - query distance d, clipped to
[-max_distance, max_distance] (to [-max_distance, 0] when causal, the only distances a causal query sees).
The logits gain S_rel[i, j] = q_i . E_r[clip(j - i)] (Huang et al. 2018, sec. 3.4), scaled as q k^T is:
softmax((q k^T + S_rel) * scale) v. S_rel is computed without the (Nq, Nk, D) tensor of Shaw et al.: the
queries meet the Nq + Nk - 1 distinct distances once, q E^T (B, H, Nq, Nq + Nk - 1), and the "skewing" of
sec. 3.4.1 (pad one column, reshape, slice) moves each row into key order. The result enters the one
attention (``nn.attention.attend``) as its additive ``bias``.

Query positions follow the attention's convention: the Nq queries are the last Nq of the Nk keys, so a
decoding step against a KV cache continues the positions of the cached keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_bool, check_int, fail
from visionformers.nn.attention import Attention

__all__ = ["skew", "relative_logits", "RelativeGlobalAttention"]


def skew(rel: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(..., Nq, Nq + Nk - 1) logits by ascending distance -> (..., Nq, Nk) by key (Huang et al. 2018, sec. 3.4.1).

    Column c of ``rel`` is distance c - (Nk - 1) (the same for every row); query row i sits at position
    Nk - Nq + i, so ``out[i, j] = rel[i, j + Nq - 1 - i]``: pad one zero column on the left, read the flat
    buffer back from offset Nq in rows of Nq + Nk - 1, keep Nk columns. No gather, no (Nq, Nk, D) tensor.
    """
    *lead, nq, width = rel.shape
    flat = F.pad(rel, (1, 0)).reshape(*lead, nq * (width + 1))  # (..., Nq * (W + 1))
    # padded[i, j + Nq - i] sits at flat[i * (W + 1) + j + Nq - i] = flat[Nq + i * W + j]
    return flat[..., nq : nq + nq * width].reshape(*lead, nq, width)[..., :num_keys]


def relative_logits(q: torch.Tensor, table: torch.Tensor, num_keys: int, max_distance: int, causal: bool) -> torch.Tensor:
    """S_rel[i, j] = q_i . E_r[clip(j - pos_i)], skewed: q (B, H, Nq, D), table (H, T, D) -> (B, H, Nq, Nk).

    Queries sit at positions Nk - Nq .. Nk - 1. ``table`` rows are distances -max_distance .. max_distance
    (T = 2 max_distance + 1), or -max_distance .. 0 when ``causal`` (T = max_distance + 1; positive distances,
    masked by causality anyway, read the distance-0 row).
    """
    nq = q.shape[-2]
    dist = torch.arange(1 - num_keys, nq, device=q.device)  # every key - query distance, (Nk + Nq - 1,)
    index = dist.clamp(-max_distance, 0 if causal else max_distance) + max_distance  # rows of the table
    rel = q @ table[:, index].transpose(-2, -1).to(q.dtype)  # (B, H, Nq, Nk + Nq - 1): one product per distance
    return skew(rel, num_keys)


class RelativeGlobalAttention(Attention):
    """Self-attention with learned relative-position embeddings per head (Huang et al. 2018, sec. 3.4).

    ``Attention`` with one more additive bias, S_rel * scale, added to any ``bias`` the caller passes; only
    the core ``_attend`` changes, so masks, causality, dropout and the KV cache are the parent's.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, max_distance: int = 128, is_causal: bool = False, **kwargs):
        check_int("max_distance", max_distance)
        check_bool("is_causal", is_causal)
        if kwargs.get("context_dim") is not None:
            fail("context_dim", kwargs["context_dim"], "None: relative positions are for self-attention")
        super().__init__(dim, num_heads, **kwargs)
        self.max_distance, self.causal = max_distance, is_causal
        rows = max_distance + 1 if is_causal else 2 * max_distance + 1
        self.rel_table = nn.Parameter(torch.randn(num_heads, rows, self.head_dim) * self.head_dim**-0.5)  # E_r (H, T, D)

    def forward(self, x, context=None, **kwargs):
        if kwargs.get("queries") is not None:
            fail("queries", kwargs["queries"], "None for relative attention (query positions follow the keys)")
        if kwargs.get("is_causal", False) != self.causal:
            fail("is_causal", kwargs.get("is_causal", False), f"{self.causal}, as this layer was built")
        return super().forward(x, context, **kwargs)

    def _attend(self, q, k, v, mask, bias, is_causal, dropout_p, return_weights):
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        rel = relative_logits(q, self.rel_table, k.shape[-2], self.max_distance, self.causal) * scale  # (B, H, Nq, Nk)
        return super()._attend(q, k, v, mask, rel if bias is None else rel + bias, is_causal, dropout_p, return_weights)
