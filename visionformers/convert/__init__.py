"""State-dict converters from other libraries, one module per source; each returns a visionformers state dict.

``from_timm`` and ``from_torchvision`` cover ViT and Swin; ``from_hf`` (transformers) loads on first use
when its module is present. ``build_model(config, state_dict)`` builds the matching model from a
converter's ``return_config=True`` output.
"""
from __future__ import annotations

import importlib
import importlib.util

from visionformers.convert._common import build_model
from visionformers.convert.from_timm import from_timm
from visionformers.convert.from_torchvision import from_torchvision

__all__ = ["from_timm", "from_torchvision", "from_hf", "build_model"]


def __getattr__(name):
    # transformers-format converters live in from_hf.py, written separately; import it only when asked
    if name == "from_hf" and importlib.util.find_spec("visionformers.convert.from_hf") is not None:
        return importlib.import_module("visionformers.convert.from_hf").from_hf
    raise AttributeError(f"module 'visionformers.convert' has no attribute {name!r}")
