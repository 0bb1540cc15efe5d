"""The time-conditioned UNet of denoising diffusion (Ho et al. 2020, "DDPM", appendix B).

Levels of residual blocks at falling resolution with skip connections to their mirror on the way up,
self-attention at chosen resolutions, GroupNorm throughout. Options from later work: scale-shift time
conditioning (Dhariwal & Nichol 2021, "AdaGN"), class conditioning with a learned null class for
classifier-free guidance (Ho & Salimans 2022), cross-attention to a text context (Saharia et al. 2022,
Imagen), self-conditioning (Chen et al. 2023, "Analog Bits", sec. 3) and a learned variance output
(Nichol & Dhariwal 2021, sec. 3.1). The network knows nothing of the noise process: it maps
``(x_t, t, **cond)`` to a tensor like x_t; ``visionformers.diffusion`` decides what it means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_bool, check_choice, check_image, check_int, check_number, check_probability, fail, is_int
from visionformers.nn import TimestepEmbedding
from visionformers.nn.grad_checkpoint import checkpointed
from visionformers.nn.timestep import FourierFeatures
from visionformers.vision.denoiser_inputs import check_context, check_timesteps, class_labels_or_null, pooled_context
from visionformers.vision.unet_blocks import Downsample, ResBlock, SpatialAttention, Upsample, zero_init_

__all__ = ["UNetConfig", "UNet"]

# "positional": sinusoids of t (DDPM); "fourier": Gaussian Fourier features of log t with scale 16 (Song et al. 2021,
# "Score-Based Generative Modeling through SDEs", NCSN++), where t is a noise level sigma and the output is divided by it
TIME_EMBEDDINGS = ("positional", "fourier")


@dataclass(frozen=True)
class UNetConfig:
    """UNet hyper-parameters; the defaults are the DDPM CIFAR-10 network (35.7M parameters)."""

    sample_size: int = 32  # training resolution; attention_resolutions are read against it
    in_channels: int = 3
    base_channels: int = 128  # width of the first level ("ch" in DDPM)
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # level i has base_channels * channel_mults[i] channels
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up, for the skips)
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention after each block
    attention_head_dim: int | None = None  # None: one head as wide as the level (DDPM); 64: guided-diffusion
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    dropout: float = 0.0  # before each block's second conv, training only (DDPM CIFAR-10: 0.1)
    norm_groups: int = 32  # GroupNorm groups (Wu & He 2018); must divide every level's width
    norm_eps: float = 1e-6
    use_scale_shift_norm: bool = False  # True: GN(h) * (1 + s) + b from t (AdaGN); False: DDPM's h + proj(t)
    time_flip_sin_to_cos: bool = False  # DDPM's sinusoids are [sin, cos]; diffusers' default is [cos, sin]
    time_freq_shift: float = 1.0  # DDPM divides log(10000) by (half - 1)
    num_classes: int | None = None  # None: unconditional; id num_classes is the learned null class (CFG)
    context_dim: int | None = None  # width of a context sequence to cross-attend (text); None: no cross-attention
    pooled_context: bool = False  # also add a projection of the context's mean to the time embedding (Imagen)
    self_condition: bool = False  # extra input channels for the model's own previous x0 estimate
    learn_sigma: bool = False  # output 2x channels: the prediction, then the variance interpolation v
    # Layout options of published ports (diffusers' UNet2DModel); the defaults are the layout above.
    downsample_padding: int = 1  # 0: pad right/bottom by one, then an unpadded stride-2 conv (TF "SAME", as DDPM's code)
    time_embedding_type: str = "positional"  # "fourier": Fourier features of log t, output divided by t (NCSN++)
    mid_attention_norm: bool = True  # GroupNorm before the middle attention (diffusers' scale-shift UNet has none)

    # Fields newer than the first saved UNets: a config.json without them loads with these defaults (the old network).
    added_fields: ClassVar[frozenset[str]] = frozenset({"downsample_padding", "time_embedding_type", "mid_attention_norm",
                                                        "pooled_context"})

    def __post_init__(self):
        for name in ("sample_size", "in_channels", "base_channels", "num_res_blocks", "norm_groups"):
            check_int(name, getattr(self, name))
        for name in ("mid_attention", "use_scale_shift_norm", "time_flip_sin_to_cos", "self_condition", "learn_sigma",
                     "mid_attention_norm", "pooled_context"):
            check_bool(name, getattr(self, name))
        check_choice("downsample_padding", self.downsample_padding, (0, 1))
        check_choice("time_embedding_type", self.time_embedding_type, TIME_EMBEDDINGS)
        mults = self.channel_mults
        if not isinstance(mults, tuple) or not mults or not all(is_int(m) and m > 0 for m in mults):
            fail("channel_mults", mults, "a non-empty tuple of positive ints, e.g. (1, 2, 2, 2)")
        factor = 2 ** (len(mults) - 1)
        if self.sample_size % factor:
            fail("sample_size", self.sample_size, f"a multiple of {factor} (the UNet halves it {len(mults) - 1} times)")
        for width in (self.base_channels, *self.level_channels):  # the stem's width feeds the first GroupNorm
            if width % self.norm_groups:
                fail("norm_groups", self.norm_groups,
                     f"a divisor of base_channels={self.base_channels} and every level's width {self.level_channels}")
        reachable = self.level_resolutions
        if not isinstance(self.attention_resolutions, tuple) or any(r not in reachable for r in self.attention_resolutions):
            fail("attention_resolutions", self.attention_resolutions, f"a tuple drawn from the level sizes {reachable}")
        if self.attention_head_dim is not None:
            check_int("attention_head_dim", self.attention_head_dim, optional=True)
            widths = [self.level_channels[i] for i, r in enumerate(reachable) if r in self.attention_resolutions]
            if self.mid_attention:
                widths.append(self.level_channels[-1])
            if self.attention_head_dim <= 0 or any(w % self.attention_head_dim for w in widths):
                fail("attention_head_dim", self.attention_head_dim, f"None or a divisor of the attended widths {widths}")
        check_probability("dropout", self.dropout)
        check_number("norm_eps", self.norm_eps, above=0)
        # the sinusoids of t divide by (base_channels // 2 - time_freq_shift): it must stay positive
        check_number("time_freq_shift", self.time_freq_shift, below=self.base_channels // 2,
                     note=f" (half the timestep features, base_channels // 2 = {self.base_channels // 2})")
        if self.num_classes is not None and (not is_int(self.num_classes) or self.num_classes <= 0):
            fail("num_classes", self.num_classes, "None (unconditional) or a positive int")
        if self.context_dim is not None and (not is_int(self.context_dim) or self.context_dim <= 0):
            fail("context_dim", self.context_dim, "None (no cross-attention) or a positive int")
        if self.pooled_context and self.context_dim is None:
            fail("pooled_context", self.pooled_context, "False unless context_dim is set (it pools the text context)")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        return tuple(self.sample_size // 2**i for i in range(len(self.channel_mults)))

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


class UNetLevel(nn.Module):
    """One resolution of the UNet: residual blocks, each optionally followed by attention, then a resampler."""

    def __init__(self, resnets: list[ResBlock], attentions: list[SpatialAttention], resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty, or one per residual block
        self.resample = resample


class UNet(nn.Module):
    """Diffusion UNet: ``model(x, t, class_labels=None, context=None, context_mask=None)`` -> tensor like x."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, emb_dim, levels = c.base_channels, 4 * c.base_channels, len(c.channel_mults)
        fourier = c.time_embedding_type == "fourier"
        self.time_embed = TimestepEmbedding(emb_dim, freq_dim=2 * ch if fourier else ch,
                                            flip_sin_to_cos=c.time_flip_sin_to_cos, freq_shift=c.time_freq_shift)
        self.time_fourier = FourierFeatures(2 * ch, scale=16.0) if fourier else None
        # one row per class plus the null class, added to the time embedding (guided-diffusion's label_emb)
        self.class_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes is not None else None
        # the pooled text embedding, added to the time embedding as the class embedding is (Imagen)
        self.context_embed = nn.Linear(c.context_dim, emb_dim) if c.pooled_context else None
        self.conv_in = nn.Conv2d(c.in_channels * (2 if c.self_condition else 1), ch, 3, padding=1)

        res_kw = dict(dropout=c.dropout, norm_groups=c.norm_groups, norm_eps=c.norm_eps,
                      use_scale_shift_norm=c.use_scale_shift_norm)

        def attention(width: int, norm: bool = True) -> SpatialAttention:
            heads = 1 if c.attention_head_dim is None else width // c.attention_head_dim
            return SpatialAttention(width, heads, norm_groups=c.norm_groups, norm_eps=c.norm_eps,
                                    context_dim=c.context_dim, norm=norm)

        self.down_levels = nn.ModuleList()
        skip_widths, width = [ch], ch  # widths of the activations the up path concatenates
        for i, (out_w, res) in enumerate(zip(c.level_channels, c.level_resolutions)):
            resnets, attns = [], []
            for _ in range(c.num_res_blocks):
                resnets.append(ResBlock(width, out_w, emb_dim, **res_kw))
                attns += [attention(out_w)] if res in c.attention_resolutions else []
                width = out_w
                skip_widths.append(width)
            down = Downsample(width, padding=c.downsample_padding) if i < levels - 1 else None
            skip_widths += [width] if down is not None else []
            self.down_levels.append(UNetLevel(resnets, attns, down))

        self.mid_res1 = ResBlock(width, width, emb_dim, **res_kw)
        self.mid_attn = attention(width, norm=c.mid_attention_norm) if c.mid_attention else None
        self.mid_res2 = ResBlock(width, width, emb_dim, **res_kw)

        self.up_levels = nn.ModuleList()
        for i in reversed(range(levels)):
            out_w, res = c.level_channels[i], c.level_resolutions[i]
            resnets, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                resnets.append(ResBlock(width + skip_widths.pop(), out_w, emb_dim, **res_kw))
                attns += [attention(out_w)] if res in c.attention_resolutions else []
                width = out_w
            self.up_levels.append(UNetLevel(resnets, attns, Upsample(width) if i > 0 else None))

        self.norm_out = nn.GroupNorm(c.norm_groups, width, eps=c.norm_eps)
        self.conv_out = zero_init_(nn.Conv2d(width, c.out_channels, 3, padding=1))  # the net starts at 0
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual and attention block's activations in the backward pass (same gradients)."""
        check_bool("enable", enable)
        self.grad_checkpointing = enable

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        x_self_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W) with H, W multiples of 2^(levels-1); t (B,) or a scalar, in training-step units.

        class_labels (B,) long, id num_classes = null class (None on a class-conditional model: all null);
        context (B, M, context_dim) with context_mask (B, M) bool, True = attend; x_self_cond like x
        (None: zeros). Returns (B, C, H, W), or (B, 2C, H, W) with ``learn_sigma``.
        """
        c = self.config
        dtype = self.conv_in.weight.dtype
        check_image("x", x, channels=c.in_channels, dtype=dtype)
        factor = 2 ** (len(c.channel_mults) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            fail("x", x, f"height and width multiples of {factor} (trained at {c.sample_size}x{c.sample_size})")
        b = x.shape[0]
        t = check_timesteps(t, b, x.device)
        labels = class_labels_or_null(class_labels, c.num_classes, b, x.device)
        check_context(context, context_mask, c.context_dim, b, dtype)
        if c.self_condition:
            if x_self_cond is None:
                x_self_cond = torch.zeros_like(x)
            elif not isinstance(x_self_cond, torch.Tensor) or x_self_cond.shape != x.shape:
                fail("x_self_cond", x_self_cond, f"None or a tensor shaped like x {tuple(x.shape)}")
            x = torch.cat([x, x_self_cond.to(x.dtype)], dim=1)  # (B, 2C, H, W)
        elif x_self_cond is not None:
            fail("x_self_cond", x_self_cond, "None: this model was built without self_condition")

        if self.time_fourier is not None:  # t is a noise level sigma > 0 here
            emb = self.time_embed.project(self.time_fourier(t.log()))  # (B, 4 * base_channels)
        else:
            emb = self.time_embed(t)  # (B, 4 * base_channels)
        if labels is not None:
            emb = emb + self.class_embed(labels)
        if self.context_embed is not None:
            emb = emb + self.context_embed(pooled_context(context, context_mask))
        emb = F.silu(emb)  # every residual block applies SiLU before its projection: do it once

        h = self.conv_in(x)  # (B, C0, H, W)
        skips, ckpt = [h], self.grad_checkpointing
        for level in self.down_levels:
            for i, resnet in enumerate(level.resnets):
                h = checkpointed(resnet, h, emb, enabled=ckpt)
                if len(level.attentions):
                    h = checkpointed(level.attentions[i], h, context, context_mask, enabled=ckpt)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = checkpointed(self.mid_res1, h, emb, enabled=ckpt)
        if self.mid_attn is not None:
            h = checkpointed(self.mid_attn, h, context, context_mask, enabled=ckpt)
        h = checkpointed(self.mid_res2, h, emb, enabled=ckpt)

        for level in self.up_levels:
            for i, resnet in enumerate(level.resnets):
                h = checkpointed(resnet, torch.cat([h, skips.pop()], dim=1), emb, enabled=ckpt)  # (B, C + C_skip, H, W)
                if len(level.attentions):
                    h = checkpointed(level.attentions[i], h, context, context_mask, enabled=ckpt)
            if level.resample is not None:
                h = level.resample(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out / t.view(-1, 1, 1, 1) if self.time_fourier is not None else out  # NCSN++ predicts score * sigma
