"""Property tests over model configs: every valid config drawn builds and runs forward with the right output shape
and finite values; every invalid one raises ``ValueError`` (nothing else) at construction. Plus fused attention
equals the math path for random shapes, GQA/MQA head counts, padding masks and causality.

Sizes are tiny and examples few (``SETTINGS``) so the file runs in well under a minute on one CPU core.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visionformers.nn import Attention
from visionformers.text.bert import Bert, BertConfig
from visionformers.text.gpt import GPT, GPTConfig
from visionformers.vision.dit import DiT, DiTConfig
from visionformers.vision.swin import SwinConfig, SwinTransformer
from visionformers.vision.unet import UNet, UNetConfig
from visionformers.vision.vit import ViTConfig, VisionTransformer

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
NAMED = r"^\S+=.* is not accepted; expected "  # _validate.fail's message: field=value is not accepted; expected ...
INVALID_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)  # construction only: cheap


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_output(out: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert tuple(out.shape) == shape
    assert torch.isfinite(out).all()


# ---- ViT --------------------------------------------------------------------------------------------


@st.composite
def vit_cases(draw):
    patch = draw(st.sampled_from([1, 2, 4]))
    pad = draw(st.booleans())
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    cut = (draw(st.integers(0, patch - 1)), draw(st.integers(0, patch - 1))) if pad else (0, 0)
    size = tuple(g * patch - c for g, c in zip(grid, cut))  # with dynamic_img_pad: partial patches at the edges
    heads = draw(st.integers(1, 3))
    pool = draw(st.sampled_from(["cls", "avg"]))
    config = ViTConfig(
        img_size=size[0] if size[0] == size[1] and draw(st.booleans()) else size,
        patch_size=patch,
        in_chans=draw(st.integers(1, 3)),
        num_classes=draw(st.integers(0, 4)),
        embed_dim=heads * draw(st.sampled_from([4, 8])),  # head_dim % 4 == 0: RoPE 2D and sin-cos both fit
        depth=draw(st.integers(1, 2)),
        num_heads=heads,
        class_token=True if pool == "cls" else draw(st.booleans()),
        num_reg_tokens=draw(st.integers(0, 2)),
        global_pool=pool,
        pos_embed=draw(st.sampled_from(["learned", "sincos", "rope", "none"])),
        pos_embed_prefix=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        dynamic_img_pad=pad,
        layer_scale_init=draw(st.sampled_from([None, 1e-4])),
    )
    return config, size, draw(st.integers(1, 2)), draw(st.integers(0, 2**16))


@SETTINGS
@given(vit_cases())
def test_vit_valid_configs_run(case):
    config, size, batch, seed = case
    model = VisionTransformer(config).eval()
    x = torch.randn(batch, config.in_chans, *size, generator=_gen(seed))
    with torch.no_grad():
        out = model(x)
    _check_output(out, (batch, config.num_classes or config.embed_dim))


VIT_INVALID = st.one_of(
    st.builds(lambda h, extra: dict(embed_dim=8 * h + extra, num_heads=h), st.integers(2, 4), st.integers(1, 1)),
    st.builds(lambda p, s: dict(img_size=p * 4 + s, patch_size=p), st.integers(2, 5), st.integers(1, 1)),
    st.builds(lambda d: dict(depth=d), st.integers(-3, 0)),
    st.builds(lambda h: dict(num_heads=h), st.integers(-2, 0)),
    st.builds(lambda n: dict(num_reg_tokens=n), st.integers(-3, -1)),
    st.builds(lambda s: dict(patch_size=s), st.integers(-2, 0)),
    st.builds(lambda p: dict(pos_embed=p), st.sampled_from(["rotary", "alibi", ""])),
    st.builds(lambda p: dict(global_pool=p), st.sampled_from(["max", "token"])),
    st.just(dict(global_pool="cls", class_token=False)),
    st.just(dict(embed_dim=12, num_heads=2, pos_embed="rope")),  # head_dim 6: 2D RoPE needs a multiple of 4
    st.just(dict(embed_dim=6, num_heads=1, pos_embed="sincos")),
    st.builds(lambda r: dict(mlp_ratio=r), st.sampled_from([0.0, -1.0])),
    st.builds(lambda r: dict(drop_path_rate=r), st.sampled_from([1.0, 1.5, -0.1])),
    st.builds(lambda s: dict(img_size=s), st.sampled_from([0, -8, (8,), (8, 8, 8), "32"])),
)


@INVALID_SETTINGS
@given(VIT_INVALID)
def test_vit_invalid_configs_raise(bad):
    base = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=NAMED):  # ours, naming the field, not one from inside torch
        VisionTransformer(ViTConfig(**{**base, **bad}))


# ---- Swin -------------------------------------------------------------------------------------------


@st.composite
def swin_cases(draw):
    stages = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 2))
    patch = draw(st.sampled_from([1, 2]))
    window = draw(st.integers(2, 4))
    build = patch * draw(st.integers(1, 4)) * 2 ** (stages - 1)
    config = SwinConfig(
        img_size=build,
        patch_size=patch,
        in_chans=draw(st.integers(1, 3)),
        num_classes=draw(st.integers(0, 3)),
        embed_dim=heads * draw(st.sampled_from([4, 8])),
        depths=tuple(draw(st.integers(1, 2)) for _ in range(stages)),
        num_heads=tuple(heads * 2**i for i in range(stages)),  # widths double per stage: head_dim stays fixed
        window_size=window,
        drop_path_rate=0.0,
    )
    # any input size: partial patches, partial windows and odd grids before patch merging are padded
    size = (draw(st.integers(1, 3 * build)), draw(st.integers(1, 3 * build)))
    return config, size, draw(st.integers(1, 2)), draw(st.integers(0, 2**16))


@SETTINGS
@given(swin_cases())
def test_swin_valid_configs_run(case):
    config, size, batch, seed = case
    model = SwinTransformer(config).eval()
    x = torch.randn(batch, config.in_chans, *size, generator=_gen(seed))
    with torch.no_grad():
        out = model(x)
    width = config.embed_dim * 2 ** (len(config.depths) - 1)
    _check_output(out, (batch, config.num_classes or width))


SWIN_INVALID = st.one_of(
    st.builds(lambda w: dict(window_size=w), st.integers(-2, 0)),
    st.builds(lambda d: dict(depths=d), st.sampled_from([(), (0, 1), (1, -1), [1, 1]])),
    st.builds(lambda h: dict(depths=(1, 1), num_heads=h), st.sampled_from([(1,), (1, 2, 4), (0, 2), (3, 2), [1, 2]])),
    st.builds(lambda e: dict(embed_dim=e), st.integers(-4, 0)),
    st.builds(lambda s: dict(img_size=s), st.sampled_from([0, 17, (16, 15), (16,)])),  # not divisible by patch 2
    st.builds(lambda r: dict(attn_drop_rate=r), st.sampled_from([1.0, -0.5])),
    st.builds(lambda n: dict(num_classes=n), st.integers(-3, -1)),
)


@INVALID_SETTINGS
@given(SWIN_INVALID)
def test_swin_invalid_configs_raise(bad):
    base = dict(img_size=16, patch_size=2, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4)
    with pytest.raises(ValueError, match=NAMED):  # ours, naming the field, not one from inside torch
        SwinTransformer(SwinConfig(**{**base, **bad}))


# ---- UNet -------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def unet_cases(draw):
    mults = tuple(draw(st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=3)))
    base = draw(st.sampled_from([4, 8]))
    widths = [base * m for m in mults]
    factor = 2 ** (len(mults) - 1)
    size = factor * draw(st.integers(2, 3))  # innermost level >= 2x2: a 1x1 map with one channel per group is degenerate
    levels = [size // 2**i for i in range(len(mults))]
    attn = tuple(sorted(set(draw(st.lists(st.sampled_from(levels), max_size=2))), reverse=True))
    mid = draw(st.booleans())
    attended = [w for w, r in zip(widths, levels) if r in attn] + ([widths[-1]] if mid else [])
    head_dims = [None] + [d for d in _divisors(math.gcd(*attended)) if d >= 2] if attended else [None]
    config = UNetConfig(
        sample_size=size,
        in_channels=draw(st.integers(1, 3)),
        base_channels=base,
        channel_mults=mults,
        num_res_blocks=1,  # a second block adds time, not new code paths
        attention_resolutions=attn,
        attention_head_dim=draw(st.sampled_from(head_dims)),
        mid_attention=mid,
        norm_groups=draw(st.sampled_from(_divisors(math.gcd(base, *widths)))),  # the stem (base) is normed too
        use_scale_shift_norm=draw(st.booleans()),
        num_classes=draw(st.sampled_from([None, 3])),
        learn_sigma=draw(st.booleans()),
    )
    return config, draw(st.integers(1, 2)), draw(st.integers(0, 2**16))


@SETTINGS
@given(unet_cases())
def test_unet_valid_configs_run(case):
    config, batch, seed = case
    model = UNet(config).eval()
    g = _gen(seed)
    s = config.sample_size
    x = torch.randn(batch, config.in_channels, s, s, generator=g)
    t = torch.rand(batch, generator=g) * 999
    labels = torch.randint(0, config.num_classes + 1, (batch,), generator=g) if config.num_classes else None
    with torch.no_grad():
        out = model(x, t, class_labels=labels)
    _check_output(out, (batch, config.in_channels * (2 if config.learn_sigma else 1), s, s))


UNET_INVALID = st.one_of(
    st.builds(lambda g: dict(norm_groups=g), st.sampled_from([3, 5, 6, 7, 16])),  # widths 8 and 16
    st.just(dict(base_channels=4, channel_mults=(3, 6), norm_groups=3)),  # divides the levels 12, 24, not the stem's 4
    st.builds(lambda s: dict(sample_size=s), st.sampled_from([7, 9, 13])),  # channel_mults (1, 2): halved once
    st.builds(lambda r: dict(attention_resolutions=r), st.sampled_from([(5,), (16,), (4, 2)])),  # levels 8, 4
    st.builds(lambda m: dict(channel_mults=m), st.sampled_from([(), (1, 0), (1, -2), [1, 2]])),
    st.builds(lambda b: dict(base_channels=b), st.integers(-8, 0)),
    st.builds(lambda d: dict(attention_head_dim=d), st.sampled_from([3, 5, 0, -4])),
    st.builds(lambda n: dict(num_res_blocks=n), st.integers(-2, 0)),
    st.builds(lambda p: dict(dropout=p), st.sampled_from([1.0, -0.1])),
    st.builds(lambda n: dict(num_classes=n), st.sampled_from([0, -1])),
    st.builds(lambda c: dict(context_dim=c), st.sampled_from([0, -8])),
)


@INVALID_SETTINGS
@given(UNET_INVALID)
def test_unet_invalid_configs_raise(bad):
    base = dict(sample_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), attention_head_dim=None, norm_groups=4)
    with pytest.raises(ValueError, match=NAMED):  # ours, naming the field, not one from inside torch
        UNet(UNetConfig(**{**base, **bad}))


# ---- DiT --------------------------------------------------------------------------------------------


@st.composite
def dit_cases(draw):
    patch = draw(st.sampled_from([1, 2]))
    heads = draw(st.integers(1, 2))
    config = DiTConfig(
        sample_size=patch * draw(st.integers(1, 4)),
        in_channels=draw(st.integers(1, 2)),
        patch_size=patch,
        hidden_size=heads * draw(st.sampled_from([4, 8])),  # a multiple of 4: the 2D sin-cos table
        depth=draw(st.integers(1, 2)),
        num_heads=heads,
        num_classes=draw(st.sampled_from([None, 3])),
        class_dropout_prob=0.0,
        learn_sigma=draw(st.booleans()),
        freq_dim=draw(st.sampled_from([8, 16])),
    )
    return config, draw(st.integers(1, 2)), draw(st.integers(0, 2**16))


@SETTINGS
@given(dit_cases())
def test_dit_valid_configs_run(case):
    config, batch, seed = case
    model = DiT(config).eval()
    with torch.no_grad():  # DiT zero-inits its output layer; random weights make the shape check meaningful
        for p in model.parameters():
            p.normal_(0, 0.2, generator=_gen(seed))
    g = _gen(seed + 1)
    s = config.sample_size
    x = torch.randn(batch, config.in_channels, s, s, generator=g)
    labels = torch.randint(0, config.num_classes + 1, (batch,), generator=g) if config.num_classes else None
    with torch.no_grad():
        out = model(x, torch.rand(batch, generator=g) * 999, class_labels=labels)
    _check_output(out, (batch, config.in_channels * (2 if config.learn_sigma else 1), s, s))


DIT_INVALID = st.one_of(
    st.builds(lambda s: dict(sample_size=s), st.sampled_from([3, 5, 9])),  # patch 2
    st.builds(lambda h: dict(hidden_size=h), st.sampled_from([6, 10, 18])),  # not a multiple of 4 heads / of 4
    st.just(dict(hidden_size=15, num_heads=3)),  # a multiple of the heads, not of 4
    st.builds(lambda d: dict(depth=d), st.integers(-2, 0)),
    st.builds(lambda h: dict(num_heads=h), st.integers(-2, 0)),
    st.builds(lambda n: dict(num_classes=n), st.sampled_from([0, -3])),
    st.builds(lambda p: dict(class_dropout_prob=p), st.sampled_from([1.0, 2.0, -0.1])),
    st.builds(lambda p: dict(patch_size=p), st.integers(-1, 0)),
)


@INVALID_SETTINGS
@given(DIT_INVALID)
def test_dit_invalid_configs_raise(bad):
    base = dict(sample_size=8, in_channels=1, patch_size=2, hidden_size=16, depth=1, num_heads=4, num_classes=None)
    with pytest.raises(ValueError, match=NAMED):  # ours, naming the field, not one from inside torch
        DiT(DiTConfig(**{**base, **bad}))


# ---- GPT / BERT -------------------------------------------------------------------------------------


@st.composite
def text_cases(draw):
    heads = draw(st.integers(1, 4))
    dims = dict(
        vocab_size=draw(st.integers(5, 40)),
        max_len=draw(st.integers(4, 12)),
        dim=heads * draw(st.sampled_from([2, 4, 8])),
        depth=draw(st.integers(1, 2)),
        num_heads=heads,
        dropout=0.0,
        attn_drop=0.0,
    )
    n = draw(st.integers(1, dims["max_len"]))
    return dims, draw(st.integers(1, 2)), n, draw(st.integers(0, 2**16))


@SETTINGS
@given(text_cases(), st.booleans(), st.booleans())
def test_gpt_valid_configs_run(case, pre_norm, tie):
    dims, batch, n, seed = case
    model = GPT(GPTConfig(**dims, pre_norm=pre_norm, tie_embeddings=tie, mlp_ratio=2.0, eos_token_id=None)).eval()
    ids = torch.randint(0, dims["vocab_size"], (batch, n), generator=_gen(seed))
    with torch.no_grad():
        out = model(ids, labels=ids if n > 1 else None)  # one token has no next token to predict (a ValueError)
    _check_output(out.logits, (batch, n, dims["vocab_size"]))
    assert out.loss is None if n == 1 else torch.isfinite(out.loss)


@SETTINGS
@given(text_cases())
def test_bert_valid_configs_run(case):
    dims, batch, n, seed = case
    model = Bert(BertConfig(**dims, mlp_hidden_dim=2 * dims["dim"])).eval()
    g = _gen(seed)
    ids = torch.randint(0, dims["vocab_size"], (batch, n), generator=g)
    mask = torch.rand(batch, n, generator=g) < 0.7
    mask[:, 0] = True  # every sequence keeps at least one real token
    types = torch.randint(0, 2, (batch, n), generator=g)
    with torch.no_grad():
        seq, pooled = model(ids, attention_mask=mask, token_type_ids=types)
    _check_output(seq, (batch, n, dims["dim"]))
    _check_output(pooled, (batch, dims["dim"]))


TEXT_INVALID = st.one_of(
    st.builds(lambda h, r: dict(dim=8 * h + r, num_heads=h), st.integers(2, 5), st.integers(1, 1)),
    st.builds(lambda h: dict(num_heads=h), st.integers(-2, 0)),
    st.builds(lambda d: dict(depth=d), st.integers(-3, 0)),
    st.builds(lambda v: dict(vocab_size=v), st.integers(-2, 0)),
    st.builds(lambda m: dict(max_len=m), st.integers(-2, 0)),
    st.builds(lambda d: dict(dim=d), st.sampled_from([0, -16, 16.0])),
    st.builds(lambda p: dict(dropout=p), st.sampled_from([1.0, -0.2])),
    st.builds(lambda a: dict(mlp_act=a), st.sampled_from(["swish", "GELU", ""])),
)


@INVALID_SETTINGS
@given(TEXT_INVALID, st.sampled_from(["gpt", "bert"]))
def test_text_invalid_configs_raise(bad, family):
    base = dict(vocab_size=20, max_len=8, dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=NAMED):  # ours, naming the field, not one from inside torch
        if family == "gpt":
            GPT(GPTConfig(**{"eos_token_id": None, **base, **bad}))
        else:
            Bert(BertConfig(**{**base, **bad}))


# ---- attention: fused == math -----------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4, 6]))
    kv_heads = draw(st.sampled_from(_divisors(heads)))
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    return dict(
        batch=draw(st.integers(1, 3)),
        n=draw(st.integers(1, 9)),
        heads=heads,
        kv_heads=kv_heads,
        dim=heads * head_dim,
        causal=draw(st.booleans()),
        padding=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(attention_cases())
def test_attention_fused_equals_math(c):
    torch.manual_seed(c["seed"])
    attn = Attention(c["dim"], c["heads"], num_kv_heads=c["kv_heads"], qkv_bias=True, qk_norm=c["qk_norm"]).eval()
    g = _gen(c["seed"])
    x = torch.randn(c["batch"], c["n"], c["dim"], generator=g)
    kw = dict(is_causal=c["causal"])
    if c["padding"]:
        mask = torch.rand(c["batch"], c["n"], generator=g) < 0.6
        mask[:, 0] = True  # the first key is visible to every query (also under the causal mask)
        kw["mask"] = mask
    with torch.no_grad():
        fused = attn(x, **kw)
        math_out, weights = attn(x, return_weights=True, **kw)
    assert fused.shape == (c["batch"], c["n"], c["dim"])
    assert weights.shape == (c["batch"], c["heads"], c["n"], c["n"])
    torch.testing.assert_close(fused, math_out, atol=1e-5, rtol=1e-5)

