"""Helpers shared by the state-dict converters: architecture errors, config inference, position resampling."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import torch
from torch import nn

from visionformers._validate import check_int, is_int
from visionformers.nn import resample_pos_embed
from visionformers.vision.swin import SwinConfig
from visionformers.vision.vit import ViTConfig, vit_grid_size

# Heads of the published ViT widths (head_dim 64, except ViT-H/14's 80); other widths default to dim // 64.
VIT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


def unknown_architecture(source: str, state_dict: dict, accepted: str) -> ValueError:
    keys = list(state_dict)[:6]
    return ValueError(
        f"state_dict (a {source} state dict?) with keys {keys}{' ...' if len(state_dict) > 6 else ''} is not a "
        f"recognised architecture; accepted: {accepted}"
    )


def unsupported(source: str, key: str, why: str) -> ValueError:
    return ValueError(f"state_dict key {key!r} ({source}) is not supported: {why}")


@contextlib.contextmanager
def complete_state_dict(source: str):
    """A key missing during conversion (a partial or cut-short state dict) -> ValueError naming it, not a KeyError."""
    try:
        yield
    except KeyError as e:
        raise ValueError(f"state_dict ({source}) is incomplete: converting it needs {e.args[0]!r}, which it lacks; "
                         "expected a whole model's state dict") from None


def check_blocks_complete(out: dict, source: str) -> dict:
    """A converted state dict whose repeated blocks are not all complete (a cut-short or partial source) -> ValueError.

    Groups keys as ``<prefix>blocks.<i>.<rest>``; every index 0..max of a prefix must be present with the
    same set of ``rest`` names as the others.
    """
    groups: dict[str, dict[int, set[str]]] = {}
    for key in out:
        if m := re.match(r"^(.*?blocks)\.(\d+)\.(.+)$", key):
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
    for prefix, blocks in groups.items():
        union = set().union(*blocks.values())
        for i in range(max(blocks) + 1):
            lacking = sorted(union - blocks.get(i, set()))
            if lacking:
                raise ValueError(f"state_dict ({source}) is incomplete: {prefix}.{i} lacks {lacking[:4]}"
                                 f"{' ...' if len(lacking) > 4 else ''}; expected a whole model's state dict")
    return out


def check_vision_args(config, img_size, num_heads) -> None:
    """The optional arguments shared by from_timm / from_torchvision."""
    if config is not None and not isinstance(config, (ViTConfig, SwinConfig)):
        raise ValueError(f"config={config!r} is not accepted; expected None, a ViTConfig or a SwinConfig")
    check_int("num_heads", num_heads, optional=True)
    ok_size = lambda v: is_int(v) and v > 0  # noqa: E731
    if img_size is not None and not (ok_size(img_size) or (isinstance(img_size, (tuple, list)) and len(img_size) == 2
                                                           and all(ok_size(v) for v in img_size))):
        raise ValueError(f"img_size={img_size!r} is not accepted; expected None, an int > 0 or (height, width)")


def patch_weight(state: dict, key: str, source: str) -> torch.Tensor:
    """The (D, C, p, p) patch-embedding convolution weight, or a ValueError naming the key."""
    w = state[key]
    if w.ndim != 4:
        raise ValueError(f"state_dict key {key!r} ({source}) has shape {tuple(w.shape)}; expected (dim, channels, p, p)")
    return w


def check_state_dict(state_dict) -> dict:
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"state_dict={type(state_dict).__name__} is not accepted; expected a dict of name -> tensor")
    return state_dict


def count_indices(state_dict: dict, pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (a regex with one group) over the keys."""
    found = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def vit_heads(dim: int, config, num_heads: int | None) -> int:
    if num_heads is not None:
        return num_heads
    if isinstance(config, ViTConfig) and config.embed_dim == dim:
        return config.num_heads
    return VIT_HEADS.get(dim, max(dim // 64, 1))


def vit_source_grid(num_positions: int, num_prefix: int, patch: int, config) -> tuple[bool, tuple[int, int]]:
    """(table covers prefix tokens?, patch grid) of a learned position table with ``num_positions`` rows."""
    if isinstance(config, ViTConfig):
        for with_prefix in (True, False):
            grid = vit_grid_size(config.img_size, patch, config.dynamic_img_pad)
            if grid[0] * grid[1] + (num_prefix if with_prefix else 0) == num_positions:
                return with_prefix, grid
    for with_prefix in (True, False):
        n = num_positions - (num_prefix if with_prefix else 0)
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:
            return with_prefix, (side, side)
    raise ValueError(
        f"state_dict position table has {num_positions} rows, not a square grid (+ {num_prefix} prefix tokens); "
        "pass config= with the checkpoint's img_size"
    )


def resample_vit_positions(state: dict, config: ViTConfig, source_grid: tuple[int, int]) -> dict:
    """Resample ``pos_embed.weight`` from ``source_grid`` to the grid of ``config`` (bicubic, as timm)."""
    key = "pos_embed.weight"
    if key in state and tuple(source_grid) != config.grid_size:
        prefix = config.num_prefix_tokens if config.pos_embed_prefix else 0
        state[key] = resample_pos_embed(state[key], config.grid_size, source_grid, num_prefix_tokens=prefix)
    return state


def with_img_size(config, img_size):
    """``config`` at another image size (a ViT's position table is resampled by the caller)."""
    if img_size is None or img_size == config.img_size:
        return config
    return dataclasses.replace(config, img_size=tuple(img_size) if isinstance(img_size, list) else img_size)


def swin_config_from_tables(
    state: dict, *, embed_dim: int, patch: int, in_chans: int, depths: tuple, num_classes: int, mlp_ratio: float,
    qkv_bias: bool, config=None, img_size=None,
) -> SwinConfig:
    """Swin config whose per-stage bias tables have the shapes found in ``state`` (our key names)."""
    heads, windows = [], []
    for i in range(len(depths)):
        table = state[f"layers.{i}.rel_bias.0.table"]  # ((2 Wh - 1)(2 Ww - 1), heads)
        side = math.isqrt(table.shape[0])
        if side * side != table.shape[0]:
            raise ValueError(f"state_dict stage {i} relative bias table {tuple(table.shape)} is not for a square window")
        heads.append(table.shape[1])
        windows.append((side + 1) // 2)
    window = windows[0]
    if img_size is None and isinstance(config, SwinConfig):
        img_size = config.img_size
    if img_size is None:
        # a stage whose window is clipped to its grid tells the resolution; otherwise the 224 default
        clipped = [(i, w) for i, w in enumerate(windows) if w < window]
        img_size = clipped[0][1] * 2 ** clipped[0][0] * patch if clipped else 224
    cfg = SwinConfig(
        img_size=img_size, patch_size=patch, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim,
        depths=tuple(depths), num_heads=tuple(heads), window_size=window, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
        **({} if not isinstance(config, SwinConfig) else dict(drop_path_rate=config.drop_path_rate)),
    )
    expected = [min(window, r) for r in (min(res) for res in cfg.stage_resolutions())]
    if expected != windows:
        raise ValueError(
            f"state_dict stage windows {windows} do not fit img_size={img_size} (windows {expected}); "
            "pass img_size= (or config=) with the checkpoint's training resolution"
        )
    return cfg


_INIT_FUNCTIONS = ("trunc_normal_", "normal_", "uniform_", "zeros_", "ones_", "xavier_uniform_", "kaiming_uniform_", "constant_")


@contextlib.contextmanager
def skip_weight_init():
    """Make ``torch.nn.init`` functions no-ops while a model whose every weight is loaded next is built.

    Random init of a large model costs seconds and is overwritten anyway; buffers (index tables) are
    still computed. Only for a strict load right after: the parameters hold uninitialised memory.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(config, state_dict: dict) -> nn.Module:
    """The visionformers model of ``config`` with ``state_dict`` loaded strictly (e.g. after a converter)."""
    from visionformers.hub import load_into
    from visionformers.registry import model_classes

    by_config = {cfg_cls: cls for cls, cfg_cls in model_classes().values()}
    cls = by_config.get(type(config))
    if cls is None:
        raise ValueError(f"config={type(config).__name__} is not accepted; expected one of {sorted(c.__name__ for c in by_config)}")
    with skip_weight_init():  # every parameter comes from state_dict (load_into is strict)
        model = cls(config)
    load_into(model, state_dict, source="converted state_dict")
    return model
