"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "LDM", sec. 3 and appendix G).

An encoder of residual blocks at falling resolution maps an image to the mean and log-variance of a diagonal
Gaussian over a latent ``factor`` times smaller per side; a mirrored decoder maps a latent back to pixels. Both
have a middle block (residual, self-attention, residual) whose attention is the shared ``nn.Attention`` on a
(B, H*W, C) view. The layout is the one of diffusers' ``AutoencoderKL`` (the SD / SD3 / Flux VAEs), so their
weights load through ``visionformers.convert.diffusers_vae``.

A denoiser trained on these latents sees ``(z - shift_factor) * scaling_factor`` (LDM sec. 4.3.2 and D.1: unit
variance latents); :meth:`AutoencoderKL.encode_latents` and :meth:`AutoencoderKL.decode_latents` apply and undo
that. Large images are encoded and decoded tile by tile with blended overlaps (:meth:`enable_tiling`) and large
batches image by image (:meth:`enable_slicing`), as diffusers does, so a 1024 px decode fits in little memory.
Under ``torch.autocast`` (bf16) the convolutions and products run in bf16 while GroupNorm and softmax stay fp32
(autocast's fp32 list); bf16 keeps fp32's range, so the SD VAE's large decoder activations do not overflow as
they do in fp16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from visionformers._validate import check_bool, check_image, check_int, check_number, check_tensor, fail, is_int
from visionformers.nn import Attention
from visionformers.vision.unet_blocks import Downsample, Upsample

__all__ = ["AutoencoderKLConfig", "AutoencoderKL", "DiagonalGaussian"]


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """AutoencoderKL hyper-parameters; the defaults are the SD 1.x / 2.x VAE (sd-vae-ft-ema / -mse), 83.7M."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4  # SD 1.x/2.x: 4; SD3 and Flux: 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder widths; each but the last halves H, W
    layers_per_block: int = 2  # residual blocks per encoder level (the decoder has one more, as in LDM)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every width
    norm_eps: float = 1e-6
    mid_block_attention: bool = True  # self-attention between the two middle residual blocks
    use_quant_conv: bool = True  # 1x1 conv on the moments after the encoder (SD 1.x/2.x; not SD3 / Flux)
    use_post_quant_conv: bool = True  # 1x1 conv on the latent before the decoder
    sample_size: int = 512  # pixel tile size of tiled encode / decode (diffusers' tile_sample_min_size)
    scaling_factor: float = 0.18215  # the denoiser sees (z - shift_factor) * scaling_factor: ~unit variance
    shift_factor: float = 0.0  # SD3: 0.0609, Flux: 0.1159; SD 1.x/2.x: none

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                     "sample_size"):
            check_int(name, getattr(self, name))
        for name in ("mid_block_attention", "use_quant_conv", "use_post_quant_conv"):
            check_bool(name, getattr(self, name))
        widths = self.block_out_channels
        if not isinstance(widths, tuple) or not widths or not all(is_int(w) and w > 0 for w in widths):
            fail("block_out_channels", widths, "a non-empty tuple of positive ints, e.g. (128, 256, 512, 512)")
        if any(w % self.norm_num_groups for w in widths):
            fail("norm_num_groups", self.norm_num_groups, f"a divisor of every width in block_out_channels={widths}")
        if self.sample_size % self.factor:
            fail("sample_size", self.sample_size, f"a multiple of the downsampling factor {self.factor}")
        check_number("norm_eps", self.norm_eps, above=0)
        check_number("scaling_factor", self.scaling_factor, above=0)
        check_number("shift_factor", self.shift_factor)

    @property
    def factor(self) -> int:
        """Pixels per latent position along each side (8 for the SD VAEs)."""
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))) (LDM appendix G; Kingma & Welling 2014)."""

    def __init__(self, moments: torch.Tensor):
        """moments (B, 2C, h, w): the mean's C channels, then the log-variance's."""
        check_tensor("moments", moments, ndim=4, floating=True)
        if moments.shape[1] % 2:
            fail("moments", moments, "an even channel count (mean and log-variance)")
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM: exp() stays finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps drawn from ``generator`` (on the mean's device) -> (B, C, h, w)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) summed over each image's latent -> (B,) (Kingma & Welling 2014, appendix B)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv, plus a skip (1x1 conv where the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, norm_eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W) -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class MidAttention(nn.Module):
    """x + Attention(GroupNorm(x)) over the H*W positions, one head as wide as the map (LDM's AttnBlock)."""

    def __init__(self, channels: int, norm_groups: int, norm_eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=norm_eps)
        self.attn = Attention(channels, num_heads=1, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        height = x.shape[2]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        out = self.attn(tokens)  # (B, H*W, C)
        return x + rearrange(out, "b (h w) c -> b c h w", h=height)


class MidBlock(nn.Module):
    """Residual block, optional self-attention, residual block: the bottleneck of encoder and decoder."""

    def __init__(self, channels: int, norm_groups: int, norm_eps: float, attention: bool):
        super().__init__()
        self.res1 = ResnetBlock(channels, channels, norm_groups, norm_eps)
        self.attn = MidAttention(channels, norm_groups, norm_eps) if attention else None
        self.res2 = ResnetBlock(channels, channels, norm_groups, norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x)


class Level(nn.Module):
    """Residual blocks at one resolution, then an optional resampler."""

    def __init__(self, resnets: list[ResnetBlock], resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H / factor, W / factor)."""

    def __init__(self, c: AutoencoderKLConfig):
        super().__init__()
        widths, g, eps = c.block_out_channels, c.norm_num_groups, c.norm_eps
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        levels, prev = [], widths[0]
        for i, w in enumerate(widths):
            resnets = [ResnetBlock(prev if j == 0 else w, w, g, eps) for j in range(c.layers_per_block)]
            # LDM pads right and bottom before the stride-2 conv (odd sizes round up)
            levels.append(Level(resnets, Downsample(w, padding=0) if i < len(widths) - 1 else None))
            prev = w
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlock(widths[-1], g, eps, c.mid_block_attention)
        self.norm_out = nn.GroupNorm(g, widths[-1], eps=eps)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h * factor, w * factor)."""

    def __init__(self, c: AutoencoderKLConfig):
        super().__init__()
        widths, g, eps = tuple(reversed(c.block_out_channels)), c.norm_num_groups, c.norm_eps
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], g, eps, c.mid_block_attention)
        levels, prev = [], widths[0]
        for i, w in enumerate(widths):
            resnets = [ResnetBlock(prev if j == 0 else w, w, g, eps) for j in range(c.layers_per_block + 1)]
            levels.append(Level(resnets, Upsample(w) if i < len(widths) - 1 else None))
            prev = w
        self.levels = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, widths[-1], eps=eps)
        self.conv_out = nn.Conv2d(widths[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _blend_tiles(tiles: list[list[torch.Tensor]], blend: int, keep: int) -> torch.Tensor:
    """Join a grid of overlapping tiles: each tile fades in linearly over ``blend`` rows / columns from the one
    above and the one to its left (already blended, as diffusers' ``blend_v`` / ``blend_h``), then is cut to its
    first ``keep`` rows and columns."""
    rows = []
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            if i > 0 and blend > 0:
                above = tiles[i - 1][j]
                e = min(above.shape[2], tile.shape[2], blend)
                w = (torch.arange(e, device=tile.device, dtype=torch.float64) / e).to(tile.dtype)[:, None]  # (e, 1)
                tile[:, :, :e, :] = above[:, :, -e:, :] * (1 - w) + tile[:, :, :e, :] * w
            if j > 0 and blend > 0:
                left = row[j - 1]
                e = min(left.shape[3], tile.shape[3], blend)
                w = (torch.arange(e, device=tile.device, dtype=torch.float64) / e).to(tile.dtype)  # (e,)
                tile[:, :, :, :e] = left[:, :, :, -e:] * (1 - w) + tile[:, :, :, :e] * w
        rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))
    return torch.cat(rows, dim=2)


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode(x)`` -> :class:`DiagonalGaussian`, ``decode(z)`` -> image; ``model(x)`` -> (recon, posterior)."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_size = c.sample_size
        self.tile_overlap = 0.25

    @property
    def factor(self) -> int:
        return self.config.factor

    # ---- memory options (diffusers' enable_slicing / enable_tiling) ----

    def enable_slicing(self, enabled: bool = True) -> None:
        """Encode and decode a batch one image at a time (same result, peak memory of one image)."""
        check_bool("enabled", enabled)
        self.use_slicing = enabled

    def enable_tiling(self, enabled: bool = True, tile_sample_size: int | None = None, overlap: float = 0.25) -> None:
        """Encode and decode images larger than ``tile_sample_size`` pixels (default ``config.sample_size``) in
        overlapping tiles blended linearly over ``overlap`` of a tile, as diffusers' ``enable_tiling``. Each tile
        sees only itself, so the result differs slightly from the untiled one; memory stays that of one tile."""
        check_bool("enabled", enabled)
        size = self.config.sample_size if tile_sample_size is None else tile_sample_size
        check_int("tile_sample_size", size)
        if size % self.factor:
            fail("tile_sample_size", size, f"a multiple of the VAE's factor {self.factor}")
        check_number("overlap", overlap, at_least=0, below=1)
        f, lat = self.factor, size // self.factor
        # the kept part of each tile must equal the step between tiles, in pixels and in latents, or tiles would
        # overlap or leave gaps (diffusers' geometry assumes it; 0.25 with tiles of a multiple of 4 latents holds)
        enc_ok = int(size * (1 - overlap)) == (lat - int(lat * overlap)) * f
        dec_ok = int(lat * (1 - overlap)) * f == size - int(size * overlap)
        if not (enc_ok and dec_ok and int(lat * (1 - overlap)) >= 1):
            fail("overlap", overlap, f"an overlap whose tiles of tile_sample_size={size} ({lat} latents) step by "
                 "whole latents and blend over whole latents, e.g. 0.25 with tiles of a multiple of "
                 f"{4 * f} pixels")
        self.use_tiling, self.tile_sample_size, self.tile_overlap = enabled, size, overlap

    # ---- encode / decode ----

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def _tiled(self, x: torch.Tensor, fn, tile_in: int, tile_out: int) -> torch.Tensor:
        """Run ``fn`` on tiles of ``tile_in`` (input units) stepping by (1 - overlap) of a tile; blend outputs."""
        step = int(tile_in * (1 - self.tile_overlap))
        blend = int(tile_out * self.tile_overlap)
        tiles = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], step)]
                 for i in range(0, x.shape[2], step)]
        return _blend_tiles(tiles, blend, tile_out - blend)

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        size = self.tile_sample_size
        if self.use_tiling and (x.shape[2] > size or x.shape[3] > size):
            return self._tiled(x, self._encode_moments, size, size // self.factor)
        return self._encode_moments(x)

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        size = self.tile_sample_size // self.factor
        if self.use_tiling and (z.shape[2] > size or z.shape[3] > size):
            return self._tiled(z, self._decode, size, self.tile_sample_size)
        return self._decode(z)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, in_channels, H, W) in [-1, 1] -> the posterior over (B, latent_channels, H/factor, W/factor)."""
        check_image("x", x, channels=self.config.in_channels, dtype=self.conv_dtype)
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            fail("x", x, f"a height and width divisible by the VAE's factor {self.factor}")
        if self.use_slicing and x.shape[0] > 1:
            return DiagonalGaussian(torch.cat([self._encode_one(xi) for xi in x.split(1)]))
        return DiagonalGaussian(self._encode_one(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w) (unscaled) -> image (B, out_channels, h*factor, w*factor), ~[-1, 1]."""
        check_image("z", z, channels=self.config.latent_channels, dtype=self.conv_dtype)
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode_one(zi) for zi in z.split(1)])
        return self._decode_one(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction of x through a posterior sample (or its mean) -> (recon (B, C, H, W), posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def conv_dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    # ---- the denoiser's view of the latents ----

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> what the denoiser sees: (z - shift_factor) * scaling_factor."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scale_latents`: z / scaling_factor + shift_factor."""
        return z / self.config.scaling_factor + self.config.shift_factor

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images -> scaled latents for a denoiser: a posterior sample drawn from ``generator``."""
        return self.scale_latents(self.encode(x).sample(generator))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (a denoiser's output) -> images in [-1, 1] (clamped)."""
        return self.decode(self.unscale_latents(z)).clamp(-1, 1)
