"""AutoencoderKL: presets, gradients, save / load, slicing, tiling, latent scaling, bf16, bad input."""
from __future__ import annotations

import pytest
import torch

import visionformers as vf
from visionformers.vision.autoencoder_kl import DiagonalGaussian


def tiny(**kw):
    torch.manual_seed(0)
    return vf.create_model("vae_tiny", **kw)


def test_presets_layout():
    for name, channels, quant in (("vae_sd", 4, True), ("vae_sd3", 16, False)):
        cls, cfg = vf.registry.get_preset(name)
        assert cfg.latent_channels == channels and cfg.use_quant_conv is quant and cfg.factor == 8
        assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.layers_per_block == 2
    assert vf.registry.get_preset("vae_sd")[1].scaling_factor == 0.18215
    sd3 = vf.registry.get_preset("vae_sd3")[1]
    assert (sd3.scaling_factor, sd3.shift_factor) == (1.5305, 0.0609)


def test_forward_backward_every_parameter_gets_a_gradient():
    model = tiny(in_channels=1, out_channels=1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    recon, post = model(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and post.mean.shape == (2, 4, 4, 4)
    (recon.square().mean() + post.kl().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_gaussian_closed_forms():
    moments = torch.randn(3, 8, 2, 2)
    post = DiagonalGaussian(moments)
    torch.testing.assert_close(post.std, torch.exp(0.5 * moments[:, 4:]))
    assert torch.equal(post.mode(), moments[:, :4])
    assert (post.kl() >= 0).all()
    assert DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl().item() == 0.0  # N(0, I) against itself
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(post.sample(g()), post.sample(g()))


def test_save_load_and_latent_scaling(tmp_path):
    model = tiny(shift_factor=0.2, scaling_factor=0.5).eval()
    vf.save_pretrained(model, tmp_path / "vae")
    loaded = vf.from_pretrained(tmp_path / "vae").eval()
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = loaded.encode_latents(x, torch.Generator().manual_seed(1))
        assert torch.equal(z, model.encode_latents(x, torch.Generator().manual_seed(1)))
        raw = model.encode(x).sample(torch.Generator().manual_seed(1))
        torch.testing.assert_close(z, (raw - 0.2) * 0.5)
        torch.testing.assert_close(model.unscale_latents(z), raw)
        assert loaded.decode_latents(z).abs().max() <= 1


def test_slicing_is_exact_and_tiling_covers_the_image():
    model = tiny().eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        full = model.encode(x).mean
        model.enable_slicing()
        torch.testing.assert_close(model.encode(x).mean, full, atol=1e-5, rtol=1e-5)
        model.enable_tiling(tile_sample_size=16)  # the image fits one tile: nothing changes
        torch.testing.assert_close(model.encode(x).mean, full, atol=1e-5, rtol=1e-5)
        model.enable_tiling(tile_sample_size=16)
        big = torch.rand(1, 3, 40, 24) * 2 - 1
        assert model.encode(big).mean.shape == (1, 4, 10, 6)
        assert model.decode(torch.randn(1, 4, 10, 6)).shape == (1, 3, 40, 24)


def test_bf16_autocast_close_to_fp32():
    model = tiny().eval()
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        ref = model.decode(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.decode(z)
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match="channels"):
        model.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 3, 10, 8))
    with pytest.raises(ValueError, match="z="):
        model.decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="tile_sample_size"):
        model.enable_tiling(tile_sample_size=6)
    with pytest.raises(ValueError, match="overlap"):
        model.enable_tiling(tile_sample_size=8)  # 2-latent tiles cannot blend over a quarter
    with pytest.raises(ValueError, match="norm_num_groups"):
        vf.create_model("vae_tiny", norm_num_groups=7)
    with pytest.raises(ValueError, match="scaling_factor"):
        vf.create_model("vae_tiny", scaling_factor=0.0)
    with pytest.raises(ValueError, match="moments"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))
