"""Model name -> (class, config preset): the one place presets live.

Each preset is one line: a model class and a frozen config (usually ``dataclasses.replace`` of a base).
``create_model(name, **overrides)`` replaces any config field; an unknown name suggests the closest ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch

from torch import nn

PRESETS: dict[str, tuple[type[nn.Module], object]] = {}


def register(name: str, cls: type[nn.Module], config) -> None:
    if name in PRESETS:
        raise KeyError(f"model {name!r} is registered twice")
    PRESETS[name] = (cls, config)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, e.g. ``list_models("swin*")``."""
    return sorted(n for n in PRESETS if fnmatch.fnmatchcase(n, pattern))


def get_preset(name: str) -> tuple[type[nn.Module], object]:
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=5, cutoff=0.4)
        hint = f"; closest: {close}" if close else f"; see vf.list_models() ({len(PRESETS)} models)"
        raise ValueError(f"model name={name!r} is not registered{hint}")
    return PRESETS[name]


def replace_config(config, overrides: dict, source: str = "overrides"):
    """``dataclasses.replace`` that names unknown fields instead of raising a TypeError."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"{source} has unknown field(s) {unknown} for {type(config).__name__}; accepted: {sorted(fields)}"
        )
    return dataclasses.replace(config, **overrides)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments override config fields (``num_classes=10, img_size=32``)."""
    cls, config = get_preset(name)
    return cls(replace_config(config, overrides))


def model_classes() -> dict[str, tuple[type[nn.Module], type]]:
    """Class name -> (model class, config class), for rebuilding a saved model from its config.json."""
    return {cls.__name__: (cls, type(cfg)) for cls, cfg in PRESETS.values()}


# ---------------------------------------------------------------------------------------------
# Presets by family. Each family edits only its own section.
# ---------------------------------------------------------------------------------------------

# ---- vision: ViT (vision/vit.py) ----

# ---- vision: Swin (vision/swin.py) ----

# ---- diffusion networks: UNet (vision/unet.py), DiT (vision/dit.py) ----
from visionformers.vision.dit import DiT, DiTConfig  # noqa: E402
from visionformers.vision.unet import UNet, UNetConfig  # noqa: E402

_DDPM_CIFAR10 = UNetConfig(sample_size=32, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), dropout=0.1)
register("unet_ddpm_cifar10", UNet, _DDPM_CIFAR10)  # Ho et al. 2020, appendix B: 35.7M parameters
register("unet_tiny", UNet, dataclasses.replace(_DDPM_CIFAR10, in_channels=1, base_channels=32, channel_mults=(1, 2, 2), attention_resolutions=(8,), attention_head_dim=32, norm_groups=8, dropout=0.0, use_scale_shift_norm=True))  # digits 32x32, 1.7M
_DIT_XL_2 = DiTConfig(sample_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16)
register("dit_xl_2", DiT, _DIT_XL_2)  # Peebles & Xie 2023, table 1: 675M
register("dit_l_2", DiT, dataclasses.replace(_DIT_XL_2, hidden_size=1024, depth=24, num_heads=16))  # 458M
register("dit_b_2", DiT, dataclasses.replace(_DIT_XL_2, hidden_size=768, depth=12, num_heads=12))  # 130M
register("dit_s_2", DiT, dataclasses.replace(_DIT_XL_2, hidden_size=384, depth=12, num_heads=6))  # 33M
register("dit_tiny", DiT, DiTConfig(sample_size=32, in_channels=1, patch_size=4, hidden_size=128, depth=6, num_heads=4, num_classes=None, class_dropout_prob=0.0, learn_sigma=False))  # digits 32x32

# ---- text: GPT, BERT, T5, encoder-decoder (text/) ----
