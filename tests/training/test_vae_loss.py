"""The KL autoencoder's loss: its terms, and the perceptual term through a classifier's forward_features."""
from __future__ import annotations

import torch

import visionformers as vf
from visionformers.metrics.features import build_feature_extractor
from visionformers.training.vae import PerceptualLoss, latent_scaling, side_by_side, vae_loss


def tiny_vae():
    torch.manual_seed(0)
    return vf.create_model("vae_tiny", in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                           sample_size=8)


def test_loss_terms_and_perceptual_gradient(tmp_path):
    vit = vf.create_model("vit_tiny_patch4_32", img_size=8, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    perceptual = PerceptualLoss(build_feature_extractor(f"visionformers:{vf.save_pretrained(vit, tmp_path / 'vit')}"))
    assert perceptual.tokens
    vae, x = tiny_vae(), torch.rand(2, 1, 8, 8) * 2 - 1
    loss, parts = vae_loss(vae, x, torch.Generator().manual_seed(0), kl_weight=0.5, perceptual=perceptual,
                           perceptual_weight=2.0)
    torch.testing.assert_close(loss, parts["rec"] + 0.5 * parts["kl"] + 2.0 * parts["perceptual"])
    assert parts["perceptual"] > 0
    loss.backward()
    assert all(p.grad is None for p in perceptual.parameters())  # the extractor is frozen
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0
    x_hat = x.clone().requires_grad_(True)
    perceptual(x_hat, x).backward()
    assert x_hat.grad is not None  # (zero at x_hat == x: the distance's minimum)


def test_scaling_and_grid():
    vae, x = tiny_vae(), torch.rand(4, 1, 8, 8) * 2 - 1
    s = latent_scaling(vae, [x], torch.Generator().manual_seed(0))
    z = (vae.encode(x).sample(torch.Generator().manual_seed(0)) * s).detach()
    torch.testing.assert_close(z.std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    pairs = side_by_side(vae, x)
    assert pairs.shape == (8, 1, 8, 8) and torch.equal(pairs[0], x[0])
