"""Blocks of the diffusion UNet: a time-conditioned residual block, spatial attention, down/upsampling.

The residual block follows Ho et al. 2020 (DDPM, appendix B) with the scale-shift ("adaptive group norm")
variant of Dhariwal & Nichol 2021 (sec. 3, "AdaGN"). Attention reuses the shared ``nn.Attention`` on a
flattened (B, H*W, C) view of the feature map; no block here has attention of its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionformers.nn import Attention

__all__ = ["ResBlock", "SpatialAttention", "Downsample", "Upsample", "zero_init_"]


def zero_init_(module: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias so the residual branch it ends starts as the identity (DDPM's init_scale=0)."""
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> (+ time) -> GroupNorm -> SiLU -> dropout -> conv, plus a skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        *,
        dropout: float = 0.0,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        use_scale_shift_norm: bool = False,  # AdaGN: GN(h) * (1 + scale) + shift; else DDPM's h + emb before GN
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.dropout = dropout
        self.conv2 = zero_init_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # a 1x1 conv ("NIN shortcut" in DDPM) only where the width changes
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, H, W), emb (B, emb_dim) already passed through SiLU -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        e = self.emb_proj(emb)[:, :, None, None]  # (B, Cout or 2 Cout, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm2(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm2(h + e))
        h = self.conv2(F.dropout(h, self.dropout, self.training))
        return h + (x if self.skip is None else self.skip(x))


class SpatialAttention(nn.Module):
    """x + Attention(GroupNorm(x)) over the H*W positions, then optional cross-attention to a context.

    The cross-attention is its own residual, x + CrossAttention(LayerNorm(x), context) (as Imagen's UNet);
    both output projections start at zero so the block starts as the identity (DDPM's proj_out init).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        *,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        context_dim: int | None = None,
        norm: bool = True,  # False: attend to x itself, no GroupNorm first (diffusers' scale-shift middle block)
    ):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=norm_eps) if norm else None
        self.attn = Attention(channels, num_heads, qkv_bias=True)
        zero_init_(self.attn.proj)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(channels, eps=norm_eps)
            self.cross_attn = Attention(channels, num_heads, qkv_bias=True, context_dim=context_dim)
            zero_init_(self.cross_attn.proj)
        else:
            self.norm_cross = self.cross_attn = None

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W); context (B, M, context_dim), context_mask (B, M) bool -> (B, C, H, W)."""
        b, c, height, width = x.shape
        # (B, C, H, W) -> (B, H*W, C): a free view when x is channels_last, one copy otherwise
        tokens = (self.norm(x) if self.norm is not None else x).permute(0, 2, 3, 1).reshape(b, height * width, c)
        out = x.permute(0, 2, 3, 1).reshape(b, height * width, c) + self.attn(tokens)  # (B, H*W, C)
        if self.cross_attn is not None:
            out = out + self.cross_attn(self.norm_cross(out), context, mask=context_mask)
        out = out.view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, H, W) with channels_last strides
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()  # keep x's layout


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (DDPM).

    ``padding=0`` pads only the right and bottom edge by one, TensorFlow's "SAME" for this stride, as DDPM's own
    code and its diffusers ports (``downsample_padding=0``) do; ``padding=1`` pads every edge.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.asymmetric_pad = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 convolution (DDPM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
