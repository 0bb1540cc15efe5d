"""timm state dicts (``vit_*``, ``swin_*``) -> visionformers state dicts.

timm's ViT and Swin (current layout, patch merging at the start of stages 1..3) already use our block
names (norm1, attn.qkv, attn.proj, mlp.fc1, ...); what changes is the position table's module, the
Swin bias tables (held beside the blocks here) and the classifier name. The architecture is read
from the keys and shapes; heads of a ViT cannot be, so the published head count of its width is used
unless ``num_heads`` (or ``config``) says otherwise.
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

__all__ = ["from_timm"]

ACCEPTED = "timm VisionTransformer (vit_*: keys 'blocks.N.attn.qkv.weight', 'patch_embed.proj.weight') or SwinTransformer (swin_*: 'layers.N.blocks.M.attn.relative_position_bias_table')"

# timm ViT variants whose parts we do not model: refuse them by name instead of converting wrongly
_VIT_UNSUPPORTED = {
    "norm_pre.weight": "a pre-transformer norm (CLIP-style ViT)",
    "attn_pool.latent": "attention pooling (global_pool='map')",
    "patch_embed.norm.weight": "a norm after the patch embedding",
    "blocks.0.mlp.fc1_g.weight": "a gated (SwiGLU) MLP",
    "blocks.0.attn.norm.weight": "a norm inside attention (scale_attn_norm)",
    "blocks.0.norm.weight": "a parallel / custom block",
}


def from_timm(
    state_dict: dict[str, torch.Tensor],
    config=None,
    *,
    img_size=None,
    num_heads: int | None = None,
    return_config: bool = False,
):
    """Convert a timm ``vit_*`` / ``swin_*`` state dict to visionformers names.

    ``config``: the target model's config (e.g. the registry preset); its ``img_size`` is the resampling
    target and its ``num_heads`` / ``global_pool`` fill what the weights cannot tell. ``img_size``
    overrides the target size: a ViT's position table is resampled to it (bicubic, as timm).
    Returns the state dict, or ``(config, state_dict)`` with ``return_config`` (``vf.convert.build_model``
    builds and loads the matching model).
    """
    state = check_state_dict(state_dict)
    check_vision_args(config, img_size, num_heads)
    with complete_state_dict("timm"):
        if "blocks.0.attn.qkv.weight" in state and "patch_embed.proj.weight" in state:
            cfg, out = _vit(state, config, img_size, num_heads)
        elif "layers.0.blocks.0.attn.relative_position_bias_table" in state:
            cfg, out = _swin(state, config, img_size)
        else:
            raise unknown_architecture("timm", state, ACCEPTED)
    check_blocks_complete(out, "timm")
    return (cfg, out) if return_config else out


def _vit(state: dict, config, img_size, num_heads):
    for key, why in _VIT_UNSUPPORTED.items():
        if key in state:
            raise unsupported("timm ViT", key, why)
    w = patch_weight(state, "patch_embed.proj.weight", "timm ViT")  # (D, C, p, p)
    dim, in_chans, ph, pw = w.shape
    if ph != pw:
        raise unsupported("timm ViT", "patch_embed.proj.weight", f"non-square patches {ph}x{pw}")
    depth = count_indices(state, r"blocks\.(\d+)\.")
    num_reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    class_token = "cls_token" in state
    num_prefix = int(class_token) + num_reg
    fc_norm = "fc_norm.weight" in state
    if fc_norm or not class_token:
        pool = "avg"
    else:
        pool = config.global_pool if isinstance(config, ViTConfig) else "cls"
    kw = dict(
        patch_size=ph, in_chans=in_chans, embed_dim=dim, depth=depth, num_heads=vit_heads(dim, config, num_heads),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim, qkv_bias="blocks.0.attn.qkv.bias" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state, class_token=class_token, num_reg_tokens=num_reg,
        global_pool=pool, fc_norm=True if fc_norm else (False if pool == "avg" else None), num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        layer_scale_init=1e-5 if "blocks.0.ls1.gamma" in state else None,
    )
    if isinstance(config, ViTConfig):  # run-time choices the weights cannot tell
        kw.update(dynamic_img_size=config.dynamic_img_size, dynamic_img_pad=config.dynamic_img_pad)
    source_grid = None
    if "pos_embed" in state:
        with_prefix, source_grid = vit_source_grid(state["pos_embed"].shape[1], num_prefix, ph, config)
        kw.update(pos_embed="learned", pos_embed_prefix=with_prefix, img_size=(source_grid[0] * ph, source_grid[1] * pw))
        if source_grid[0] == source_grid[1]:
            kw["img_size"] = source_grid[0] * ph
    else:
        kw.update(pos_embed="none", img_size=config.img_size if isinstance(config, ViTConfig) else 224)
    target = img_size if img_size is not None else (config.img_size if isinstance(config, ViTConfig) else None)
    cfg = with_img_size(ViTConfig(**kw), target)

    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            out["pos_embed.weight"] = value
        elif key in ("cls_token", "reg_token") or key.startswith(("patch_embed.proj.", "blocks.", "norm.", "fc_norm.", "head.")):
            out[key] = value
        else:
            raise unsupported("timm ViT", key, "no counterpart in visionformers' VisionTransformer")
    if source_grid is not None:
        resample_vit_positions(out, cfg, source_grid)
    return cfg, out


def _swin(state: dict, config, img_size):
    if any(".attn.logit_scale" in k or ".attn.cpb_mlp." in k for k in state):
        raise unsupported("timm Swin", next(k for k in state if "logit_scale" in k or "cpb_mlp" in k), "Swin V2 (cosine attention)")
    depths = tuple(count_indices(state, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(count_indices(state, r"layers\.(\d+)\.")))
    # checkpoints from before timm 0.9 hold patch merging at the end of stages 0..2: move it to 1..3
    legacy = "layers.0.downsample.reduction.weight" in state
    out = {}
    for key, value in state.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue  # buffers rebuilt from the config
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if m and legacy:
            key = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$", key)
        if m:
            out[f"layers.{m.group(1)}.rel_bias.{m.group(2)}.table"] = value
        elif key.startswith("head.fc."):
            out["head." + key[len("head.fc."):]] = value
        elif key.startswith(("patch_embed.", "layers.", "norm.", "head.")):
            out[key] = value
        else:
            raise unsupported("timm Swin", key, "no counterpart in visionformers' SwinTransformer")
    w = out["patch_embed.proj.weight"]  # (C, in_chans, p, p)
    cfg = swin_config_from_tables(
        out, embed_dim=w.shape[0], patch=w.shape[-1], in_chans=w.shape[1], depths=depths,
        num_classes=out["head.weight"].shape[0] if "head.weight" in out else 0,
        mlp_ratio=out["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / w.shape[0],
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in out, config=config,
        img_size=img_size,
    )
    return cfg, out
