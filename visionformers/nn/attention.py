"""The one attention of visionformers.

``attend`` is the only caller of ``F.scaled_dot_product_attention`` in the project; ``attend_math`` is
the plain reference path (softmax(q k^T * scale + bias) v, Vaswani et al. 2017, eq. 1) that can also
return the weights. ``Attention`` wraps them with projections and covers self- and cross-attention,
MHA / GQA / MQA, causal and key-padding masks, additive biases (relative, ALiBi), a KV cache,
rotary embeddings and sliding windows. ``LinearAttention`` and ``DifferentialAttention`` reuse it and
replace only the core ``_attend``.

Conventions: q is (B, H, Nq, D), k and v are (B, Hkv, Nk, D) with H a multiple of Hkv. A boolean
``mask`` is True where a query may attend a key (SDPA's convention) and broadcasts to (B, H, Nq, Nk);
``bias`` is an additive float term broadcasting to the same shape. Causal masks are aligned to the
bottom-right corner, so a query block that follows cached keys sees every earlier key.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from visionformers._validate import check_bool, check_dtype, check_int, check_number, check_probability, fail, is_int
from visionformers.nn.norm import RMSNorm
from visionformers.nn.rope import apply_rotary

__all__ = [
    "attend",
    "attend_math",
    "causal_mask",
    "sliding_window_mask",
    "KVCache",
    "Attention",
    "LinearAttention",
    "DifferentialAttention",
]


def causal_mask(num_queries: int, num_keys: int, device=None) -> torch.Tensor:
    """(Nq, Nk) bool mask, True where key j <= query i, aligned so the last query sees the last key."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(num_keys - num_queries)


def sliding_window_mask(
    num_queries: int, num_keys: int, window_size: int, is_causal: bool, device=None
) -> torch.Tensor:
    """(Nq, Nk) bool band mask of local attention (Beltagy et al. 2020; Mistral's causal window).

    Causal: query i sees keys in (i - window_size, i]. Bidirectional: keys with |i - j| < window_size.
    Query positions are offset by Nk - Nq so that cached keys keep their absolute positions.
    """
    qpos = torch.arange(num_queries, device=device)[:, None] + (num_keys - num_queries)
    kpos = torch.arange(num_keys, device=device)[None, :]
    delta = qpos - kpos  # (Nq, Nk)
    if is_causal:
        return (delta >= 0) & (delta < window_size)
    return delta.abs() < window_size


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, H, N, D) by repeating each kv head for its group of query heads (GQA/MQA)."""
    groups = num_heads // x.shape[1]
    if groups == 1:
        return x
    b, hkv, n, d = x.shape
    return x[:, :, None].expand(b, hkv, groups, n, d).reshape(b, hkv * groups, n, d)


def _merge_masks(
    mask: torch.Tensor | None, bias: torch.Tensor | None, is_causal: bool, nq: int, nk: int, dtype, device
) -> torch.Tensor | None:
    """Fold a bool mask, an additive bias and causality into one SDPA ``attn_mask`` (bool or float)."""
    if is_causal:
        causal = causal_mask(nq, nk, device)
        mask = causal if mask is None else mask & causal
    if bias is None:
        return mask
    bias = bias.to(dtype)
    if mask is None:
        return bias
    return bias.masked_fill(~mask, float("-inf"))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Fused attention through ``F.scaled_dot_product_attention``: (B, H, Nq, D) -> (B, H, Nq, Dv).

    The caller decides ``dropout_p`` (zero outside training). Causal without mask or bias and with
    Nq == Nk takes SDPA's own ``is_causal`` path; a single query against a cache needs no mask at all.
    """
    nq, nk = q.shape[-2], k.shape[-2]
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    if is_causal and nq == 1:
        is_causal = False  # one new token sees every cached key
    if is_causal and mask is None and bias is None and nq == nk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    attn_mask = _merge_masks(mask, bias, is_causal, nq, nk, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def attend_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention, softmax(q k^T * scale + bias) v; returns (out (B,H,Nq,Dv), weights (B,H,Nq,Nk))."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    nq, nk = q.shape[-2], k.shape[-2]
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
    if bias is not None:
        scores = scores + bias
    if is_causal:
        mask = causal_mask(nq, nk, q.device) if mask is None else mask & causal_mask(nq, nk, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights


class KVCache:
    """Keys and values of one attention layer kept across decoding steps.

    Self-attention appends each step's keys (pre-allocated to ``max_len`` when given, so decoding does
    no reallocation); cross-attention stores the projected context once and reuses it.
    """

    def __init__(self, max_len: int | None = None):
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, Hkv, n, D) keys/values; return every key/value so far, (B, Hkv, length, D)."""
        n = k.shape[-2]
        if self.max_len is None:
            self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
            self.length += n
            return self.k, self.v
        if self.length + n > self.max_len:
            fail("kv_cache length", self.length + n, f"at most max_len={self.max_len} cached positions")
        if self.k is None:
            b, h, _, d = k.shape
            self.k = k.new_empty(b, h, self.max_len, d)
            self.v = v.new_empty(b, h, self.max_len, v.shape[-1])
        self.k.narrow(2, self.length, n).copy_(k)  # narrow/copy_: no Python slice parsing per step
        self.v.narrow(2, self.length, n).copy_(v)
        self.length += n
        return self.k.narrow(2, 0, self.length), self.v.narrow(2, 0, self.length)

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep projected cross-attention keys/values (computed once per context)."""
        self.k, self.v, self.length = k, v, k.shape[-2]

    @property
    def filled(self) -> bool:
        return self.k is not None

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search / dropping finished sequences)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


def _as_bool_mask(mask: torch.Tensor, batch: int, nq: int, nk: int, name: str) -> torch.Tensor:
    """Accept (B, Nk) key padding, (B, Nq, Nk) / (Nq, Nk) pair masks or 4D broadcastable masks; -> 4D bool."""
    if not isinstance(mask, torch.Tensor):
        fail(name, type(mask).__name__, "a bool tensor (True = attend)")
    if mask.is_floating_point():
        fail(name, mask, "a bool or 0/1 integer mask (pass additive float terms as `bias`)")
    mask = mask.bool()
    if mask.ndim == 2 and mask.shape == (batch, nk):  # when B == Nq a 2D mask is read as key padding
        return mask[:, None, None, :]  # (B, 1, 1, Nk)
    if mask.ndim == 2 and mask.shape == (nq, nk):
        return mask[None, None]
    if mask.ndim == 3 and mask.shape[1:] == (nq, nk) and mask.shape[0] in (1, batch):
        return mask[:, None]
    if mask.ndim == 4 and mask.shape[0] in (1, batch) and mask.shape[2] in (1, nq) and mask.shape[3] == nk:
        return mask
    fail(name, mask, f"shape (B, Nk)=({batch}, {nk}), (B, Nq, Nk)=({batch}, {nq}, {nk}) or (B, 1|H, Nq|1, Nk)")


class Attention(nn.Module):
    """Multi-head self- or cross-attention with MHA / GQA / MQA, masks, biases, KV cache and RoPE."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_kv_heads: int | None = None,  # None: MHA; 1: MQA (Shazeer 2019); else GQA (Ainslie et al. 2023)
        head_dim: int | None = None,  # None: dim // num_heads; T5-3B uses 128 with dim 1024 and 32 heads
        qkv_bias: bool = False,
        qk_norm: bool = False,  # per-head LayerNorm of q and k (Dehghani et al. 2023, ViT-22B)
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        context_dim: int | None = None,  # set for cross-attention: keys/values come from the context
        proj_bias: bool = True,
        scale: float | None = None,  # None: head_dim**-0.5; T5 uses 1.0
        window_size: int | None = None,  # local attention window (see sliding_window_mask)
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        check_int("dim", dim)
        check_int("num_heads", num_heads)
        for name, value in (("head_dim", head_dim), ("context_dim", context_dim), ("window_size", window_size)):
            check_int(name, value, optional=True)
        for name, value in (("qkv_bias", qkv_bias), ("qk_norm", qk_norm), ("proj_bias", proj_bias)):
            check_bool(name, value)
        check_probability("attn_drop", attn_drop)
        check_probability("proj_drop", proj_drop)
        check_number("scale", scale, above=0, optional=True)
        check_number("norm_eps", norm_eps, at_least=0)
        if head_dim is None:
            if dim % num_heads:
                fail("dim", dim, f"a multiple of num_heads={num_heads} (or pass head_dim explicitly)")
            head_dim = dim // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not is_int(num_kv_heads) or num_kv_heads <= 0 or num_heads % num_kv_heads:
            fail("num_kv_heads", num_kv_heads, f"a divisor of num_heads={num_heads}")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.context_dim = context_dim
        self.scale = scale
        self.window_size = window_size
        self.attn_drop = attn_drop
        q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
        if context_dim is None:
            self.qkv = nn.Linear(dim, q_dim + 2 * kv_dim, bias=qkv_bias)  # one matmul for q, k, v
        else:
            self.q = nn.Linear(dim, q_dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * kv_dim, bias=qkv_bias)
        self.qk_norm, self.proj_drop_p = qk_norm, proj_drop
        self.q_norm = nn.LayerNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(self._out_heads_dim(), dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _out_heads_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def is_cross(self) -> bool:
        return self.context_dim is not None

    def _project(
        self, x: torch.Tensor, context: torch.Tensor | None, kv_cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x (B, N, dim) -> q (B, Hq, N, Dq) and k, v (B, Hkv', M, D) (None when a cross cache is reused)."""
        b, n, _ = x.shape
        hq, hk, d = self._q_heads(), self._kv_heads(), self.head_dim
        dq = self.num_heads * d // hq
        if not self.is_cross:
            if context is not None:
                fail("context", context, "None for a self-attention layer (build it with context_dim for cross-attention)")
            qkv = self.qkv(x)  # (B, N, (H + 2 Hkv) * D)
            if self.num_kv_heads == self.num_heads and hq == hk:
                # one view for all three, as (3, B, H, N, D): no copies
                q, k, v = qkv.view(b, n, 3, hq, dq).permute(2, 0, 3, 1, 4).unbind(0)
                if dq != d:  # differential attention: v keeps full-width heads
                    v = v.transpose(1, 2).reshape(b, n, self.num_heads, d).transpose(1, 2)
                return q, k, v
            q_dim, kv_dim = self.num_heads * d, self.num_kv_heads * d
            q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
            m = n
        else:
            q = self.q(x)
            if kv_cache is not None and kv_cache.filled:
                return q.view(b, n, hq, dq).transpose(1, 2), None, None
            if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != self.context_dim:
                fail("context", context, f"a (B, M, {self.context_dim}) tensor for this cross-attention layer")
            if context.shape[0] not in (1, b):
                fail("context", context, f"batch size 1 or {b} to match x")
            if context.dtype != self.kv.weight.dtype:
                check_dtype("context", context, self.kv.weight.dtype)
            k, v = self.kv(context).chunk(2, dim=-1)  # each (B, M, Hkv * D)
            b_ctx, m = context.shape[:2]
            q = q.view(b, n, hq, dq).transpose(1, 2)  # (B, Hq, N, Dq)
            k = k.reshape(b_ctx, m, hk, dq).transpose(1, 2)  # (B, Hkv', M, Dq)
            v = v.reshape(b_ctx, m, self.num_kv_heads, d).transpose(1, 2)  # (B, Hkv, M, D)
            return q, k, v
        q = q.view(b, n, hq, dq).transpose(1, 2)  # (B, Hq, N, Dq)
        k = k.view(b, m, hk, dq).transpose(1, 2)  # (B, Hkv', N, Dq)
        v = v.view(b, m, self.num_kv_heads, d).transpose(1, 2)  # (B, Hkv, N, D)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        return_weights: bool = False,
    ):
        """x: (B, N, dim); context: (B, M, context_dim) for cross-attention.

        ``mask`` (bool, True = attend): (B, Nk) key padding, (B, Nq, Nk), or broadcastable 4D.
        ``bias``: additive, broadcastable to (B, H, Nq, Nk). ``rope``: (cos, sin) for the new positions,
        broadcastable to (B, H, N, D). Returns (B, N, dim), or (out, weights) with ``return_weights``.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            fail("x", x, f"a (B, N, {self.dim}) tensor")
        if x.dtype != self.proj.weight.dtype:  # one compare on the usual path; the check itself allows autocast
            check_dtype("x", x, self.proj.weight.dtype)
        b, n, _ = x.shape
        q, k, v = self._project(x, context, kv_cache)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k) if k is not None else k
        if rope is not None:
            q = apply_rotary(q, *rope)
            k = apply_rotary(k, *rope) if not self.is_cross else k
        if kv_cache is not None:
            if self.is_cross:
                if k is None:
                    k, v = kv_cache.k, kv_cache.v
                else:
                    kv_cache.store(k, v)
            else:
                k, v = kv_cache.append(k, v)
        nk = k.shape[-2]
        if mask is not None:
            mask = _as_bool_mask(mask, b, n, nk, "mask")
        if self.window_size is not None:
            band = sliding_window_mask(n, nk, self.window_size, is_causal, x.device)
            mask = band if mask is None else mask & band
            is_causal = False  # the causal band already holds causality
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.ndim not in (3, 4) or bias.shape[-1] != nk or bias.shape[-2] not in (1, n):
                fail("bias", bias, f"an additive float tensor broadcastable to (B, H, {n}, {nk})")
        dropout_p = self.attn_drop if self.training else 0.0
        out, weights = self._attend(q, k, v, mask, bias, is_causal, dropout_p, return_weights)
        # (B, N, H*D) -> (B, N, dim); H*D spelled out, as -1 cannot be inferred for an empty batch
        out = out.transpose(1, 2).reshape(b, n, out.shape[1] * out.shape[3])
        out = self.proj(out)
        if self.proj_drop_p and self.training:
            out = self.proj_drop(out)
        return (out, weights) if return_weights else out

    def _q_heads(self) -> int:
        return self.num_heads

    def _kv_heads(self) -> int:
        return self.num_kv_heads

    def _attend(self, q, k, v, mask, bias, is_causal, dropout_p, return_weights):
        """Softmax attention core; subclasses replace only this. Returns (out (B,H,N,Dv), weights or None)."""
        if return_weights:
            return attend_math(q, k, v, mask=mask, bias=bias, is_causal=is_causal, scale=self.scale, dropout_p=dropout_p)
        return attend(q, k, v, mask=mask, bias=bias, is_causal=is_causal, scale=self.scale, dropout_p=dropout_p), None


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, the positive kernel feature map of Katharopoulos et al. 2020, eq. 7."""
    return F.elu(x) + 1


class LinearAttention(Attention):
    """Kernelised linear attention, O(N) memory in sequence length (Katharopoulos et al. 2020).

    out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j)), eq. 5; the causal form keeps
    running prefix sums (eq. 9-10). Key-padding masks zero the masked keys; additive biases have no
    meaning without a softmax and are rejected.
    """

    eps = 1e-6

    def _attend(self, q, k, v, mask, bias, is_causal, dropout_p, return_weights):
        if bias is not None:
            fail("bias", bias, "None for linear attention (there is no softmax to bias)")
        if return_weights:
            fail("return_weights", True, "False for linear attention (weights are never materialised)")
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        q, k = elu_feature_map(q), elu_feature_map(k)
        if mask is not None:
            if mask.shape[-2] != 1:
                fail("mask", mask, "a key-padding mask (B, Nk) for linear attention")
            k = k * mask[..., 0, :, None].to(k.dtype)  # (B, 1|H, Nk, 1): masked keys contribute nothing
        if is_causal:
            # prefix sums of phi(k_j) v_j^T; the query block is aligned to the end of the keys
            kv = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(dim=2)[:, :, -q.shape[2] :]
            z = k.cumsum(dim=2)[:, :, -q.shape[2] :]  # (B, H, Nq, D)
            num = torch.einsum("bhnd,bhnde->bhne", q, kv)
            den = (q * z).sum(-1, keepdim=True)
        else:
            kv = torch.einsum("bhnd,bhne->bhde", k, v)  # (B, H, D, Dv)
            num = q @ kv
            den = q @ k.sum(dim=2)[..., None]  # (B, H, Nq, 1)
        return num / (den + self.eps), None


def lambda_init_for_depth(layer_index: int) -> float:
    """lambda_init = 0.8 - 0.6 * exp(-0.3 * (l - 1)) for 1-based layer l (Ye et al. 2024, sec. 2.1)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class DifferentialAttention(Attention):
    """Differential attention (Ye et al. 2024, "Differential Transformer", eq. 1-3).

    Each head splits q and k into two halves of head_dim/2 and takes the difference of two softmax maps
    over values of full head_dim: (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V,
    with lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, then a per-head RMSNorm scaled by
    (1 - lambda_init). Both maps go through the fused kernel: softmax(A)V - lambda softmax(B)V.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, layer_index: int = 0, **kwargs):
        if kwargs.get("qk_norm"):
            fail("qk_norm", True, "False for differential attention (it normalises each head's output instead)")
        super().__init__(dim, num_heads, **kwargs)
        if self.head_dim % 2:
            fail("head_dim", self.head_dim, "an even number for differential attention")
        half = self.head_dim // 2
        self.lambda_init = lambda_init_for_depth(layer_index)
        self.lambda_q1 = nn.Parameter(torch.zeros(half).normal_(0, 0.1))
        self.lambda_k1 = nn.Parameter(torch.zeros(half).normal_(0, 0.1))
        self.lambda_q2 = nn.Parameter(torch.zeros(half).normal_(0, 0.1))
        self.lambda_k2 = nn.Parameter(torch.zeros(half).normal_(0, 0.1))
        self.head_norm = RMSNorm(self.head_dim, eps=1e-5)
        if self.scale is None:
            self.scale = half**-0.5

    def _q_heads(self) -> int:
        return 2 * self.num_heads  # q viewed as (2H, D/2)

    def _kv_heads(self) -> int:
        return 2 * self.num_kv_heads  # k viewed as (2Hkv, D/2); v keeps (Hkv, D)

    def forward(self, x, context=None, **kwargs):
        if kwargs.get("rope") is not None:
            fail("rope", "given", "None for differential attention (apply positions outside this layer)")
        return super().forward(x, context, **kwargs)

    def _attend(self, q, k, v, mask, bias, is_causal, dropout_p, return_weights):
        q1, q2 = rearrange(q, "b (h two) n d -> two b h n d", two=2)
        k1, k2 = rearrange(k, "b (h two) n d -> two b h n d", two=2)
        lam = (
            torch.exp((self.lambda_q1 * self.lambda_k1).sum().float())
            - torch.exp((self.lambda_q2 * self.lambda_k2).sum().float())
            + self.lambda_init
        ).to(q.dtype)
        kw = dict(mask=mask, bias=bias, is_causal=is_causal, scale=self.scale, dropout_p=dropout_p)
        if return_weights:
            o1, w1 = attend_math(q1, k1, v, **kw)
            o2, w2 = attend_math(q2, k2, v, **kw)
            weights = w1 - lam * w2
        else:
            o1, o2, weights = attend(q1, k1, v, **kw), attend(q2, k2, v, **kw), None
        out = self.head_norm(o1 - lam * o2) * (1 - self.lambda_init)  # (B, H, N, D)
        return out, weights
