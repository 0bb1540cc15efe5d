"""Vision models: ViT, Swin, the diffusion networks (UNet, DiT) and the AutoencoderKL of latent diffusion."""
from visionformers.vision.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig  # noqa: F401
from visionformers.vision.dit import DiT, DiTConfig  # noqa: F401
from visionformers.vision.unet import UNet, UNetConfig  # noqa: F401
from visionformers.vision.swin import SwinConfig, SwinTransformer  # noqa: F401
from visionformers.vision.vit import ViTConfig, VisionTransformer  # noqa: F401
