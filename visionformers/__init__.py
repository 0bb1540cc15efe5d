"""visionformers: diffusion and vision transformers on one block library."""
from visionformers import nn  # noqa: F401  (the block library)
from visionformers.hub import from_pretrained, save_pretrained
from visionformers.registry import create_model, list_models

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "save_pretrained", "from_pretrained", "load_pipeline", "__version__"]


def __getattr__(name):
    # Subpackages load on first use so `import visionformers` stays light (native: only where it is installed).
    import importlib

    if name in {"convert", "diffusion", "vision", "text", "training", "data", "metrics", "pipeline", "native"}:
        return importlib.import_module(f"visionformers.{name}")
    if name == "load_pipeline":  # vf.load_pipeline(dir): a sampling-ready denoiser (ours or a diffusers pipeline)
        return importlib.import_module("visionformers.pipeline").load_pipeline
    raise AttributeError(f"module 'visionformers' has no attribute {name!r}")
