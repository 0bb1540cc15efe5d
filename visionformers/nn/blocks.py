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
from visionformers.nn.mlp import Mlp
from visionformers.nn.norm import AdaLNModulation, make_norm, modulate
from visionformers.nn.relative_global import RelativeGlobalAttention

__all__ = ["LayerScale", "TransformerBlock", "ATTENTION_TYPES"]

ATTENTION_TYPES = {
    "softmax": Attention, "linear": LinearAttention, "differential": DifferentialAttention,
    "relative": RelativeGlobalAttention,
}


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
    ) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim).

        ``mask``/``bias``/``rope`` go to self-attention; ``context``/``context_mask``/``context_bias`` to
        cross-attention; ``cond`` (B, cond_dim) drives adaLN-Zero. ``partition`` = (split, merge) wraps only
        the self-attention call, e.g. Swin's window partition: merge(attn(split(norm1(x)))).
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            fail("x", x, f"a (B, N, {self.dim}) tensor")
        args = (x, mask, bias, rope, context, context_mask, context_bias, cond, kv_cache, cross_kv_cache, partition)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None:
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(self, x, mask, bias, rope, context, context_mask, context_bias, cond, kv_cache, cross_kv_cache,
                 partition):
        attn = lambda h: self._self_attention(h, mask, bias, rope, kv_cache, partition)  # noqa: E731
        if self.adaLN is not None:  # adaLN-Zero (DiT): modulated pre-norms, gated residual branches
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(self._check_cond(cond, x))  # each (B, dim)
            x = x + self.drop_path(gate1.unsqueeze(1) * attn(modulate(self.norm1(x), shift1, scale1)))
            x = self._cross(x, context, context_mask, context_bias, cross_kv_cache)
            return x + self.drop_path(gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2)))
        if self.pre_norm:  # GPT-2, ViT, Swin: x + f(norm(x))
            x = x + self.drop_path(self.ls1(attn(self.norm1(x))))
            x = self._cross(x, context, context_mask, context_bias, cross_kv_cache)
            return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        # post-norm (BERT, the original Transformer): norm(x + f(x))
        x = self.norm1(x + self.drop_path(self.ls1(attn(x))))
        x = self._cross(x, context, context_mask, context_bias, cross_kv_cache)
        return self.norm2(x + self.drop_path(self.ls2(self.mlp(x))))

    def _self_attention(self, h, mask, bias, rope, kv_cache, partition):
        kw = dict(mask=mask, bias=bias, is_causal=self.is_causal, rope=rope)
        if partition is not None:  # attention inside windows (Swin); no cache
            split, merge = partition
            return merge(self.attn(split(h), **kw))
        return self.attn(h, kv_cache=kv_cache, **kw)

    def _check_cond(self, cond, x: torch.Tensor) -> torch.Tensor:
        if (
            not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.shape[-1] != self.cond_dim
            or cond.shape[0] not in (1, x.shape[0])
        ):
            fail("cond", cond, f"a (B, {self.cond_dim}) conditioning tensor for this adaLN block (B = 1 or {x.shape[0]})")
        if cond.dtype != self.adaLN.linear.weight.dtype:
            check_dtype("cond", cond, self.adaLN.linear.weight.dtype)
        return cond

    def _cross(self, x, context, context_mask, context_bias, cross_kv_cache):
        if self.cross_attn is None:
            if context is not None:
                fail("context", context, "None for a block built without cross_attention")
            return x
        if context is None and (cross_kv_cache is None or not cross_kv_cache.filled):
            fail("context", None, "a (B, M, context_dim) tensor for a block with cross-attention")
        if self.pre_norm:
            h = self.cross_attn(self.norm_cross(x), context, mask=context_mask, bias=context_bias, kv_cache=cross_kv_cache)
            return x + self.drop_path(self.ls_cross(h))
        h = self.cross_attn(x, context, mask=context_mask, bias=context_bias, kv_cache=cross_kv_cache)
        return self.norm_cross(x + self.drop_path(self.ls_cross(h)))
