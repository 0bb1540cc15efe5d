"""Image to patch tokens with one strided convolution (Dosovitskiy et al. 2021, eq. 1).

A convolution whose stride is its kernel is a product of the flattened patches with the kernel: CPU inference
runs it as one (the patches are a strided copy of the image, then ``nn.linear.linear``), with the norm after it
in the native GEMM's epilogue where that takes the product. Batch 8 at 224 px, 2 cores (Zen 3), freed memory kept
by malloc: Swin-T's embedding (patch 4, 96 wide, LayerNorm) took 4.6 ms as oneDNN's convolution and the copy to
tokens, before its norm, and takes 3.4 ms with the norm; ViT-B/16's 13.6 and 11.0 ms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from visionformers._validate import check_image, check_int, fail, is_int
from visionformers.nn.fused import is_layer_norm
from visionformers.nn.gemm import gemm
from visionformers.nn.linear import gemm_taken, linear, native_inference_ready

__all__ = ["PatchEmbed", "to_2tuple"]


def to_2tuple(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class PatchEmbed(nn.Module):
    """Conv patchify: (B, C, H, W) -> (B, N, D) tokens, or (B, D, H/p, W/p) with ``output="nchw"``.

    ``strict_img_size`` demands the configured size; otherwise any size divisible by the patch is taken,
    and ``pad`` zero-pads the right/bottom edge up to a multiple of the patch (non-square sizes too).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        output: str = "tokens",  # "tokens" (B, N, D) or "nchw" (B, D, h, w)
        strict_img_size: bool = True,
        pad: bool = False,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        if output not in ("tokens", "nchw"):
            fail("output", output, '"tokens" or "nchw"')
        for name, size in (("img_size", img_size), ("patch_size", patch_size)):
            pair = to_2tuple(size) if isinstance(size, (int, tuple, list)) else ()
            if len(pair) != 2 or not all(is_int(s) and s > 0 for s in pair):
                fail(name, size, "a positive int or (H, W) pair")
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        if not pad:
            for i in range(2):
                if self.img_size[i] % self.patch_size[i]:
                    fail("img_size", self.img_size, f"sizes divisible by patch_size={self.patch_size} (or pad=True)")
        check_int("in_chans", in_chans)
        check_int("embed_dim", embed_dim)
        self.grid_size = tuple(-(-s // p) for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.output, self.strict_img_size, self.pad = output, strict_img_size, pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm if norm is not None else nn.Identity()

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) that an input of (height, width) produces."""
        ph, pw = self.patch_size
        return (-(-height // ph), -(-width // pw)) if self.pad else (height // ph, width // pw)

    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        check_image(name, x, channels=self.in_chans, size=self.img_size if self.strict_img_size else None,
                    dtype=self.proj.weight.dtype)
        if not self.pad:
            h, w = x.shape[-2:]
            if h % self.patch_size[0] or w % self.patch_size[1]:
                fail(name, x, f"height and width divisible by patch_size={self.patch_size} (or enable padding)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) normed tokens in raster order, or (B, D, h, w) with ``output="nchw"``."""
        self.check_input(x)
        x = self._padded(x)
        if self.output == "nchw":
            return self.proj(x)
        if self._as_product(x):
            return self._product_tokens(x)
        return self.norm(rearrange(self.proj(x), "b d h w -> b (h w) d"))

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pad:
            return x
        ph, pw = self.patch_size
        h, w = x.shape[-2:]
        return F.pad(x, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))

    def _as_product(self, x: torch.Tensor) -> bool:
        """CPU fp32 inference (the convolution is kept for autograd, other devices and dtypes, and compile)."""
        bias = self.proj.bias
        return native_inference_ready(x, self.proj.weight, *(() if bias is None else (bias,)))

    def _flat_weight(self) -> torch.Tensor:
        """proj.weight as (D, C*ph*pw), one view kept while the weight is the same tensor (the native GEMM keeps
        its packed copy per weight object, and a view shares the weight's version counter)."""
        weight = self.proj.weight
        kept = self.__dict__.get("_flat")
        if kept is None or kept[0] is not weight or kept[1].data_ptr() != weight.data_ptr():
            with torch.inference_mode(False):
                kept = self.__dict__["_flat"] = (weight, weight.view(weight.shape[0], -1))
        return kept[1]

    def _product_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as patches (B, N, C*ph*pw) times the flattened kernel, the norm in the product's
        epilogue where the native GEMM takes it."""
        b, c, h, w = x.shape
        ph, pw = self.patch_size
        gh, gw = h // ph, w // pw
        patches = x.view(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        weight, bias, norm = self._flat_weight(), self.proj.bias, self.norm
        if is_layer_norm(norm, weight.shape[0]) and gemm_taken(patches, weight, bias, norm.weight, norm.bias):
            out = gemm(patches, weight, bias, norm=(norm.weight, norm.bias, norm.eps), keep_sum=False)
            if out is not None:
                return out[1]
        return norm(linear(patches, weight, bias))  # (linear takes the native GEMM itself where it may)
