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

# ---- text: GPT, BERT, T5, encoder-decoder (text/) ----
