"""Parity with diffusers' AutoencoderKL (random, perturbed weights): converted both ways, the same numbers."""
from __future__ import annotations

import diffusers
import pytest
import torch

import visionformers as vf
from visionformers.convert.diffusers_vae import vae_from_diffusers, vae_to_diffusers

# The SD layout shrunk: 3 levels (factor 4), a width change at each level, 2 layers per block, quant convs.
SMALL_SD = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], layers_per_block=2,
                latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # no layer keeps its (zero / one) init
    return model.eval()


def diffusers_vae(**overrides) -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    return perturbed(diffusers.AutoencoderKL(**{**SMALL_SD, **overrides}))


def ours_from(ref: diffusers.AutoencoderKL, legacy: bool = False):
    sd = ref.state_dict()
    if legacy:  # diffusers < 0.14 names of the attention projections
        names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        sd = {next((k.replace(f".{a}.", f".{b}.") for a, b in names.items() if f".{a}." in k), k): v for k, v in sd.items()}
    overrides, state = vae_from_diffusers(sd, dict(ref.config))
    model = vf.create_model("vae_sd", **overrides)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("layout", ["sd", "sd3"])
def test_encode_decode_match_diffusers(layout, legacy):
    extra = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                 scaling_factor=1.5305) if layout == "sd3" else {}
    ref = diffusers_vae(**extra)
    ours = ours_from(ref, legacy)
    assert ours.config.scaling_factor == ref.config.scaling_factor
    assert ours.config.shift_factor == (ref.config.shift_factor or 0.0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post_ref, post = ref.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(post.mean, post_ref.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(post.logvar, post_ref.logvar, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(post.std, post_ref.std, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(post.kl(), post_ref.kl(), atol=1e-3, rtol=1e-4)
        z = post.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(z, post_ref.sample(torch.Generator().manual_seed(3)), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_config_read_from_shapes_alone():
    ref = diffusers_vae()
    overrides, state = vae_from_diffusers(ref.state_dict())  # no config: groups stay the preset's
    model = vf.create_model("vae_sd", norm_num_groups=8, **overrides)
    model.load_state_dict(state)
    assert model.config.block_out_channels == (16, 32, 32) and model.config.layers_per_block == 2


def test_to_diffusers_loads_and_matches():
    torch.manual_seed(1)
    ours = perturbed(vf.create_model("vae_tiny", layers_per_block=2, shift_factor=0.1), seed=1)
    config, state = vae_to_diffusers(ours)
    ref = diffusers.AutoencoderKL.from_config({k: v for k, v in config.items() if k != "_class_name"})
    missing, unexpected = ref.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    ref.eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, atol=1e-4, rtol=1e-4)
        z = torch.randn(2, 4, 4, 4)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4)
    # and back: the same state dict
    overrides, back = vae_from_diffusers(state, config)
    assert overrides["shift_factor"] == 0.1
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_tiled_and_sliced_match_diffusers():
    ref = diffusers_vae(sample_size=16)  # tiles of 16 px = 4 latents, overlap 0.25
    ours = ours_from(ref)
    ref.enable_tiling()
    ref.enable_slicing()
    ours.enable_tiling(tile_sample_size=16)
    ours.enable_slicing()
    x = torch.rand(2, 3, 40, 28) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, atol=1e-4, rtol=1e-4)
        z = torch.randn(2, 4, 10, 7)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_bad_diffusers_inputs():
    ref = diffusers_vae()
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        vae_from_diffusers({k: v for k, v in sd.items() if "conv_out" not in k}, dict(ref.config))
    with pytest.raises(ValueError, match="does not use"):
        vae_from_diffusers({**sd, "extra.weight": torch.zeros(1)}, dict(ref.config))
    with pytest.raises(ValueError, match="down_block_types"):
        vae_from_diffusers(sd, {**ref.config, "down_block_types": ["CrossAttnDownBlock2D"] * 3})
    with pytest.raises(ValueError, match="model"):
        vae_to_diffusers(torch.nn.Linear(2, 2))
