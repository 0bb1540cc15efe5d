"""Swin Transformer (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows").

Stages of pre-norm blocks that attend inside non-overlapping windows; every second block shifts the
windows by half a window (a cyclic roll, sec. 3.2) with a mask so that tokens only attend tokens of
their own region of the rolled map; a learned relative position bias is added per head (eq. 4); patch
merging halves the resolution between stages. A block is the shared ``TransformerBlock`` whose self-attention
runs on the windows: roll, partition, ``nn.Attention`` with bias = relative bias + shift mask, merge, roll back.
Inputs that are not a multiple of the window are padded timm-style (roll, then zero-pad bottom/right).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from visionformers._validate import (
    check_bool,
    check_dtype,
    check_image,
    check_int,
    check_number,
    check_probability,
    check_tensor,
    fail,
    is_int,
)
from visionformers.nn import PatchEmbed, TransformerBlock, WindowRelativeBias, to_2tuple

__all__ = ["SwinConfig", "SwinTransformer", "PatchMerging", "shift_regions", "window_partition", "window_reverse"]


@dataclass(frozen=True)
class SwinConfig:
    img_size: int | tuple[int, int] = 224  # build resolution: fixes each stage's window (clipped to the stage grid)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head; forward returns pooled features
    embed_dim: int = 96  # width of stage 1; doubles at every patch merging
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # head_dim 32 at every stage
    window_size: int = 7  # 7 for 224 inputs: 56, 28, 14, 7 are all multiples, no padding
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_norm: bool = True  # LayerNorm after the patch embedding (official Swin, timm, torchvision)
    norm_eps: float = 1e-5  # Swin keeps PyTorch's LayerNorm default (unlike ViT's 1e-6)
    drop_rate: float = 0.0  # dropout before the classifier
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.2  # stochastic depth, linear over all blocks (paper: 0.2 / 0.3 / 0.5 for T / S / B)

    def __post_init__(self):
        size = to_2tuple(self.img_size) if isinstance(self.img_size, (int, tuple, list)) else None
        if size is None or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            fail("img_size", self.img_size, "a positive int or an (H, W) tuple of positive ints")
        for name in ("patch_size", "in_chans", "embed_dim", "window_size"):
            check_int(name, getattr(self, name))
        check_int("num_classes", self.num_classes, minimum=0)
        if not isinstance(self.depths, tuple) or not self.depths or not all(is_int(d) and d > 0 for d in self.depths):
            fail("depths", self.depths, "a non-empty tuple of positive ints (blocks per stage)")
        if not isinstance(self.num_heads, tuple) or len(self.num_heads) != len(self.depths):
            fail("num_heads", self.num_heads, f"a tuple of {len(self.depths)} ints, one per stage")
        for i, heads in enumerate(self.num_heads):
            if not is_int(heads) or heads <= 0 or (self.embed_dim * 2**i) % heads:
                fail("num_heads", self.num_heads, f"positive divisors of each stage width {[self.embed_dim * 2**j for j in range(len(self.depths))]}")
        check_number("mlp_ratio", self.mlp_ratio, above=0)
        check_number("norm_eps", self.norm_eps, above=0)
        for name in ("qkv_bias", "patch_norm"):
            check_bool(name, getattr(self, name))
        for name in ("drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate"):
            check_probability(name, getattr(self, name))

    def stage_resolutions(self, grid: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Token grid of every stage for a patch grid (default: the build size); odd sizes round up."""
        h, w = grid or tuple(-(-s // self.patch_size) for s in to_2tuple(self.img_size))
        out = []
        for _ in self.depths:
            out.append((h, w))
            h, w = -(-h // 2), -(-w // 2)
        return out


# ---- windows ------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of the window -> (B * nW, Wh * Ww, C), windows in raster order per image."""
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=window[0], ww=window[1])


def window_reverse(windows: torch.Tensor, window: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * nW, Wh * Ww, C) -> (B, H, W, C)."""
    return rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=height // window[0],
                     nw=width // window[1], wh=window[0])


def shift_regions(size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(nW, N) region label of every window slot of a rolled, padded (Hp, Wp) map (Liu et al. 2021, fig. 4).

    The last window row/column holds tokens that wrapped around; they are split ``shift`` from the end, exactly
    as timm slices its mask. Tokens attend only tokens with the same label.
    """

    def bands(n: int, win: int, s: int) -> torch.Tensor:
        idx = torch.arange(n)
        return (idx >= n - win).long() + (idx >= n - s).long() if s else torch.zeros(n, dtype=torch.long)

    labels = bands(size[0], window[0], shift[0])[:, None] * 3 + bands(size[1], window[1], shift[1])[None, :]
    return rearrange(labels, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=window[0], ww=window[1])


def shifted_window_bias(bias: torch.Tensor, size: tuple[int, int], window: tuple[int, int],
                        shift: tuple[int, int]) -> torch.Tensor:
    """Relative bias (H, N, N) plus the shift mask (-inf across regions) of a padded (Hp, Wp) map: (1 | nW, H, N, N)."""
    bias = bias.unsqueeze(0)  # (1, H, N, N)
    if not any(shift):
        return bias
    regions = shift_regions(size, window, shift).to(bias.device)
    same = regions[:, :, None] == regions[:, None, :]  # (nW, N, N)
    return bias.masked_fill(~same[:, None], float("-inf"))  # (nW, H, N, N)


# ---- modules ----------------------------------------------------------------------------------------


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (x0, x1, x2, x3 order), LayerNorm, linear 4C -> 2C (Liu et al. sec. 3.1)."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim); an odd side is zero-padded (timm)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[-1] != self.dim:
            fail("x", x, f"a (B, H, W, {self.dim}) map")
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = rearrange(x, "b (h dy) (w dx) c -> b h w (dx dy c)", dy=2, dx=2)  # x0 (0,0), x1 (1,0), x2 (0,1), x3 (1,1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging, then ``depth`` blocks alternating regular and shifted windows."""

    def __init__(self, dim, out_dim, depth, num_heads, table_window, config: SwinConfig, drop_path, downsample):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, config.norm_eps) if downsample else None
        self.blocks = nn.ModuleList(
            TransformerBlock(
                out_dim, num_heads, config.mlp_ratio, qkv_bias=config.qkv_bias, norm_eps=config.norm_eps,
                attn_drop=config.attn_drop_rate, proj_drop=config.proj_drop_rate, drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.rel_bias = nn.ModuleList(WindowRelativeBias(table_window, num_heads) for _ in range(depth))
        self.table_window = table_window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H', W', out_dim). The window is clipped to the grid and a block shifts by half of
        it only where the grid exceeds it (timm's ``_calc_window_shift``)."""
        if self.downsample is not None:
            x = self.downsample(x)
        b, h, w, c = x.shape
        window = (min(self.table_window[0], h), min(self.table_window[1], w))
        hp, wp = -(-h // window[0]) * window[0], -(-w // window[1]) * window[1]  # padded to whole windows
        for j, block in enumerate(self.blocks):
            shift = tuple(win // 2 if j % 2 and r > win else 0 for r, win in zip((h, w), window))
            bias = shifted_window_bias(self.rel_bias[j](window), (hp, wp), window, shift)  # (1 | nW, heads, N, N)
            if bias.shape[0] > 1:
                bias = bias.repeat(b, 1, 1, 1)  # (B * nW, heads, N, N): windows are batch-major

            def split(t: torch.Tensor, shift=shift) -> torch.Tensor:  # (B, H*W, C) -> (B * nW, N, C)
                t = t.view(b, h, w, c).roll((-shift[0], -shift[1]), dims=(1, 2))
                return window_partition(F.pad(t, (0, 0, 0, wp - w, 0, hp - h)), window)

            def merge(o: torch.Tensor, shift=shift) -> torch.Tensor:  # (B * nW, N, C) -> (B, H*W, C)
                o = window_reverse(o, window, hp, wp)[:, :h, :w].roll(shift, dims=(1, 2))
                return o.reshape(b, h * w, c)

            x = block(x.reshape(b, h * w, c), bias=bias, partition=(split, merge)).view(b, h, w, c)
        return x


class SwinTransformer(nn.Module):
    """Swin classifier: patch embedding, windowed stages with patch merging, mean-pooled linear head."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = c = config
        num_stages = len(c.depths)
        self.dims = [c.embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.dims[-1]
        self.patch_embed = PatchEmbed(
            c.img_size, c.patch_size, c.in_chans, c.embed_dim, strict_img_size=False, pad=False,
            norm=nn.LayerNorm(c.embed_dim, eps=c.norm_eps) if c.patch_norm else None,
        )
        # a stage's window (and so its bias table) is clipped to its grid at the build size, as in timm
        self.table_windows = [
            (min(c.window_size, r[0]), min(c.window_size, r[1])) for r in c.stage_resolutions()
        ]
        total = sum(c.depths)
        rates = [c.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear over all blocks
        self.layers = nn.ModuleList()
        start = 0
        for i in range(num_stages):
            self.layers.append(
                SwinStage(
                    self.dims[max(i - 1, 0)], self.dims[i], c.depths[i], c.num_heads[i], self.table_windows[i], c,
                    rates[start : start + c.depths[i]], downsample=i > 0,
                )
            )
            start += c.depths[i]
        self.norm = nn.LayerNorm(self.num_features, eps=c.norm_eps)
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(self.num_features, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's Swin init: trunc-normal(0.02) linears, zero biases, unit norms; zero head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowRelativeBias):
                nn.init.trunc_normal_(m.table, std=0.02)
        self.patch_embed.proj.reset_parameters()  # PyTorch's conv default, as timm and torchvision keep it
        if isinstance(self.head, nn.Linear):  # zero head: every class starts equally likely
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward instead of storing them."""
        for stage in self.layers:
            for block in stage.blocks:
                block.grad_checkpointing = enable

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> normed patch tokens (B, h, w, embed_dim); a partial patch is zero-padded (timm)."""
        check_image("images", images, channels=self.config.in_chans, dtype=self.patch_embed.proj.weight.dtype)
        p = self.config.patch_size
        images = F.pad(images, (0, -images.shape[-1] % p, 0, -images.shape[-2] % p))
        x = self.patch_embed(images)  # (B, h*w, C) in raster order
        return x.view(x.shape[0], images.shape[-2] // p, images.shape[-1] // p, x.shape[-1])

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> normed last-stage features (B, h, w, C) (channels last, as timm)."""
        x = self._embed(images)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_intermediates(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) -> the output of every stage, [(B, C_i, h_i, w_i)] (before the final norm)."""
        x, out = self._embed(images), []
        for stage in self.layers:
            x = stage(x)
            out.append(x.permute(0, 3, 1, 2))
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features (B, h, w, C) or (B, L, C) -> logits (B, num_classes), or pooled (B, C) with ``pre_logits``."""
        check_tensor("x", x, ndim=(3, 4), floating=True)
        c = self.num_features
        if x.shape[-1] != c or any(n == 0 for n in x.shape[1:-1]):
            fail("x", x, f"features (B, h, w, {c}) or (B, L, {c}) with at least one token, as forward_features returns")
        if isinstance(self.head, nn.Linear):
            check_dtype("x", x, self.head.weight.dtype)
        x = x.flatten(1, -2).mean(dim=1)  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, num_classes) (pooled features (B, C) when num_classes=0)."""
        return self.forward_head(self.forward_features(images))
