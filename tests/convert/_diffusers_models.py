"""Tiny random-weight diffusers models shaped like the published ones, every weight perturbed away from its init."""
import torch

diffusers = __import__("pytest").importorskip("diffusers")


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add 0.02 N(0, 1) to every parameter, so that zero-initialised layers cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module.eval()


def ddpm_cifar10_unet(**overrides):
    """google/ddpm-cifar10-32's layout (DownBlock2D, AttnDownBlock2D at 16 px, ..., downsample_padding 0,
    [sin, cos] sinusoids with freq_shift 1), shrunk: 16 px, widths 16-32-32, one block per level."""
    kw = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
              downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=8)
    kw.update(overrides)
    return perturb(diffusers.UNet2DModel(**kw))


def dit_xl_2(**overrides):
    """DiT-XL/2's layout (patch 2, learned sigma, 1000 classes + null) at depth 2 and width 64, 8x8 latents.

    diffusers repeats the timestep / label embedder in every block; published checkpoints hold equal copies, so the
    perturbed copy of block 0 goes to every block."""
    kw = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
              patch_size=2, num_embeds_ada_norm=1000)
    kw.update(overrides)
    model = perturb(diffusers.DiTTransformer2DModel(**kw))
    state = model.state_dict()
    for key in state:
        if ".norm1.emb." in key:
            state[key] = state["transformer_blocks.0." + key.split(".", 2)[2]]
    model.load_state_dict(state)
    return model


def config_of(model) -> dict:
    """The config.json dict diffusers writes for ``model``."""
    return {**model.config, "_class_name": type(model).__name__}
