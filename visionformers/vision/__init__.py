"""Vision models: ViT, Swin, and the diffusion networks (UNet, DiT)."""
from visionformers.vision.dit import DiT, DiTConfig  # noqa: F401
from visionformers.vision.unet import UNet, UNetConfig  # noqa: F401
from visionformers.vision.swin import SwinConfig, SwinTransformer  # noqa: F401
from visionformers.vision.vit import ViTConfig, VisionTransformer  # noqa: F401
