"""Diffusion Transformer, DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Patchify the (latent) image, add fixed 2D sin-cos positions, run transformer blocks whose norms are
modulated by the timestep + class embedding with zero-initialised gates (adaLN-Zero, sec. 3.2), then a
modulated final norm and a zero-initialised linear decoder back to patches. Optional cross-attention to a
context sequence (text), in each block between self-attention and MLP (as PixArt-alpha, Chen et al. 2024).
The network knows nothing of the noise process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import nn

from visionformers._validate import check_bool, check_image, check_int, check_number, check_probability, fail, is_int
from visionformers.nn import AdaLNModulation, PatchEmbed, TimestepEmbedding, TransformerBlock, modulate, sincos_2d
from visionformers.vision.denoiser_inputs import check_context, check_timesteps, class_labels_or_null, pooled_context

__all__ = ["DiTConfig", "DiT"]


@dataclass(frozen=True)
class DiTConfig:
    """DiT hyper-parameters; the defaults are DiT-XL/2 on 32x32x4 latents of 256x256 images (675M parameters)."""

    sample_size: int = 32  # latent side: 256 px / the VAE's factor 8
    in_channels: int = 4  # Stable Diffusion VAE latents
    patch_size: int = 2  # the "/2" of DiT-XL/2: 256 tokens at 32x32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int | None = 1000  # None: unconditional; id num_classes is the learned null class (CFG)
    class_dropout_prob: float = 0.1  # training only: labels replaced by the null class, as DiT's LabelEmbedder
    learn_sigma: bool = True  # output 2x channels: the prediction, then the variance interpolation v
    context_dim: int | None = None  # width of a context sequence to cross-attend (text); None: no cross-attention
    pooled_context: bool = False  # also add a projection of the context's mean to the adaLN condition (SD3's pooled)
    freq_dim: int = 256  # sinusoidal features of t before the timestep MLP (DiT's frequency_embedding_size)
    time_freq_shift: float = 0.0  # DiT divides log(10000) by freq_dim/2; diffusers' DiT port by freq_dim/2 - 1

    # Fields newer than the first saved DiTs: a config.json without them loads with these defaults (the old network).
    added_fields: ClassVar[frozenset[str]] = frozenset({"pooled_context"})

    def __post_init__(self):
        for name in ("sample_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            check_int(name, getattr(self, name))
        if not is_int(self.freq_dim) or self.freq_dim < 2 or self.freq_dim % 2:
            fail("freq_dim", self.freq_dim, "an even int >= 2 (cos and sin halves of the timestep features)")
        # the sinusoids of t divide by (freq_dim // 2 - time_freq_shift): it must stay positive
        check_number("time_freq_shift", self.time_freq_shift, below=self.freq_dim // 2,
                     note=f" (half the timestep features, freq_dim // 2 = {self.freq_dim // 2})")
        check_bool("learn_sigma", self.learn_sigma)
        check_bool("pooled_context", self.pooled_context)
        if self.sample_size % self.patch_size:
            fail("sample_size", self.sample_size, f"a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            fail("hidden_size", self.hidden_size, f"a multiple of num_heads={self.num_heads} and of 4 (2D sin-cos)")
        check_number("mlp_ratio", self.mlp_ratio, above=0)
        if self.num_classes is not None and (not is_int(self.num_classes) or self.num_classes <= 0):
            fail("num_classes", self.num_classes, "None (unconditional) or a positive int")
        check_probability("class_dropout_prob", self.class_dropout_prob)
        if self.context_dim is not None and (not is_int(self.context_dim) or self.context_dim <= 0):
            fail("context_dim", self.context_dim, "None (no cross-attention) or a positive int")
        if self.pooled_context and self.context_dim is None:
            fail("pooled_context", self.pooled_context, "False unless context_dim is set (it pools the text context)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


class DiT(nn.Module):
    """Diffusion Transformer: ``model(x, t, class_labels=None, context=None, context_mask=None)`` -> tensor like x."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        d = c.hidden_size
        self.patch_embed = PatchEmbed(c.sample_size, c.patch_size, c.in_channels, d)
        grid = self.patch_embed.grid_size
        # fixed, so a buffer outside the state dict: the table is recomputed, never trained or loaded
        self.register_buffer("pos_embed", sincos_2d(grid, d)[None], persistent=False)  # (1, N, D)
        self.t_embed = TimestepEmbedding(d, freq_dim=c.freq_dim, freq_shift=c.time_freq_shift)  # [cos, sin] + MLP
        self.class_embed = nn.Embedding(c.num_classes + 1, d) if c.num_classes is not None else None
        self.context_embed = nn.Linear(c.context_dim, d) if c.pooled_context else None  # pooled text, into the condition
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d, c.num_heads, c.mlp_ratio, qkv_bias=True, mlp_act="gelu_tanh", norm_eps=1e-6, cond_dim=d,
                cross_attention=c.context_dim is not None, context_dim=c.context_dim,
            )
            for _ in range(c.depth)
        )
        self.norm_final = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)  # adaLN supplies scale and shift
        self.final_adaLN = AdaLNModulation(d, d, 2)
        self.head = nn.Linear(d, c.patch_size**2 * c.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier-uniform linears, N(0, 0.02) embeddings, adaLN and the output layer at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over the flattened patch
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embed.linear_2.weight, std=0.02)
        # adaLN-Zero: every block's modulation, and the final layer, start at zero (sec. 3.2)
        for module in self.modules():
            if isinstance(module, AdaLNModulation):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (less memory, ~1/3 more compute)."""
        for block in self.blocks:
            block.grad_checkpointing = enable

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, S, S) with S = sample_size; t (B,) or a scalar, in training-step units.

        class_labels (B,) long, id num_classes = null class (None on a class-conditional model: all null;
        in training, replaced by the null class with probability class_dropout_prob); context (B, M,
        context_dim) with context_mask (B, M) bool, True = attend. Returns (B, C or 2C, S, S).
        """
        c = self.config
        dtype = self.patch_embed.proj.weight.dtype
        check_image("x", x, channels=c.in_channels, size=(c.sample_size, c.sample_size), dtype=dtype)
        b = x.shape[0]
        t = check_timesteps(t, b, x.device)
        labels = class_labels_or_null(class_labels, c.num_classes, b, x.device)
        check_context(context, context_mask, c.context_dim, b, dtype)

        cond = self.t_embed(t)  # (B, D)
        if labels is not None:
            if self.training and c.class_dropout_prob > 0:
                drop = torch.rand(b, device=x.device) < c.class_dropout_prob
                labels = labels.masked_fill(drop, c.num_classes)
            cond = cond + self.class_embed(labels)
        if self.context_embed is not None:
            cond = cond + self.context_embed(pooled_context(context, context_mask))

        h = self.patch_embed(x) + self.pos_embed.to(x.dtype)  # (B, N, D)
        for block in self.blocks:
            h = block(h, cond=cond, context=context, context_mask=context_mask)
        shift, scale = self.final_adaLN(cond)  # (B, D) each
        h = self.head(modulate(self.norm_final(h), shift, scale))  # (B, N, p*p*C_out)
        gh, gw = self.patch_embed.grid_size
        p = c.patch_size
        return rearrange(h, "b (h w) (p q c) -> b c (h p) (w q)", h=gh, w=gw, p=p, q=p)
