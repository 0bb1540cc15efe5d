"""TransformerBlock: gradients to every parameter, eval determinism, compile, norms and MLPs."""
import pytest
import torch
import torch.nn.functional as F

from visionformers.nn import DropPath, Mlp, PatchEmbed, RMSNorm, TransformerBlock, make_norm, modulate

DIM, H = 32, 4

VARIANTS = {
    "pre_norm": dict(),
    "post_norm": dict(pre_norm=False),
    "causal_rms_swiglu": dict(is_causal=True, norm="rmsnorm", mlp_act="swiglu", qkv_bias=False, proj_bias=False),
    "cross": dict(cross_attention=True, context_dim=24),
    "post_norm_cross": dict(pre_norm=False, cross_attention=True),
    "adaln_zero": dict(cond_dim=16),
    "layer_scale_drop_path": dict(layer_scale_init=1e-2, drop_path=0.1, attn_drop=0.1, proj_drop=0.1),
    "gqa_qknorm": dict(num_kv_heads=2, qk_norm=True),
    "linear": dict(attn_type="linear"),
    "differential": dict(attn_type="differential", layer_index=2),
    "sliding_window": dict(window_size=3, is_causal=True),
}


def _inputs(kw):
    x = torch.randn(2, 6, DIM)
    extra = {}
    if kw.get("cross_attention"):
        extra["context"] = torch.randn(2, 5, kw.get("context_dim") or DIM)
        extra["context_mask"] = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    if kw.get("cond_dim"):
        extra["cond"] = torch.randn(2, kw["cond_dim"])
    return x, extra


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_parameter_gets_a_gradient(name):
    kw = VARIANTS[name]
    block = TransformerBlock(DIM, H, **kw)
    if kw.get("cond_dim"):  # adaLN-Zero starts as the identity; perturb so gradients reach every branch
        torch.nn.init.normal_(block.adaLN.linear.weight, std=0.1)
    x, extra = _inputs(kw)
    block(x, **extra).square().mean().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_adaln_zero_block_starts_as_identity():
    block = TransformerBlock(DIM, H, cond_dim=16)
    x = torch.randn(2, 6, DIM)
    torch.testing.assert_close(block(x, cond=torch.randn(2, 16)), x)


def test_pre_and_post_norm_structure():
    block = TransformerBlock(DIM, H, pre_norm=False).eval()
    x = torch.randn(2, 6, DIM)
    h = block.norm1(x + block.attn(x))
    ref = block.norm2(h + block.mlp(h))
    torch.testing.assert_close(block(x), ref)
    block = TransformerBlock(DIM, H).eval()
    h = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))


@pytest.mark.parametrize("name", ["layer_scale_drop_path", "cross"])
def test_eval_is_deterministic_with_dropout(name):
    kw = dict(VARIANTS[name], attn_drop=0.3, proj_drop=0.3, drop_path=0.3)
    block = TransformerBlock(DIM, H, **kw).eval()
    x, extra = _inputs(kw)
    assert torch.equal(block(x, **extra), block(x, **extra))


def test_partition_hook_wraps_only_attention():
    block = TransformerBlock(DIM, H).eval()
    x = torch.randn(2, 8, DIM)
    # windows of 4 tokens: attention stays inside each half
    split = lambda t: t.reshape(4, 4, DIM)  # noqa: E731
    merge = lambda t: t.reshape(2, 8, DIM)  # noqa: E731
    out = block(x, partition=(split, merge))
    ref = torch.cat([block(x[:, :4]), block(x[:, 4:])], dim=1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_gradient_checkpointing_matches():
    block = TransformerBlock(DIM, H)
    x = torch.randn(2, 6, DIM, requires_grad=True)
    block(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    block.grad_checkpointing = True
    block(x).sum().backward()
    torch.testing.assert_close(x.grad, g)


def test_compile_fullgraph_matches_eager():
    block = TransformerBlock(DIM, H, cross_attention=True, qkv_bias=True).eval()
    x, ctx = torch.randn(2, 6, DIM), torch.randn(2, 5, DIM)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, context=ctx, context_mask=mask), block(x, context=ctx, context_mask=mask),
                                   atol=1e-5, rtol=1e-5)


def test_rmsnorm_formula_and_low_precision():
    norm = RMSNorm(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 8)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        make_norm("batchnorm", 8)


@pytest.mark.parametrize("act,fn", [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_mlp_formula(act, fn):
    mlp = Mlp(8, 16, act=act)
    x = torch.randn(4, 8)
    gate, up = mlp.fc1(x).chunk(2, -1)
    torch.testing.assert_close(mlp(x), mlp.fc2(fn(gate) * up))
    with pytest.raises(ValueError, match="act='tanh'"):
        Mlp(8, 16, act="tanh")


def test_modulate_formula():
    x, shift, scale = torch.randn(2, 5, 4), torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])


def test_drop_path_identity_in_eval_and_unbiased_in_training():
    dp = DropPath(0.25)
    x = torch.ones(20000, 1)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    assert torch.isin(y.unique(), torch.tensor([0.0, 1 / 0.75])).all()
    assert y.mean().item() == pytest.approx(1.0, abs=0.03)


def test_patch_embed_shapes_padding_and_errors():
    pe = PatchEmbed((24, 40), 8, in_chans=3, embed_dim=16)
    assert pe(torch.randn(2, 3, 24, 40)).shape == (2, 15, 16)
    nchw = PatchEmbed(32, 8, 3, 16, output="nchw")
    assert nchw(torch.randn(1, 3, 32, 32)).shape == (1, 16, 4, 4)
    padded = PatchEmbed(30, 8, 3, 16, pad=True, strict_img_size=False)
    assert padded(torch.randn(1, 3, 30, 17)).shape == (1, 4 * 3, 16)
    with pytest.raises(ValueError, match="img_size"):
        PatchEmbed(30, 8)
    with pytest.raises(ValueError, match="3 channels"):
        pe(torch.randn(2, 1, 24, 40))
    with pytest.raises(ValueError, match="spatial size"):
        pe(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        pe(torch.zeros(2, 3, 24, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="4 dimensions"):
        pe(torch.randn(3, 24, 40))
    loose = PatchEmbed(32, 8, 3, 16, strict_img_size=False)
    with pytest.raises(ValueError, match="divisible"):
        loose(torch.randn(1, 3, 30, 32))


@pytest.mark.parametrize("variant", ["pre_norm", "post_norm", "layer_scale_drop_path", "gqa_qknorm"])
def test_partition_runs_self_attention_per_window(variant):
    """A (split, merge) partition around self-attention equals the block run on each window alone (norms and MLP
    are per token), with a per-window bias holding -inf and a reorder of the tokens, as Swin uses it."""
    torch.manual_seed(0)
    kw = {k: v for k, v in VARIANTS[variant].items() if k not in ("attn_drop", "proj_drop", "drop_path")}
    block = TransformerBlock(DIM, H, qkv_bias=True, **kw).eval()
    b, n, windows = 3, 13, 5
    x, order = torch.randn(b, windows * n, DIM), torch.randperm(windows * n)
    bias = torch.randn(b * windows, H, n, n).masked_fill(torch.rand(b * windows, 1, n, n) < 0.3, float("-inf"))
    bias[..., torch.arange(n), torch.arange(n)] = 0.0
    split = lambda t: t[:, order].reshape(b * windows, n, DIM)  # noqa: E731
    merge = lambda o: o.reshape(b, windows * n, DIM)[:, torch.argsort(order)]  # noqa: E731
    out = block(x, bias=bias, partition=(split, merge))
    expected = block(split(x), bias=bias).reshape(b, windows * n, DIM)[:, torch.argsort(order)]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
