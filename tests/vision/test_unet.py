"""Diffusion UNet: presets at tiny width, zero init, conditioning paths, input checks, save/load, overfitting."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import visionformers as vf
from visionformers.vision.unet import UNet, UNetConfig

# a narrow version of every preset: same topology, small widths
TINY = dict(base_channels=8, norm_groups=4, attention_head_dim=None)


def perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised layers random weights, so every branch carries signal and gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return vf.create_model("unet_tiny", **{**TINY, **overrides})


def assert_all_grads(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    for name, p in model.named_parameters():
        if any(name.startswith(s) for s in skip):
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize(
    "name, overrides",
    [(name, {}) for name in vf.list_models("unet_*")]  # every preset as registered, then variants
    + [
        ("unet_tiny", dict(num_classes=10)),
        ("unet_tiny", dict(use_scale_shift_norm=False, context_dim=12, num_classes=3)),
        ("unet_tiny", dict(context_dim=12, pooled_context=True)),
        ("unet_tiny", dict(self_condition=True, learn_sigma=True, dropout=0.1)),
        ("unet_ddpm_cifar10", dict(use_scale_shift_norm=True, attention_head_dim=8, context_dim=6)),
    ],
)
def test_presets_forward_backward_every_parameter_gets_gradient(name, overrides):
    torch.manual_seed(0)
    model = perturb_zero_init(vf.create_model(name, **{**TINY, "sample_size": 16, **overrides}))
    c = model.config
    x = torch.randn(2, c.in_channels, 16, 16)
    kwargs = {}
    if c.num_classes is not None:
        kwargs["class_labels"] = torch.tensor([0, c.num_classes - 1])
    if c.context_dim is not None:
        kwargs["context"] = torch.randn(2, 5, c.context_dim)
        kwargs["context_mask"] = torch.tensor([[True] * 5, [True, True, True, False, False]])
    if c.self_condition:
        kwargs["x_self_cond"] = torch.randn_like(x)
    out = model(x, torch.tensor([3.0, 999.0]), **kwargs)
    assert out.shape == (2, c.out_channels, 16, 16)
    out.square().mean().backward()
    assert_all_grads(model)


def test_ddpm_cifar10_has_the_papers_35_7m_parameters():
    with torch.device("meta"):
        model = vf.create_model("unet_ddpm_cifar10")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) <= 0.01 * 35.7e6, n
    c = model.config
    assert (c.base_channels, c.channel_mults, c.num_res_blocks, c.attention_resolutions, c.dropout) == (
        128, (1, 2, 2, 2), 2, (16,), 0.1)


def test_unet_tiny_is_a_small_class_conditional_digits_model():
    with torch.device("meta"):
        model = vf.create_model("unet_tiny", num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n <= 3e6, n
    assert (model.config.in_channels, model.config.sample_size) == (1, 32)
    assert model.class_embed.num_embeddings == 11  # ten digits + the null class


@pytest.mark.parametrize("scale_shift", [False, True])
def test_output_is_zero_at_init(scale_shift):
    model = tiny_unet(use_scale_shift_norm=scale_shift, num_classes=4, context_dim=6)
    out = model(torch.randn(2, 1, 32, 32), torch.tensor([1, 500]), class_labels=torch.tensor([0, 4]),
                context=torch.randn(2, 3, 6))
    assert torch.equal(out, torch.zeros_like(out))
    for module in model.modules():  # each residual branch ends at zero, so every block starts as the identity
        if hasattr(module, "conv2"):
            assert not module.conv2.weight.any()


@pytest.mark.parametrize("pooled", [False, True])
def test_cross_attention_ignores_masked_context_tokens(pooled):
    model = perturb_zero_init(tiny_unet(context_dim=6, pooled_context=pooled)).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 700])
    context = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    edited = context.clone()
    edited[~mask] = torch.randn(int((~mask).sum()), 6) * 10
    ref = model(x, t, context=context, context_mask=mask)
    assert torch.allclose(model(x, t, context=edited, context_mask=mask), ref, atol=1e-5)
    edited[0, 0] += 1.0  # an attended token does change the output
    assert not torch.allclose(model(x, t, context=edited, context_mask=mask), ref, atol=1e-5)


@pytest.mark.parametrize("pooled", [False, True])
def test_fully_masked_context_gives_a_finite_output(pooled):
    """An empty prompt may mask every token; the cross-attention then adds only its bias (and the pooled embedding
    of nothing is zero), never NaN."""
    model = perturb_zero_init(tiny_unet(context_dim=6, pooled_context=pooled)).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 700])
    mask = torch.tensor([[False] * 4, [True, False, False, False]])
    out = model(x, t, context=torch.randn(2, 4, 6), context_mask=mask)
    assert torch.isfinite(out).all()
    other = model(x, t, context=torch.randn(2, 4, 6) * 5, context_mask=mask)
    torch.testing.assert_close(other[0], out[0])  # row 0 attends to nothing: its context cannot matter
    assert not torch.allclose(other[1], out[1], atol=1e-5)  # row 1 attends to its first token


def test_class_labels_change_output_and_none_means_null_class():
    model = perturb_zero_init(tiny_unet(num_classes=3)).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 5])
    a = model(x, t, class_labels=torch.tensor([0, 0]))
    b = model(x, t, class_labels=torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, t), model(x, t, class_labels=torch.tensor([3, 3])))


def test_scalar_and_per_sample_timesteps_agree():
    model = perturb_zero_init(tiny_unet()).eval()
    x = torch.randn(3, 1, 32, 32)
    ref = model(x, torch.full((3,), 250))
    torch.testing.assert_close(model(x, 250), ref)
    torch.testing.assert_close(model(x, torch.tensor(250.0)), ref)


def test_self_conditioning_input_is_used_and_defaults_to_zeros():
    model = perturb_zero_init(tiny_unet(self_condition=True)).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([100, 100])
    torch.testing.assert_close(model(x, t), model(x, t, x_self_cond=torch.zeros_like(x)))
    assert not torch.allclose(model(x, t), model(x, t, x_self_cond=torch.randn_like(x)))


def test_dropout_only_in_training():
    model = perturb_zero_init(tiny_unet(dropout=0.5))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([100, 100])
    model.train()
    assert not torch.equal(model(x, t), model(x, t))
    model.eval()
    assert torch.equal(model(x, t), model(x, t))


def test_other_sizes_divisible_by_the_downsampling_work():
    model = tiny_unet()
    assert model(torch.randn(1, 1, 48, 24), 3).shape == (1, 1, 48, 24)


def test_channels_last_gives_the_same_result():
    model = perturb_zero_init(tiny_unet(context_dim=4)).eval()
    x, t, ctx = torch.randn(2, 1, 32, 32), torch.tensor([7, 900]), torch.randn(2, 3, 4)
    ref = model(x, t, context=ctx)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last), t, context=ctx)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


BAD_INPUTS = [
    ("x", lambda: dict(x=torch.randn(2, 1, 30, 30)), "multiples of 4"),
    ("x", lambda: dict(x=torch.randn(2, 3, 32, 32)), "1 channels"),
    ("x", lambda: dict(x=torch.zeros(2, 1, 32, 32, dtype=torch.long)), "floating"),
    ("x", lambda: dict(x=torch.randn(1, 32, 32)), "4 dimensions"),
    ("t", lambda: dict(t=torch.zeros(3)), "(2,)"),
    ("t", lambda: dict(t=torch.zeros(2, 1)), "(2,)"),
    ("t", lambda: dict(t="10"), "timesteps"),
    ("class_labels", lambda: dict(class_labels=torch.tensor([0, 11])), "null class"),
    ("class_labels", lambda: dict(class_labels=torch.tensor([-1, 0])), "[0, 10)"),
    ("class_labels", lambda: dict(class_labels=torch.tensor([0.0, 1.0])), "integer"),
    ("class_labels", lambda: dict(class_labels=torch.tensor([0, 1, 2])), "(2,)"),
    ("context", lambda: dict(context=torch.randn(2, 3, 5)), "(2, M, 6)"),
    ("context", lambda: dict(context=None), "cross-attends"),
    ("context_mask", lambda: dict(context_mask=torch.ones(2, 4, dtype=torch.bool)), "(2, 3)"),
    ("context_mask", lambda: dict(context_mask=torch.ones(2, 3)), "bool"),
]


@pytest.mark.parametrize("arg, make, accepted", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_value_error_naming_the_argument(arg, make, accepted):
    model = tiny_unet(num_classes=10, context_dim=6)
    kwargs = dict(x=torch.randn(2, 1, 32, 32), t=torch.tensor([1, 2]), class_labels=torch.tensor([0, 1]),
                  context=torch.randn(2, 3, 6), context_mask=None)
    kwargs.update(make())
    with pytest.raises(ValueError, match=arg) as info:
        model(kwargs.pop("x"), kwargs.pop("t"), **kwargs)
    assert accepted in str(info.value)


def test_conditioning_given_to_a_model_without_it_is_rejected():
    model = tiny_unet()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class_labels.*unconditional"):
        model(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="context.*no cross-attention"):
        model(x, t, context=torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="x_self_cond"):
        model(x, t, x_self_cond=torch.randn_like(x))


@pytest.mark.parametrize(
    "field, value",
    [("channel_mults", ()), ("sample_size", 30), ("norm_groups", 5), ("attention_resolutions", (7,)),
     ("attention_head_dim", 5), ("dropout", 1.0), ("num_classes", 0), ("context_dim", -1), ("base_channels", 0)],
)
def test_bad_config_fields_raise_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(vf.registry.get_preset("unet_tiny")[1], **{field: value})


def test_save_pretrained_round_trip(tmp_path):
    model = perturb_zero_init(tiny_unet(num_classes=10, context_dim=6, learn_sigma=True)).eval()
    vf.save_pretrained(model, tmp_path / "unet")
    loaded = vf.from_pretrained(tmp_path / "unet").eval()
    assert isinstance(loaded, UNet) and loaded.config == model.config
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 600])
    kw = dict(class_labels=torch.tensor([2, 10]), context=torch.randn(2, 3, 6))
    assert torch.equal(loaded(x, t, **kw), model(x, t, **kw))


def test_config_is_a_frozen_dataclass_with_tuple_fields():
    config = UNetConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.base_channels = 3  # type: ignore[misc]
    assert isinstance(config.channel_mults, tuple) and isinstance(config.attention_resolutions, tuple)


def test_tiny_unet_overfits_eight_digits():
    """40 Adam steps of the eps objective on 8 digits drive the loss from ~1 (zero output) to a small fraction."""
    from visionformers.data import load_digits

    torch.manual_seed(0)
    images, _ = load_digits(image_size=32)
    x0 = images[:8] * 2 - 1  # [-1, 1]
    model = vf.create_model("unet_tiny", base_channels=16)
    sched = vf.diffusion.NoiseSchedule("cosine", num_train_steps=1000)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = vf.diffusion.training_loss(model, x0, sched, prediction_type="eps", generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:3]) / 3, sum(losses[-10:]) / 10
    assert start > 0.8  # the zero-initialised output predicts eps = 0: loss E[eps^2] = 1
    assert end < 0.3 * start, (start, end, losses)


def test_pooled_context_is_the_masked_mean_added_to_the_time_embedding():
    from visionformers.vision.denoiser_inputs import pooled_context

    context = torch.randn(2, 3, 6)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    pooled = pooled_context(context, mask)
    torch.testing.assert_close(pooled[0], (context[0, 0] + context[0, 2]) / 2)
    assert torch.equal(pooled[1], torch.zeros(6))  # nothing to pool: no signal, no NaN
    torch.testing.assert_close(pooled_context(context, None), context.mean(1))

    model = perturb_zero_init(tiny_unet(context_dim=6, pooled_context=True)).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 700])
    ref = model(x, t, context=context, context_mask=mask)
    with torch.no_grad():
        model.context_embed.bias.add_(1.0)  # the pooled path reaches the output
    assert not torch.allclose(model(x, t, context=context, context_mask=mask), ref, atol=1e-5)


@pytest.mark.parametrize("name", ["unet_tiny", "dit_tiny"])
def test_pooled_context_needs_a_context_and_old_configs_load_without_it(tmp_path, name):
    import json

    with pytest.raises(ValueError, match="pooled_context"):
        vf.create_model(name, pooled_context=True)
    model = vf.create_model(name, **TINY if name == "unet_tiny" else {}, context_dim=4)
    vf.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["config"]["pooled_context"]  # a directory saved before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert vf.from_pretrained(tmp_path).config.pooled_context is False
