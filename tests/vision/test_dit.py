"""DiT: presets at tiny width, the paper's parameter counts, adaLN-Zero init, conditioning, input checks, save/load."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import visionformers as vf
from visionformers.nn import sincos_2d
from visionformers.vision.dit import DiT

# a narrow version of every preset: same patching, depth and conditioning, small widths
TINY = dict(hidden_size=32, depth=2, num_heads=2)


def perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised layers (adaLN, the output layer) random weights so every branch carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_dit(**overrides) -> DiT:
    torch.manual_seed(0)
    return vf.create_model("dit_tiny", **{**TINY, **overrides})


PRESETS = vf.list_models("dit_*")


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("with_context", [False, True, "pooled"])
def test_presets_forward_backward_every_parameter_gets_gradient(name, with_context):
    overrides = dict(TINY, sample_size=8, class_dropout_prob=0.0)
    if with_context:
        overrides.update(context_dim=12, pooled_context=with_context == "pooled")
    model = perturb_zero_init(vf.create_model(name, **overrides))
    c = model.config
    x = torch.randn(2, c.in_channels, 8, 8)
    kwargs = {}
    if c.num_classes is not None:
        kwargs["class_labels"] = torch.tensor([0, c.num_classes - 1])
    if with_context:
        kwargs["context"] = torch.randn(2, 5, 12)
        kwargs["context_mask"] = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = model(x, torch.tensor([3.0, 999.0]), **kwargs)
    assert out.shape == (2, c.out_channels, 8, 8)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if pname != "class_embed.weight":  # only the rows of the labels used receive gradient
            assert p.grad.abs().sum() > 0, pname
    if c.num_classes is not None:
        assert model.class_embed.weight.grad[[0, c.num_classes - 1]].abs().sum() > 0


@pytest.mark.parametrize(
    "name, millions", [("dit_s_2", 33), ("dit_b_2", 130), ("dit_l_2", 458), ("dit_xl_2", 675)]
)
def test_paper_parameter_counts_within_one_percent(name, millions):
    """Peebles & Xie 2023, table 1 (counted as DiT's code does, with the fixed position table)."""
    with torch.device("meta"):
        model = vf.create_model(name)
    n = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    assert abs(n - millions * 1e6) <= 0.01 * millions * 1e6, n
    c = model.config
    assert (c.sample_size, c.in_channels, c.patch_size, c.num_classes, c.learn_sigma) == (32, 4, 2, 1000, True)


def test_output_and_gates_are_zero_at_init():
    model = tiny_dit(num_classes=5, context_dim=6)
    out = model(torch.randn(2, 1, 32, 32), torch.tensor([1, 500]), class_labels=torch.tensor([0, 5]),
                context=torch.randn(2, 3, 6))
    assert torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:  # adaLN-Zero: every block starts as the identity
        assert not block.adaLN.linear.weight.any() and not block.adaLN.linear.bias.any()
    assert not model.final_adaLN.linear.weight.any() and not model.head.weight.any()


def test_positions_are_the_fixed_2d_sincos_table():
    model = tiny_dit()
    grid = 32 // model.config.patch_size
    torch.testing.assert_close(model.pos_embed[0], sincos_2d((grid, grid), model.config.hidden_size))
    assert "pos_embed" not in model.state_dict()
    assert all(p.data_ptr() != model.pos_embed.data_ptr() for p in model.parameters())


def test_unpatchify_inverts_the_patch_layout():
    """With an identity-like decoder the output reproduces each patch where DiT's (p, q, c) layout puts it."""
    model = tiny_dit(in_channels=2, patch_size=4, hidden_size=32).eval()
    c, p = model.config, 4
    x = torch.randn(1, 2, 32, 32)
    # tokens in the (p q c) order the head writes, built from x directly
    tokens = x.unfold(2, p, p).unfold(3, p, p)  # (1, C, 8, 8, p, q)
    tokens = tokens.permute(0, 2, 3, 4, 5, 1).reshape(1, 64, p * p * c.in_channels)  # (1, N, p*q*C)
    model.head.forward = lambda h: tokens  # the decoder now emits exactly these patches
    out = model(x, 0)
    torch.testing.assert_close(out, x)


@pytest.mark.parametrize("pooled", [False, True])
def test_cross_attention_ignores_masked_context_tokens(pooled):
    model = perturb_zero_init(tiny_dit(context_dim=6, pooled_context=pooled)).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 700])
    context = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    edited = context.clone()
    edited[~mask] = torch.randn(int((~mask).sum()), 6) * 10
    ref = model(x, t, context=context, context_mask=mask)
    torch.testing.assert_close(model(x, t, context=edited, context_mask=mask), ref)
    edited[1, 0] += 1.0
    assert not torch.allclose(model(x, t, context=edited, context_mask=mask), ref, atol=1e-5)


def test_class_dropout_applies_only_in_training():
    model = perturb_zero_init(tiny_dit(num_classes=3, class_dropout_prob=0.5))
    x, t = torch.randn(64, 1, 32, 32), torch.full((64,), 100)
    labels = torch.zeros(64, dtype=torch.long)
    model.eval()
    cond = model(x, t, class_labels=labels)
    null = model(x, t, class_labels=torch.full((64,), 3))
    assert not torch.allclose(cond, null)
    model.train()
    torch.manual_seed(1)
    out = model(x, t, class_labels=labels)
    as_null = torch.tensor([torch.allclose(o, n, atol=1e-6) for o, n in zip(out, null)])
    as_cond = torch.tensor([torch.allclose(o, c, atol=1e-6) for o, c in zip(out, cond)])
    assert (as_null ^ as_cond).all()  # each sample is either dropped to the null class or kept
    assert 10 <= int(as_null.sum()) <= 54  # Binomial(64, 0.5): 6+ sigma bounds


def test_learn_sigma_doubles_the_output_channels():
    model = tiny_dit(learn_sigma=True, in_channels=3)
    assert model(torch.randn(1, 3, 32, 32), 5).shape == (1, 6, 32, 32)


def test_grad_checkpointing_gives_the_same_gradients():
    model = perturb_zero_init(tiny_dit())
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    model(x, t).square().sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x, t).square().sum().backward()
    for r, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, r)


BAD_INPUTS = [
    ("x", lambda: dict(x=torch.randn(2, 1, 16, 16)), "(32, 32)"),
    ("x", lambda: dict(x=torch.randn(2, 4, 32, 32)), "1 channels"),
    ("x", lambda: dict(x=torch.zeros(2, 1, 32, 32, dtype=torch.int32)), "floating"),
    ("t", lambda: dict(t=torch.zeros(4)), "(2,)"),
    ("t", lambda: dict(t=torch.tensor([True, False])), "timesteps"),
    ("class_labels", lambda: dict(class_labels=torch.tensor([0, 6])), "null class"),
    ("class_labels", lambda: dict(class_labels=torch.tensor([[0, 1]])), "1 dimensions"),
    ("context", lambda: dict(context=torch.randn(2, 3, 7)), "(2, M, 6)"),
    ("context", lambda: dict(context=torch.randn(3, 3, 6)), "(2, M, 6)"),
    ("context_mask", lambda: dict(context_mask=torch.ones(2, 2, dtype=torch.bool)), "(2, 3)"),
]


@pytest.mark.parametrize("arg, make, accepted", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_value_error_naming_the_argument(arg, make, accepted):
    model = tiny_dit(num_classes=5, context_dim=6)
    kwargs = dict(x=torch.randn(2, 1, 32, 32), t=torch.tensor([1, 2]), class_labels=torch.tensor([0, 1]),
                  context=torch.randn(2, 3, 6), context_mask=None)
    kwargs.update(make())
    with pytest.raises(ValueError, match=arg) as info:
        model(kwargs.pop("x"), kwargs.pop("t"), **kwargs)
    assert accepted in str(info.value)


def test_conditioning_given_to_a_model_without_it_is_rejected():
    model = tiny_dit()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class_labels.*unconditional"):
        model(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="context.*no cross-attention"):
        model(x, t, context=torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="context_mask.*no cross-attention"):
        model(x, t, context_mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    "field, value",
    [("sample_size", 30), ("hidden_size", 30), ("class_dropout_prob", 1.0), ("num_classes", 0), ("depth", 0),
     ("context_dim", 0), ("mlp_ratio", 0.0)],
)
def test_bad_config_fields_raise_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(vf.registry.get_preset("dit_tiny")[1], **{field: value})


def test_save_pretrained_round_trip(tmp_path):
    model = perturb_zero_init(tiny_dit(num_classes=5, context_dim=6, learn_sigma=True)).eval()
    vf.save_pretrained(model, tmp_path / "dit")
    loaded = vf.from_pretrained(tmp_path / "dit").eval()
    assert isinstance(loaded, DiT) and loaded.config == model.config
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 600])
    kw = dict(class_labels=torch.tensor([2, 5]), context=torch.randn(2, 3, 6))
    assert torch.equal(loaded(x, t, **kw), model(x, t, **kw))


def test_timestep_embedding_uses_dits_256_cos_sin_frequencies():
    """DiT's TimestepEmbedder: [cos(t f), sin(t f)], f_i = 10000^(-i/128), then the MLP."""
    model = tiny_dit()
    t = torch.tensor([0.0, 7.5, 999.0])
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    mlp = model.t_embed
    expected = mlp.linear_2(torch.nn.functional.silu(mlp.linear_1(emb)))
    torch.testing.assert_close(model.t_embed(t), expected)


def test_matches_diffusers_dit_transformer_2d():
    """Parity with diffusers' DiTTransformer2DModel by weight conversion (random weights, class-conditional).

    diffusers keeps a copy of the timestep/label embedder in every block; they are tied to block 0's here,
    which is what a converted DiT checkpoint holds. Its port shifts the sinusoid frequencies by one
    (``time_freq_shift=1``) and defaults to LayerNorm eps 1e-5 (set to DiT's 1e-6 here).
    """
    import diffusers
    torch.manual_seed(0)
    ours = tiny_dit(in_channels=4, patch_size=2, sample_size=8, num_classes=5, learn_sigma=True,
                    time_freq_shift=1.0).eval()
    c = ours.config
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
        out_channels=c.out_channels, num_layers=c.depth, sample_size=c.sample_size, patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes, norm_eps=1e-6,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        emb0 = ref.transformer_blocks[0].norm1.emb
        for block in ref.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0.state_dict())
    sd = ref.state_dict()
    e = "transformer_blocks.0.norm1.emb."
    state = {
        "patch_embed.proj.weight": sd["pos_embed.proj.weight"], "patch_embed.proj.bias": sd["pos_embed.proj.bias"],
        "class_embed.weight": sd[e + "class_embedder.embedding_table.weight"],
        "final_adaLN.linear.weight": sd["proj_out_1.weight"], "final_adaLN.linear.bias": sd["proj_out_1.bias"],
        "head.weight": sd["proj_out_2.weight"], "head.bias": sd["proj_out_2.bias"],
    }
    for kind in ("weight", "bias"):
        for i in (1, 2):
            state[f"t_embed.linear_{i}.{kind}"] = sd[e + f"timestep_embedder.linear_{i}.{kind}"]
        for i in range(c.depth):
            b = f"transformer_blocks.{i}."
            state[f"blocks.{i}.adaLN.linear.{kind}"] = sd[b + f"norm1.linear.{kind}"]
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[b + f"attn1.to_{n}.{kind}"] for n in "qkv"])
            state[f"blocks.{i}.attn.proj.{kind}"] = sd[b + f"attn1.to_out.0.{kind}"]
            state[f"blocks.{i}.mlp.fc1.{kind}"] = sd[b + f"ff.net.0.proj.{kind}"]
            state[f"blocks.{i}.mlp.fc2.{kind}"] = sd[b + f"ff.net.2.{kind}"]
    ours.load_state_dict(state, strict=True)

    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 870]), torch.tensor([4, 5])
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
        got = ours(x, t, class_labels=y)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().mean() > 1e-2
