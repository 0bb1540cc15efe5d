"""Image to patch tokens with one strided convolution (Dosovitskiy et al. 2021, eq. 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from visionformers._validate import check_image, check_int, fail, is_int

__all__ = ["PatchEmbed", "to_2tuple"]


def to_2tuple(x) -> tuple[int, int]:
    """(x, x) for an int, else the pair as a tuple (timm's helper)."""
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
        return self.norm(rearrange(self.proj(x), "b d h w -> b (h w) d"))

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pad:
            return x
        ph, pw = self.patch_size
        h, w = x.shape[-2:]
        return F.pad(x, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))
