"""Training a KL autoencoder (Rombach et al. 2022, appendix G): reconstruction + KL (+ perceptual) loss.

The objective per image is ``rec(x, x_hat) + kl_weight * KL(q(z|x) || N(0, I)) / (C*H*W)`` with ``rec`` the mean
absolute (L1, LDM's choice) or squared error over pixels, x_hat decoded from a posterior sample; both terms are
per input element, so ``kl_weight`` = 1e-6 is LDM's weighting of its summed losses. An optional perceptual term
adds ``perceptual_weight * mean (phi(x_hat) - phi(x))^2`` over the token features ``phi`` of a frozen classifier
(``forward_features``), a feature-matching loss in the spirit of LPIPS (Zhang et al. 2018). No adversarial term.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_choice, check_number

__all__ = ["RECONSTRUCTION_LOSSES", "PerceptualLoss", "vae_loss", "latent_scaling", "with_scaling",
           "side_by_side"]

RECONSTRUCTION_LOSSES = ("l1", "mse")


class PerceptualLoss(nn.Module):
    """Mean squared distance between frozen features of two image batches in [-1, 1].

    ``extractor`` is what ``metrics.features.build_feature_extractor`` returns: for a classifier directory
    (``visionformers:DIR``) the distance is taken on ``forward_features`` (every token, after the extractor's own
    resize and channel match); for any other extractor on its output.
    """

    def __init__(self, extractor: nn.Module):
        super().__init__()
        from visionformers.metrics.features import ClassifierFeatures

        self.extractor = extractor.eval().requires_grad_(False)
        self.tokens = isinstance(extractor, ClassifierFeatures) and extractor.use_head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tokens:
            return self.extractor(x)
        from visionformers.metrics.features import _match_channels, resize_images

        ex = self.extractor  # its own preprocessing (ClassifierFeatures.forward), then the tokens
        x = resize_images(_match_channels(x, ex.in_chans), ex.image_size, ex.resize)
        if ex.mean is not None:
            x = ((x + 1) / 2 - ex.mean.to(x)) / ex.std.to(x)
        return ex.model.forward_features(x)  # (B, N, D) tokens

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.features(x)
        return F.mse_loss(self.features(x_hat).float(), target.float())

    def train(self, mode: bool = True):  # the extractor stays in eval mode (no dropout, fixed norms)
        return self


def vae_loss(vae: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None, *, reconstruction: str = "l1",
             kl_weight: float = 1e-6, perceptual: PerceptualLoss | None = None, perceptual_weight: float = 1.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {"rec", "kl", "perceptual"} detached) for images x (B, C, H, W) in [-1, 1]; the posterior sample
    is drawn from ``generator``."""
    check_choice("reconstruction", reconstruction, RECONSTRUCTION_LOSSES)
    check_number("kl_weight", kl_weight, at_least=0)
    check_number("perceptual_weight", perceptual_weight, at_least=0)
    x_hat, posterior = vae(x, sample_posterior=True, generator=generator)
    err = (x_hat.float() - x.float())
    rec = err.abs().mean() if reconstruction == "l1" else err.square().mean()
    kl = posterior.kl().float().mean() / x[0].numel()  # per input element, as rec
    loss = rec + kl_weight * kl
    parts = {"rec": rec.detach(), "kl": kl.detach()}
    if perceptual is not None:
        p = perceptual(x_hat, x)
        loss = loss + perceptual_weight * p
        parts["perceptual"] = p.detach()
    return loss, parts


@torch.no_grad()
def latent_scaling(vae: nn.Module, batches, generator: torch.Generator | None = None) -> float:
    """1 / std of posterior samples (minus the VAE's shift) over ``batches`` of images: the scaling_factor that
    gives a denoiser unit-variance latents (LDM sec. 4.3.2; 0.18215 for the SD VAE)."""
    was_training = vae.training
    vae.eval()
    z = torch.cat([(vae.encode(x).sample(generator) - vae.config.shift_factor).flatten().float() for x in batches])
    vae.train(was_training)
    return float(1.0 / z.std().clamp_min(1e-12))


def with_scaling(vae: nn.Module, scaling_factor: float) -> nn.Module:
    """The same VAE with another ``scaling_factor`` in its config (a new module sharing no state)."""
    from visionformers.vision.autoencoder_kl import AutoencoderKL

    out = AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=scaling_factor))
    out.load_state_dict(vae.state_dict())
    return out


@torch.no_grad()
def side_by_side(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs and their reconstructions (posterior mean) interleaved: (2B, C, H, W), input i at 2i."""
    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    vae.train(was_training)
    return torch.stack([x.float(), recon.float()], dim=1).flatten(0, 1)  # (2B, C, H, W)
