"""The one transformer block, used by ViT, Swin, DiT, the UNet's attention and every text model."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionformers._validate import (
    check_bool,
    check_choice,
    check_dtype,
    check_int,
    check_number,
    check_probability,
    fail,
)
from visionformers.nn.attention import Attention, DifferentialAttention, KVCache, LinearAttention
from visionformers.nn.drop import DropPath
from visionformers.nn.fused import linear_add_norm, mlp_add_norm, native_epilogue_available
from visionformers.nn.mlp import Mlp
from visionformers.nn.norm import AdaLNModulation, make_norm, modulate
from visionformers.nn.relative_global import RelativeGlobalAttention
from visionformers.nn.short_attention import window_block

__all__ = ["LayerScale", "TransformerBlock", "ATTENTION_TYPES", "take_tokens"]

ATTENTION_TYPES = {
    "softmax": Attention, "linear": LinearAttention, "differential": DifferentialAttention,
    "relative": RelativeGlobalAttention,
}


def _first(x: torch.Tensor, queries: int | None) -> torch.Tensor:
    """The residual stream of the rows a block computes: all of x, or its first ``queries`` tokens."""
    return x if queries is None else x[:, :queries]


def take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[:, index] for (B, L, C) as one row gather: (B, len(index), C)."""
    if not x.is_contiguous():
        return x.index_select(1, index)  # strided input (an NCHW patch embedding): one copy
    b, n, c = x.shape
    rows = (torch.arange(b, device=x.device)[:, None] * n + index).flatten()  # (B * len(index),)
    return x.view(b * n, c).index_select(0, rows).view(b, index.numel(), c)  # dim-0 gather copies whole rows


# Tokens per chunk of a block run over windows in CPU inference without the native block (64 windows of 7x7): every
# activation of the chunk (qkv, scores, MLP hidden) stays in cache instead of making a full pass through memory.
_CHUNK_TOKENS = 3136


def _in_chunks(block: "TransformerBlock", windows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """block(windows, bias=bias) for (W, N, C) windows, chunk by chunk of whole windows. Exact: every op of a
    block (norms, projections, attention within a window, MLP) is local to a window. Swin-T's stage 1 at batch 8
    runs ~15% faster on CPU with ATen's ops."""
    out = torch.empty_like(windows)
    step = max(1, _CHUNK_TOKENS // windows.shape[1])
    per_window_bias = bias is not None and bias.ndim == 4 and bias.shape[0] > 1  # shifted windows: (W, H, N, N)
    for start in range(0, windows.shape[0], step):
        stop = start + step
        out[start:stop] = block(windows[start:stop], bias=bias[start:stop] if per_window_bias else bias)
    return out


class LayerScale(nn.Module):
    """Per-channel learned residual scale initialised small (Touvron et al. 2021, CaiT, eq. 5)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        check_int("dim", dim)
        check_number("init_value", init_value)
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class TransformerBlock(nn.Module):
    """Attention + MLP with residuals: pre- or post-norm, optional cross-attention, adaLN-Zero conditioning.

    Pre-norm (GPT-2, ViT): x + attn(norm(x)). Post-norm (BERT, GPT-1, the original Transformer):
    norm(x + attn(x)). With ``cond_dim`` the norms are modulated by a conditioning vector and every
    residual branch is gated, zero-initialised (adaLN-Zero, Peebles & Xie 2023, sec. 3.2).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        mlp_hidden_dim: int | None = None,  # overrides mlp_ratio (BERT 3072, T5 d_ff)
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_scale: float | None = None,
        attn_type: str = "softmax",  # "softmax", "linear", "differential" or "relative"
        max_distance: int = 128,  # "relative": distances clipped to +-max_distance
        window_size: int | None = None,  # sliding-window attention
        layer_index: int = 0,  # depth, for differential attention's lambda_init
        mlp_act: str = "gelu",
        mlp_bias: bool = True,
        norm: str = "layernorm",
        norm_eps: float = 1e-6,
        norm_bias: bool = True,
        pre_norm: bool = True,
        cross_attention: bool = False,
        context_dim: int | None = None,  # width of the cross-attention context (default: dim)
        cond_dim: int | None = None,  # adaLN-Zero conditioning width (DiT); None: plain norms
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        is_causal: bool = False,
    ):
        super().__init__()
        check_choice("attn_type", attn_type, ATTENTION_TYPES)
        check_int("dim", dim)
        check_number("mlp_ratio", mlp_ratio, above=0)
        for name, value in (("mlp_hidden_dim", mlp_hidden_dim), ("context_dim", context_dim), ("cond_dim", cond_dim)):
            check_int(name, value, optional=True)
        check_number("norm_eps", norm_eps, at_least=0)
        check_probability("drop_path", drop_path)
        check_number("layer_scale_init", layer_scale_init, at_least=0, optional=True, note=" (0: off)")
        for name, value in (("pre_norm", pre_norm), ("cross_attention", cross_attention), ("is_causal", is_causal),
                            ("mlp_bias", mlp_bias), ("norm_bias", norm_bias)):
            check_bool(name, value)
        if cond_dim is not None and not pre_norm:
            fail("pre_norm", pre_norm, "True when cond_dim is set (adaLN-Zero modulates pre-norms)")
        self.dim, self.pre_norm, self.is_causal, self.cond_dim = dim, pre_norm, is_causal, cond_dim
        self.grad_checkpointing = False
        affine = cond_dim is None  # adaLN supplies scale and shift
        norm_kw = dict(eps=norm_eps, affine=affine, bias=norm_bias) if norm == "layernorm" else dict(eps=norm_eps, affine=affine)
        attn_kw = dict(
            num_kv_heads=num_kv_heads, head_dim=head_dim, qkv_bias=qkv_bias, qk_norm=qk_norm,
            attn_drop=attn_drop, proj_drop=proj_drop, proj_bias=proj_bias, scale=attn_scale,
        )
        attn_cls = ATTENTION_TYPES[attn_type]
        extra = dict(layer_index=layer_index) if attn_type == "differential" else {}
        if attn_type == "relative":
            extra = dict(max_distance=max_distance, is_causal=is_causal)
        self.norm1 = make_norm(norm, dim, **norm_kw)
        self.attn = attn_cls(dim, num_heads, window_size=window_size, **attn_kw, **extra)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if cross_attention:
            self.norm_cross = make_norm(norm, dim, **norm_kw)
            self.cross_attn = Attention(dim, num_heads, context_dim=context_dim or dim, **attn_kw)
            self.ls_cross = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        else:
            self.norm_cross = self.cross_attn = self.ls_cross = None
        self.norm2 = make_norm(norm, dim, **norm_kw)
        hidden = mlp_hidden_dim or int(dim * mlp_ratio)
        self.mlp = Mlp(dim, hidden, act=mlp_act, bias=mlp_bias, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.adaLN = AdaLNModulation(cond_dim, dim, 6) if cond_dim is not None else None

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        context_bias: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cross_kv_cache: KVCache | None = None,
        partition: tuple[Callable, Callable] | None = None,
        queries: int | None = None,
    ) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim), or (B, queries, dim) with ``queries``.

        ``mask``/``bias``/``rope`` go to self-attention; ``context``/``context_mask``/``context_bias`` to
        cross-attention; ``cond`` (B, cond_dim) drives adaLN-Zero. ``partition`` = (split, merge) wraps only
        the self-attention call, e.g. Swin's window partition: split(norm1(x)) -> windows -> merge.
        ``queries``: the block's output for the first ``queries`` tokens only, the others serving as keys and
        values (``Attention``'s ``queries``): a classifier's last block needs only its class token.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            fail("x", x, f"a (B, N, {self.dim}) tensor")
        if queries is not None and partition is not None:
            fail("queries", queries, "None with a partition (the windows' rows are not the stream's)")
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None:
            return checkpoint(
                self._forward, x, mask, bias, rope, context, context_mask, context_bias, cond, None, None, partition,
                queries, use_reentrant=False,
            )
        return self._forward(x, mask, bias, rope, context, context_mask, context_bias, cond, kv_cache, cross_kv_cache,
                             partition, queries)

    def forward_windows(
        self, x: torch.Tensor, window_tokens: int, *, bias: torch.Tensor | None = None, gather: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block with self-attention inside windows (Swin): x (B, L, C), read in the order of ``gather`` (L,)
        (positions in x; None: as it is), holds L / ``window_tokens`` consecutive windows per image. Returns
        (B, L, C) in that window order. ``bias``: additive, broadcastable to (B * L / N, heads, N, N) for N =
        ``window_tokens`` (window w of image i is row i * L / N + w), or (L / N, heads, N, N): one per window of an
        image, the same for every image. Swin's relative bias and shift mask.

        CPU inference of a plain pre-norm block is one native call (``nn.short_attention.window_block``): every
        intermediate of a group of windows stays in cache and the gather is a row read. Otherwise the gather is
        one row copy and the block runs on the (B * L / N, N, C) windows as a view; in CPU inference a large
        stream goes chunk by chunk of windows (``_CHUNK_TOKENS``), so that its activations stay in cache.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            fail("x", x, f"a (B, L, {self.dim}) stream of windows")
        check_int("window_tokens", window_tokens)
        b, length, c = x.shape
        if length % window_tokens:
            fail("window_tokens", window_tokens, f"a divisor of the stream length {length}")
        if gather is not None and (not isinstance(gather, torch.Tensor) or gather.dtype != torch.long
                                   or gather.shape != (length,) or gather.device != x.device
                                   or (length and not torch.compiler.is_compiling()  # (a data-dependent check)
                                       and not 0 <= int(gather.min()) <= int(gather.max()) < length)):
            fail("gather", gather, f"None or a ({length},) int64 tensor of positions in x (0 to {length - 1}) on {x.device}")
        if bias is not None:
            n, heads, per_image = window_tokens, self.attn.num_heads, length // window_tokens
            if (not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.ndim not in (2, 3, 4)
                    or bias.shape[-2:] != (n, n) or (bias.ndim > 2 and bias.shape[-3] not in (1, heads))
                    or (bias.ndim == 4 and bias.shape[0] not in (1, per_image, b * per_image))):
                fail("bias", bias, f"None or a float tensor of (N, N), (1|{heads}, N, N) or (1|{per_image}|"
                                   f"{b * per_image}, 1|{heads}, N, N) for N = {n}: windows of an image or of the batch")
        if self.pre_norm and self._fusable(x):
            out = window_block(x, window_tokens, gather, self.norm1, self.attn, self.norm2, self.mlp, bias)
            if out is not None:
                return out
        if gather is not None:
            x = take_tokens(x, gather)
        windows = x.view(-1, window_tokens, c)  # (B * L / N, N, C)
        if bias is not None and bias.ndim == 4 and b > 1 and bias.shape[0] == length // window_tokens > 1:
            bias = bias.repeat(b, 1, 1, 1)  # one per window of an image: tiled over the batch for the attention
        if (x.is_cpu and not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and x.shape[0] * length > 2 * _CHUNK_TOKENS):
            return _in_chunks(self, windows, bias).view(b, length, c)
        split = lambda h: h.view(-1, window_tokens, h.shape[-1])  # noqa: E731  (norm1's output: contiguous)
        merge = lambda o: o.view(b, length, o.shape[-1])  # noqa: E731
        return self(x, bias=bias, partition=(split, merge))

    def _self_attention(self, h, mask, bias, rope, kv_cache, partition, project=True, queries=None):
        kw = dict(mask=mask, bias=bias, is_causal=self.is_causal, rope=rope, project=project)
        if queries is not None:
            kw["queries"] = queries
        if partition is not None:  # the merge is per token, so it may come before the output projection
            split, merge = partition
            return merge(self.attn(split(h), **kw))
        return self.attn(h, kv_cache=kv_cache, **kw)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Inference on CPU with the native epilogues (``nn.fused``), in a block without extra branches."""
        return (
            not self.training and not torch.is_grad_enabled() and x.is_cpu
            and self.adaLN is None and self.cross_attn is None
            and isinstance(self.ls1, nn.Identity) and isinstance(self.ls2, nn.Identity)
            and native_epilogue_available()
        )

    def _forward_fused(self, x, mask, bias, rope, kv_cache, partition, queries):
        """The plain block's math with each product's bias fused into the residual add, norm or activation."""
        res = _first(x, queries)
        if self.pre_norm:
            heads = self._self_attention(self.norm1(x), mask, bias, rope, kv_cache, partition, False, queries)
            x, h = linear_add_norm(heads, self.attn.proj, res, self.norm2)
            return mlp_add_norm(h, self.mlp, x, None)[0]
        heads = self._self_attention(x, mask, bias, rope, kv_cache, partition, False, queries)
        x = linear_add_norm(heads, self.attn.proj, res, self.norm1, keep_sum=False)[1]
        return mlp_add_norm(x, self.mlp, x, self.norm2, keep_sum=False)[1]

    def _forward(self, x, mask, bias, rope, context, context_mask, context_bias, cond, kv_cache, cross_kv_cache, partition,
                 queries=None):
        if context is None and self._fusable(x):
            return self._forward_fused(x, mask, bias, rope, kv_cache, partition, queries)
        if self.adaLN is not None:
            if (
                not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.shape[-1] != self.cond_dim
                or cond.shape[0] not in (1, x.shape[0])
            ):
                fail("cond", cond, f"a (B, {self.cond_dim}) conditioning tensor for this adaLN block (B = 1 or {x.shape[0]})")
            if cond.dtype != self.adaLN.linear.weight.dtype:
                check_dtype("cond", cond, self.adaLN.linear.weight.dtype)
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(cond)  # each (B, dim)
            h = self._self_attention(modulate(self.norm1(x), shift1, scale1), mask, bias, rope, kv_cache, partition,
                                     queries=queries)
            x = _first(x, queries) + self.drop_path(gate1.unsqueeze(1) * h)
            x = self._cross(x, context, context_mask, context_bias, cross_kv_cache)
            h = self.mlp(modulate(self.norm2(x), shift2, scale2))
            return x + self.drop_path(gate2.unsqueeze(1) * h)
        if self.pre_norm:
            h = self._self_attention(self.norm1(x), mask, bias, rope, kv_cache, partition, queries=queries)
            x = _first(x, queries) + self._branch(self.ls1, h)
            x = self._cross(x, context, context_mask, context_bias, cross_kv_cache)
            return x + self._branch(self.ls2, self.mlp(self.norm2(x)))
        h = self._self_attention(x, mask, bias, rope, kv_cache, partition, queries=queries)
        x = self.norm1(_first(x, queries) + self._branch(self.ls1, h))
        x = self._cross(x, context, context_mask, context_bias, cross_kv_cache)
        return self.norm2(x + self._branch(self.ls2, self.mlp(x)))

    def _branch(self, layer_scale: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """drop_path(layer_scale(h)), skipping whichever is an Identity: a module call costs more than a decoding step's add."""
        if not isinstance(layer_scale, nn.Identity):
            h = layer_scale(h)
        return h if isinstance(self.drop_path, nn.Identity) else self.drop_path(h)

    def _cross(self, x, context, context_mask, context_bias, cross_kv_cache):
        if self.cross_attn is None:
            if context is not None:
                fail("context", context, "None for a block built without cross_attention")
            return x
        if context is None and (cross_kv_cache is None or not cross_kv_cache.filled):
            fail("context", None, "a (B, M, context_dim) tensor for a block with cross-attention")
        if self.pre_norm:
            h = self.cross_attn(self.norm_cross(x), context, mask=context_mask, bias=context_bias, kv_cache=cross_kv_cache)
            return x + self._branch(self.ls_cross, h)
        h = self.cross_attn(x, context, mask=context_mask, bias=context_bias, kv_cache=cross_kv_cache)
        return self.norm_cross(x + self._branch(self.ls_cross, h))
