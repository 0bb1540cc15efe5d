"""Parity with diffusers' UNet2DModel (random weights, converted): the same network gives the same numbers.

The key mapping lives here, not in the library: visionformers has no diffusers converter by design.
"""
from __future__ import annotations

import re

import diffusers
import pytest
import torch
import torch.nn.functional as F

import visionformers as vf


def diffusers_unet(config, **extra):
    """A UNet2DModel with the DDPM topology of ``config`` (a visionformers UNetConfig)."""
    levels = len(config.channel_mults)
    res = [config.sample_size // 2**i for i in range(levels)]
    attn = [r in config.attention_resolutions for r in res]
    return diffusers.UNet2DModel(
        sample_size=config.sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.level_channels,
        layers_per_block=config.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_groups,
        attn_norm_num_groups=config.norm_groups,  # diffusers' mid attention has no norm otherwise under scale_shift
        norm_eps=config.norm_eps,
        dropout=config.dropout,
        flip_sin_to_cos=config.time_flip_sin_to_cos,
        freq_shift=config.time_freq_shift,
        resnet_time_scale_shift="scale_shift" if config.use_scale_shift_norm else "default",
        num_class_embeds=None if config.num_classes is None else config.num_classes + 1,
        **extra,
    )


_RENAMES = [
    (r"^time_embedding\.", "time_embed."),
    (r"^class_embedding\.", "class_embed."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^mid_block\.resnets\.0\.", "mid_res1."),
    (r"^mid_block\.resnets\.1\.", "mid_res2."),
    (r"^mid_block\.attentions\.0\.", "mid_attn."),
    (r"^down_blocks\.", "down_levels."),
    (r"^up_blocks\.", "up_levels."),
    (r"\.(downsamplers|upsamplers)\.0\.", ".resample."),
    (r"\.time_emb_proj\.", ".emb_proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_out\.0\.", ".attn.proj."),
]


def convert_diffusers_unet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DModel state dict -> visionformers UNet state dict (q, k, v fused into one qkv)."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    for key in [k for k in out if ".to_q." in k]:
        prefix, kind = key.split(".to_q.")
        parts = [out.pop(f"{prefix}.to_{n}.{kind}") for n in "qkv"]
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # the DDPM CIFAR-10 network, narrow
        dict(use_scale_shift_norm=True, attention_head_dim=8, num_classes=5),  # ADM-style, class-conditional
    ],
    ids=["ddpm", "scale_shift_heads_classes"],
)
def test_matches_diffusers_unet2dmodel(overrides):
    torch.manual_seed(0)
    # unet_ddpm_cifar10's topology (1,2,2,2), 2 blocks, attention at 16x16, at a narrow width
    ours = vf.create_model("unet_ddpm_cifar10", base_channels=16, norm_groups=8, dropout=0.0, **overrides).eval()
    ref = diffusers_unet(ours.config).eval()
    with torch.no_grad():  # random, non-zero weights everywhere (ours zero-inits some layers)
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    state = convert_diffusers_unet(ref.state_dict())
    ours.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())

    x, t = torch.randn(2, 3, 32, 32), torch.tensor([17, 901])
    kw = {}
    if ours.config.num_classes is not None:
        kw["class_labels"] = torch.tensor([1, 5])
    with torch.no_grad():
        expected = ref(x, t, **kw).sample
        got = ours(x, t, **kw)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)  # measured max |diff| ~1.5e-7
    assert expected.abs().mean() > 1e-2  # the comparison is not between two near-zero tensors


def test_full_size_ddpm_cifar10_matches_diffusers_parameter_for_parameter():
    with torch.device("meta"):
        ours = vf.create_model("unet_ddpm_cifar10")
        ref = diffusers_unet(ours.config)
    mapped = convert_diffusers_unet({k: v for k, v in ref.state_dict().items()})
    own = ours.state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)


@pytest.mark.parametrize("overrides", [dict(), dict(use_scale_shift_norm=True, attention_head_dim=8)], ids=["ddpm", "scale_shift"])
def test_training_gradients_match_diffusers(overrides):
    """Every parameter's and the input's gradient of an eps-MSE loss (train mode, no dropout), NCHW input:
    covers the fused GroupNorm+SiLU backward and the channels-last round trip of the gradients."""
    torch.manual_seed(0)
    ours = vf.create_model("unet_ddpm_cifar10", base_channels=16, norm_groups=8, dropout=0.0, **overrides).train()
    ref = diffusers_unet(ours.config).train()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(convert_diffusers_unet(ref.state_dict()), strict=True)
    x, t, eps = torch.randn(4, 3, 32, 32), torch.tensor([17, 901, 5, 440]), torch.randn(4, 3, 32, 32)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    F.mse_loss(ours(xs[0], t), eps).backward()
    F.mse_loss(ref(xs[1], t).sample, eps).backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-6, rtol=1e-4)
    expected = convert_diffusers_unet({name: p.grad for name, p in ref.named_parameters()})
    for name, p in ours.named_parameters():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5 * max(scale, 1e-3), rtol=1e-4, msg=name)
