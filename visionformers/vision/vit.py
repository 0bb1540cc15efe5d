"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", eq. 1-4).

Patches -> prefix tokens (class, registers) -> position information -> pre-norm transformer blocks ->
pooled head. Position information is a learned table (default, resampled for other image sizes), the
fixed 2D sin-cos table of MAE, or axial 2D RoPE applied inside attention. Every block is the shared
``nn.TransformerBlock``; attention maps come from its math path while the forward keeps the fused one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from visionformers._validate import (
    check_bool,
    check_choice,
    check_dtype,
    check_image,
    check_int,
    check_number,
    check_probability,
    check_tensor,
    fail,
    is_int,
)
from visionformers.nn import (
    LearnedPositionEmbedding2D,
    PatchEmbed,
    RotaryEmbedding2D,
    TransformerBlock,
    resample_pos_embed,
    sincos_2d,
    to_2tuple,
)

__all__ = ["ViTConfig", "VisionTransformer", "vit_grid_size"]

POS_EMBEDS = ("learned", "sincos", "rope", "none")
POOLS = ("cls", "avg")


def vit_grid_size(img_size, patch_size: int, pad: bool = False) -> tuple[int, int]:
    """Patch grid (h, w) of an image size; with ``pad`` a partial patch at the edge counts."""
    h, w = to_2tuple(img_size)
    return (-(-h // patch_size), -(-w // patch_size)) if pad else (h // patch_size, w // patch_size)


@dataclass(frozen=True)
class ViTConfig:
    img_size: int | tuple[int, int] = 224  # training resolution: fixes the learned position grid
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head; forward returns the pooled features (feature extractor)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # the original JAX ViT, timm and torchvision all bias q, k and v
    qk_norm: bool = False  # per-head LayerNorm of q, k (ViT-22B); stabilises large models
    class_token: bool = True
    num_reg_tokens: int = 0  # register tokens (Darcet et al. 2024) absorb the high-norm "global" attention
    global_pool: str = "cls"  # "cls": the class token; "avg": mean of the patch tokens
    fc_norm: bool | None = None  # norm after pooling instead of before; None: only for "avg" (timm's rule)
    pos_embed: str = "learned"  # "learned", "sincos" (fixed 2D, MAE), "rope" (axial 2D, Heo et al. 2024), "none"
    pos_embed_prefix: bool = True  # learned table also covers class/register tokens (ViT, DeiT); False: patches only (DeiT-3)
    rope_base: float = 100.0  # RoPE base for pixel-grid positions (Heo et al. 2024 use 100)
    dynamic_img_size: bool = False  # accept any size divisible by the patch; the position table is resampled per call
    dynamic_img_pad: bool = False  # zero-pad right/bottom edges up to a multiple of the patch
    layer_scale_init: float | None = None  # CaiT LayerScale init (DeiT-3 uses 1e-4); None: off
    norm_eps: float = 1e-6  # the JAX ViT LayerNorm epsilon, kept by timm and torchvision
    drop_rate: float = 0.0  # dropout before the classifier
    pos_drop_rate: float = 0.0  # dropout after adding positions
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 to this at the last block

    def __post_init__(self):
        size = to_2tuple(self.img_size) if isinstance(self.img_size, (int, tuple, list)) else None
        if size is None or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            fail("img_size", self.img_size, "a positive int or an (H, W) tuple of positive ints")
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            check_int(name, getattr(self, name))
        for name in ("num_classes", "num_reg_tokens"):
            check_int(name, getattr(self, name), minimum=0)
        for name in ("qkv_bias", "qk_norm", "class_token", "pos_embed_prefix", "dynamic_img_size", "dynamic_img_pad"):
            check_bool(name, getattr(self, name))
        check_bool("fc_norm", self.fc_norm, optional=True)
        if not self.dynamic_img_pad and any(s % self.patch_size for s in size):
            fail("img_size", self.img_size, f"sizes divisible by patch_size={self.patch_size} (or dynamic_img_pad=True)")
        if self.embed_dim % self.num_heads:
            fail("embed_dim", self.embed_dim, f"a multiple of num_heads={self.num_heads}")
        check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
        check_choice("global_pool", self.global_pool, POOLS)
        if self.global_pool == "cls" and not self.class_token:
            fail("global_pool", self.global_pool, '"avg" when class_token=False')
        if self.pos_embed == "rope" and (self.embed_dim // self.num_heads) % 4:
            fail("pos_embed", self.pos_embed, f"not 'rope' unless head_dim={self.embed_dim // self.num_heads} is divisible by 4")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            fail("pos_embed", self.pos_embed, f"not 'sincos' unless embed_dim={self.embed_dim} is divisible by 4")
        check_number("mlp_ratio", self.mlp_ratio, above=0)
        check_number("rope_base", self.rope_base, above=0)
        check_number("norm_eps", self.norm_eps, above=0)
        check_number("layer_scale_init", self.layer_scale_init, at_least=0, optional=True, note=" (0: off)")
        for name in ("drop_rate", "pos_drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate"):
            check_probability(name, getattr(self, name))

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_reg_tokens

    @property
    def grid_size(self) -> tuple[int, int]:
        return vit_grid_size(self.img_size, self.patch_size, self.dynamic_img_pad)


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding, prefix tokens, positions, transformer blocks, pooled linear head."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.num_prefix_tokens = c.num_prefix_tokens
        self.grid_size = c.grid_size
        self.patch_embed = PatchEmbed(
            c.img_size, c.patch_size, c.in_chans, d,
            strict_img_size=not (c.dynamic_img_size or c.dynamic_img_pad), pad=c.dynamic_img_pad,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if c.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.num_reg_tokens, d)) if c.num_reg_tokens else None
        self.pos_embed = self.rope = None
        if c.pos_embed == "learned":
            prefix = self.num_prefix_tokens if c.pos_embed_prefix else 0
            self.pos_embed = LearnedPositionEmbedding2D(self.grid_size, d, num_prefix_tokens=prefix)
        elif c.pos_embed == "sincos":
            self.register_buffer("sincos", sincos_2d(self.grid_size, d)[None], persistent=False)  # (1, h*w, D)
        elif c.pos_embed == "rope":
            self.rope = RotaryEmbedding2D(d // c.num_heads, base=c.rope_base)
        self.pos_drop = nn.Dropout(c.pos_drop_rate)
        rates = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]  # linear, as timm
        self.blocks = nn.ModuleList(
            TransformerBlock(
                d, c.num_heads, c.mlp_ratio, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, norm_eps=c.norm_eps,
                attn_drop=c.attn_drop_rate, proj_drop=c.proj_drop_rate, drop_path=rate,
                layer_scale_init=c.layer_scale_init, mlp_act="gelu",
            )
            for rate in rates
        )
        use_fc_norm = c.global_pool == "avg" if c.fc_norm is None else c.fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(d, eps=c.norm_eps)
        self.fc_norm = nn.LayerNorm(d, eps=c.norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(d, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ---- init -------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ViT init: trunc-normal(0.02) linears with zero bias, tiny prefix tokens, zero head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # patch projection: lecun-normal over the flattened patch, as the JAX ViT (fan-in of a C*p*p vector)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed.weight, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if isinstance(self.head, nn.Linear):  # zero head: every class starts equally likely
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward instead of storing them (memory for compute)."""
        for block in self.blocks:
            block.grad_checkpointing = enable

    # ---- forward ----------------------------------------------------------------------------------

    def _check_images(self, images) -> None:
        c = self.config
        check_image("images", images, channels=c.in_chans, dtype=self.patch_embed.proj.weight.dtype)
        h, w = images.shape[-2:]
        if not (c.dynamic_img_size or c.dynamic_img_pad) and (h, w) != to_2tuple(c.img_size):
            fail("images", images, f"spatial size (H, W)={to_2tuple(c.img_size)} (build with dynamic_img_size=True for others)")
        if not c.dynamic_img_pad and (h % c.patch_size or w % c.patch_size):
            fail("images", images, f"height and width divisible by patch_size={c.patch_size} (or dynamic_img_pad=True)")

    def _embed(self, images: torch.Tensor):
        """(B, C, H, W) -> tokens (B, P + h*w, D) with positions added, and RoPE (cos, sin) or None."""
        self._check_images(images)
        grid = self.patch_embed.grid_for(*images.shape[-2:])
        x = self.patch_embed(images)  # (B, h*w, D)
        b = x.shape[0]
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        rope = None
        if self.pos_embed is not None:
            pos = self.pos_embed(grid)  # (1, [P +] h*w, D), resampled when the grid differs from training
            if self.config.pos_embed_prefix:
                x = torch.cat(prefix + [x], dim=1) + pos
            else:
                x = torch.cat(prefix + [x + pos], dim=1)
        else:
            if self.config.pos_embed == "sincos":
                table = self.sincos if grid == self.grid_size else sincos_2d(grid, x.shape[-1]).to(x)[None]
                x = x + table
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
            if self.rope is not None:
                cos, sin = self.rope(grid, self.num_prefix_tokens)  # (P + h*w, head_dim) each
                rope = (cos.to(x.dtype), sin.to(x.dtype))
        return self.pos_drop(x), rope

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> normed tokens (B, P + h*w, D), prefix tokens first."""
        x, rope = self._embed(images)
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, N, D) -> logits (B, num_classes), or pooled features (B, D) with ``pre_logits``."""
        d, p = self.config.embed_dim, self.num_prefix_tokens
        check_tensor("x", x, ndim=3, floating=True)
        least = p + 1 if self.config.global_pool == "avg" else 1  # "avg" pools the tokens after the prefix
        if x.shape[-1] != d or x.shape[1] < least:
            fail("x", x, f"tokens (B, N, {d}) with N >= {least}, as forward_features returns")
        weight = self.head.weight if isinstance(self.head, nn.Linear) else getattr(self.fc_norm, "weight", None)
        if weight is not None:
            check_dtype("x", x, weight.dtype)
        if self.config.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        else:
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, num_classes) (pooled features (B, D) when num_classes=0)."""
        return self.forward_head(self.forward_features(images))

    def get_attention_maps(self, images: torch.Tensor, block_idx: int = -1) -> torch.Tensor:
        """Softmax attention weights of one block, (B, heads, N, N) with N = P + h*w; rows sum to 1.

        The blocks before ``block_idx`` run the usual fused path; only the requested block's attention is
        recomputed on the math path (``return_weights=True``) to expose its weights.
        """
        depth = self.config.depth
        if not is_int(block_idx) or not -depth <= block_idx < depth:
            fail("block_idx", block_idx, f"an int in [{-depth}, {depth - 1}]")
        block_idx %= depth
        x, rope = self._embed(images)
        for block in self.blocks[:block_idx]:
            x = block(x, rope=rope)
        block = self.blocks[block_idx]
        _, weights = block.attn(block.norm1(x), rope=rope, return_weights=True)
        return weights

    # ---- checkpoints ------------------------------------------------------------------------------

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor], source_config: ViTConfig) -> dict[str, torch.Tensor]:
        """Resample a learned position table saved for another image size / grid to this model's grid."""
        key = "pos_embed.weight"
        if self.pos_embed is None or key not in state_dict:
            return state_dict
        table = state_dict[key]
        if table.shape == self.pos_embed.weight.shape:
            return state_dict
        old_grid = vit_grid_size(source_config.img_size, source_config.patch_size, source_config.dynamic_img_pad)
        prefix = source_config.num_prefix_tokens if source_config.pos_embed_prefix else 0
        state_dict = dict(state_dict)
        state_dict[key] = resample_pos_embed(table, self.grid_size, old_grid, num_prefix_tokens=prefix)
        return state_dict
