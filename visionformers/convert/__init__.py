"""State-dict converters from other libraries, one module per source; each returns a visionformers state dict.

``from_timm`` and ``from_torchvision`` cover ViT and Swin; ``from_hf`` (transformers) loads on first use
when its module is present; ``from_diffusers`` / ``to_diffusers`` map diffusers' UNet2DModel, DiT and AutoencoderKL
(the VAE through ``vae_from_diffusers`` / ``vae_to_diffusers``). ``build_model(config, state_dict)`` builds the
matching model from a
converter's ``return_config=True`` output.
"""
from __future__ import annotations

from visionformers.convert._common import build_model
from visionformers.convert.diffusers_vae import vae_from_diffusers, vae_to_diffusers
from visionformers.convert.from_diffusers import from_diffusers, to_diffusers
from visionformers.convert.from_hf import from_hf  # eager: a lazy import bound the name to the submodule on 2nd use
from visionformers.convert.from_timm import from_timm
from visionformers.convert.from_torchvision import from_torchvision

__all__ = ["from_timm", "from_torchvision", "from_hf", "from_diffusers", "to_diffusers", "build_model",
           "vae_from_diffusers", "vae_to_diffusers"]
