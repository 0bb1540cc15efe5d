"""torchvision state dicts (``vit_b_16`` / ``vit_*``, ``swin_t`` / ``swin_s`` / ``swin_b`` v1) -> visionformers.

ViT: torchvision's encoder layers hold an ``nn.MultiheadAttention`` whose packed ``in_proj_weight`` is
[W_q; W_k; W_v] (3D, D) -- the same row layout as our fused ``qkv`` -- and its position table covers
the class token, so it maps one to one. Swin v1: ``features`` alternates patch embedding / merging and
stages; its patch merging concatenates x0, x1, x2, x3 in timm's order, and its bias tables have our
layout. torchvision pads a map that is not a multiple of the window *before* the roll (timm after), so
the two agree only at multiples of the window (every size of the 224 presets).
"""
from __future__ import annotations

import re

import torch

from visionformers.convert._common import (
    check_blocks_complete,
    check_state_dict,
    check_vision_args,
    complete_state_dict,
    count_indices,
    patch_weight,
    resample_vit_positions,
    swin_config_from_tables,
    unknown_architecture,
    unsupported,
    vit_heads,
    vit_source_grid,
    with_img_size,
)
from visionformers.vision.vit import ViTConfig

__all__ = ["from_torchvision"]

ACCEPTED = "torchvision VisionTransformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14: keys 'conv_proj.weight', 'encoder.layers.encoder_layer_N...') or SwinTransformer v1 (swin_t, swin_s, swin_b: 'features.N.M.attn.relative_position_bias_table')"

_VIT_BLOCK = {
    "ln_1": "norm1",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    "mlp.linear_1": "mlp.fc1",  # torchvision < 0.13 names (MLPBlock version 1)
    "mlp.linear_2": "mlp.fc2",
}
_SWIN_BLOCK = {
    "norm1": "norm1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.proj",
    "norm2": "norm2",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
}


def from_torchvision(
    state_dict: dict[str, torch.Tensor],
    config=None,
    *,
    img_size=None,
    num_heads: int | None = None,
    return_config: bool = False,
):
    """Convert a torchvision ViT / Swin v1 state dict to visionformers names.

    ``config`` / ``img_size`` / ``num_heads`` / ``return_config`` as in :func:`from_timm`: the position
    table is resampled to the target ``img_size``; ``(config, state_dict)`` is returned on request.
    """
    state = check_state_dict(state_dict)
    check_vision_args(config, img_size, num_heads)
    with complete_state_dict("torchvision"):
        if "conv_proj.weight" in state and "encoder.pos_embedding" in state:
            cfg, out = _vit(state, config, img_size, num_heads)
        elif any(k.startswith("features.") and k.endswith(("attn.relative_position_bias_table", "attn.logit_scale")) for k in state):
            cfg, out = _swin(state, config, img_size)
        elif any(k.startswith("encoder.") for k in state) and "conv_proj.conv_last.weight" in state:
            raise unsupported("torchvision ViT", "conv_proj.conv_last.weight", "a convolutional stem (conv_stem_configs)")
        else:
            raise unknown_architecture("torchvision", state, ACCEPTED)
    check_blocks_complete(out, "torchvision")
    return (cfg, out) if return_config else out


def _vit(state: dict, config, img_size, num_heads):
    if "heads.pre_logits.weight" in state:
        raise unsupported("torchvision ViT", "heads.pre_logits.weight", "a representation layer (representation_size)")
    w = patch_weight(state, "conv_proj.weight", "torchvision ViT")  # (D, C, p, p)
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[-1]
    prefix = "encoder.layers.encoder_layer_"
    depth = count_indices(state, rf"{re.escape(prefix)}(\d+)\.")
    _, grid = vit_source_grid(state["encoder.pos_embedding"].shape[1], 1, patch, config)
    kw = dict(
        img_size=grid[0] * patch if grid[0] == grid[1] else (grid[0] * patch, grid[1] * patch),
        patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
        num_heads=vit_heads(dim, config, num_heads),
        mlp_ratio=state[f"{prefix}0.mlp.0.weight" if f"{prefix}0.mlp.0.weight" in state else f"{prefix}0.mlp.linear_1.weight"].shape[0] / dim,
        num_classes=state["heads.head.weight"].shape[0] if "heads.head.weight" in state else 0,
    )
    if isinstance(config, ViTConfig):
        kw.update(dynamic_img_size=config.dynamic_img_size, dynamic_img_pad=config.dynamic_img_pad)
    target = img_size if img_size is not None else (config.img_size if isinstance(config, ViTConfig) else None)
    cfg = with_img_size(ViTConfig(**kw), target)

    out = {}
    for key, value in state.items():
        if key == "class_token":
            out["cls_token"] = value
        elif key.startswith("conv_proj."):
            out["patch_embed.proj." + key[len("conv_proj."):]] = value
        elif key == "encoder.pos_embedding":
            out["pos_embed.weight"] = value
        elif key.startswith("encoder.ln."):
            out["norm." + key[len("encoder.ln."):]] = value
        elif key.startswith("heads.head."):
            out["head." + key[len("heads.head."):]] = value
        elif m := re.match(rf"{re.escape(prefix)}(\d+)\.(.+)$", key):
            rest = m.group(2)  # "ln_1.weight", "self_attention.in_proj_weight", ...
            module, _, param = rest.rpartition(".")
            ours = _VIT_BLOCK.get(rest) or (f"{_VIT_BLOCK[module]}.{param}" if module in _VIT_BLOCK else None)
            if ours is None:
                raise unsupported("torchvision ViT", key, "no counterpart in visionformers' VisionTransformer")
            out[f"blocks.{m.group(1)}.{ours}"] = value
        else:
            raise unsupported("torchvision ViT", key, "no counterpart in visionformers' VisionTransformer")
    resample_vit_positions(out, cfg, grid)
    return cfg, out


def _swin(state: dict, config, img_size):
    if any(".attn.logit_scale" in k or ".attn.cpb_mlp." in k for k in state):
        key = next(k for k in state if ".attn.logit_scale" in k or ".attn.cpb_mlp." in k)
        raise unsupported("torchvision Swin", key, "Swin V2 (swin_v2_*: cosine attention, log-spaced CPB)")
    # features.0 = patch embedding; features.1, 3, 5, 7 = stages; features.2, 4, 6 = patch merging
    num_stages = (count_indices(state, r"features\.(\d+)\.") + 1) // 2
    depths = tuple(count_indices(state, rf"features\.{2 * i + 1}\.(\d+)\.") for i in range(num_stages))
    out = {}
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue  # a buffer rebuilt from the config
        if m := re.match(r"features\.0\.0\.(weight|bias)$", key):
            out[f"patch_embed.proj.{m.group(1)}"] = value
        elif m := re.match(r"features\.0\.2\.(weight|bias)$", key):
            out[f"patch_embed.norm.{m.group(1)}"] = value
        elif m := re.match(r"features\.(\d+)\.(\d+)\.attn\.relative_position_bias_table$", key):
            out[f"layers.{int(m.group(1)) // 2}.rel_bias.{m.group(2)}.table"] = value
        elif (m := re.match(r"features\.(\d+)\.(\d+)\.(.+)\.(weight|bias)$", key)) and m.group(3) in _SWIN_BLOCK:
            out[f"layers.{int(m.group(1)) // 2}.blocks.{m.group(2)}.{_SWIN_BLOCK[m.group(3)]}.{m.group(4)}"] = value
        elif m := re.match(r"features\.(\d+)\.(norm|reduction)\.(weight|bias)$", key):
            out[f"layers.{int(m.group(1)) // 2}.downsample.{m.group(2)}.{m.group(3)}"] = value
        elif key.startswith(("norm.", "head.")):
            out[key] = value
        else:
            raise unsupported("torchvision Swin", key, "no counterpart in visionformers' SwinTransformer")
    w = out["patch_embed.proj.weight"]
    cfg = swin_config_from_tables(
        out, embed_dim=w.shape[0], patch=w.shape[-1], in_chans=w.shape[1], depths=depths,
        num_classes=out["head.weight"].shape[0] if "head.weight" in out else 0,
        mlp_ratio=out["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / w.shape[0],
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in out, config=config, img_size=img_size,
    )
    return cfg, out
