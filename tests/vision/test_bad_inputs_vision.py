"""Bad inputs to the vision models and the nn blocks: every one is a ValueError naming the argument.

Dtype mismatches (outside autocast), config fields of the wrong type or range, head inputs of the wrong
shape; and the legitimate cases next to them keep working: autocast with float32 inputs, empty batches.
"""
from __future__ import annotations

import functools

import pytest
import torch

import visionformers as vf
from visionformers._validate import check_int, check_number
from visionformers.nn import (
    Attention,
    FourierFeatures,
    LayerScale,
    Mlp,
    PatchEmbed,
    TimestepEmbedding,
    TransformerBlock,
)

# ---- tiny models (built once; eval mode, never mutated) ---------------------------------------------


@functools.cache
def vit(**kw):
    return vf.create_model("vit_tiny_patch4_32", embed_dim=32, depth=2, num_heads=2, num_classes=3, **kw).eval()


@functools.cache
def swin():
    return vf.create_model("swin_tiny_patch2_window4_32", embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                           num_classes=3).eval()


@functools.cache
def unet(context_dim=None):
    return vf.create_model("unet_tiny", sample_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                           attention_resolutions=(4,), attention_head_dim=8, norm_groups=4, num_classes=3,
                           context_dim=context_dim).eval()


@functools.cache
def dit(context_dim=None):
    return vf.create_model("dit_tiny", sample_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                           context_dim=context_dim).eval()


def images(b=2, dtype=torch.float32):
    return torch.randn(b, 3, 32, 32, dtype=dtype)


def latents(b=2, dtype=torch.float32):
    return torch.randn(b, 1, 8, 8, dtype=dtype)


T = torch.tensor([1, 2])


# ---- 1. input dtype vs the model's parameter dtype ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_vit_input_dtype_must_match_the_model(dtype):
    with pytest.raises(ValueError, match=rf"images=.*{dtype}.*expected dtype torch.float32") as info:
        vit()(images(dtype=dtype))
    assert ".to(torch.float32)" in str(info.value) and "model.to(" in str(info.value)


def test_swin_input_dtype_must_match_the_model():
    with pytest.raises(ValueError, match=r"images=.*torch.float64.*expected dtype torch.float32"):
        swin()(images(dtype=torch.float64))


def test_unet_x_and_context_dtype_must_match_the_model():
    with pytest.raises(ValueError, match=r"x=.*torch.float64.*expected dtype torch.float32"):
        unet()(latents(dtype=torch.float64), T)
    with pytest.raises(ValueError, match=r"context=.*torch.float64.*expected dtype torch.float32"):
        unet(context_dim=8)(latents(), T, context=torch.randn(2, 5, 8, dtype=torch.float64))


def test_dit_x_and_context_dtype_must_match_the_model():
    with pytest.raises(ValueError, match=r"x=.*torch.float64.*expected dtype torch.float32"):
        dit()(latents(dtype=torch.float64), T)
    with pytest.raises(ValueError, match=r"context=.*torch.float64.*expected dtype torch.float32"):
        dit(context_dim=8)(latents(), T, context=torch.randn(2, 5, 8, dtype=torch.float64))


def test_attention_x_and_context_dtype_must_match_the_layer():
    with pytest.raises(ValueError, match=r"x=.*torch.float64.*expected dtype torch.float32"):
        Attention(8, 2)(torch.randn(1, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"context=.*torch.float64.*expected dtype torch.float32"):
        Attention(8, 2, context_dim=6)(torch.randn(1, 3, 8), torch.randn(1, 4, 6, dtype=torch.float64))


def test_lower_precision_model_rejects_float32_input():
    model = vf.create_model("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"images=.*torch.float32.*expected dtype torch.bfloat16"):
        model(images())
    assert model(images(dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_integer_images_message_names_the_models_dtype():
    with pytest.raises(ValueError, match=r"images=.*torch.uint8.*floating-point tensor of dtype torch.float32") as info:
        vit()(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert "bfloat16" not in str(info.value)  # the old wording claimed float16/bfloat16 were accepted


def test_bf16_autocast_on_cpu_with_float32_inputs_runs():
    model = vit()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
        assert out.shape == (2, 3) and out.dtype == torch.bfloat16
        assert model(images(dtype=torch.bfloat16)).shape == (2, 3)  # autocast casts any float16/32 input
        assert swin()(images()).shape == (2, 3)
        assert unet(context_dim=8)(latents(), T, context=torch.randn(2, 5, 8)).shape == (2, 1, 8, 8)
        assert dit(context_dim=8)(latents(), T, context=torch.randn(2, 5, 8)).shape == (2, 1, 8, 8)
        # autocast never casts float64, so a float64 batch is still a mismatch
        with pytest.raises(ValueError, match=r"images=.*torch.float64"):
            model(images(dtype=torch.float64))


def test_bf16_autocast_compiles_fullgraph():
    model = vit()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(images(1))
        torch.testing.assert_close(compiled(images(1)).float(), ref.float(), atol=2e-2, rtol=2e-2)


# ---- 2. empty batches: an empty output of the right shape --------------------------------------------


def test_empty_batch_vit():
    model = vit()
    with torch.no_grad():
        assert model(images(0)).shape == (0, 3)
        assert model.forward_features(images(0)).shape == (0, 65, 32)
        assert model.get_attention_maps(images(0)).shape == (0, 2, 65, 65)
        rope = vit(pos_embed="rope", global_pool="avg", class_token=False, num_reg_tokens=1)
        assert rope(images(0)).shape == (0, 3)


def test_empty_batch_swin():
    model = swin()
    with torch.no_grad():
        assert model(images(0)).shape == (0, 3)
        assert model(torch.randn(0, 3, 30, 26)).shape == (0, 3)  # padded windows
        assert model.forward_features(images(0)).shape == (0, 8, 8, 32)
        assert [f.shape for f in model.forward_intermediates(images(0))] == [(0, 16, 16, 16), (0, 32, 8, 8)]


def test_empty_batch_unet_and_dit():
    empty_t, empty_labels = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        out = unet(context_dim=8)(latents(0), empty_t, class_labels=empty_labels, context=torch.randn(0, 5, 8))
        assert out.shape == (0, 1, 8, 8)
        out = dit(context_dim=8)(latents(0), empty_t, class_labels=empty_labels, context=torch.randn(0, 5, 8))
        assert out.shape == (0, 1, 8, 8)


def test_empty_batch_attention():
    assert Attention(8, 4, num_kv_heads=2)(torch.randn(0, 3, 8)).shape == (0, 3, 8)
    assert Attention(8, 4, context_dim=6)(torch.randn(0, 3, 8), torch.randn(0, 2, 6)).shape == (0, 3, 8)


def test_zero_sized_images_are_rejected():
    dynamic = vf.create_model("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"images=.*height and width of at least 1"):
        dynamic(torch.randn(1, 3, 0, 0))
    with pytest.raises(ValueError, match=r"images=.*height and width of at least 1"):
        swin()(torch.randn(1, 3, 0, 8))


# ---- 3. config fields: type and range, each named ------------------------------------------------------

CONFIG_CASES = [
    ("vit_tiny_patch4_32", {"rope_base": -1, "pos_embed": "rope"}, "rope_base=-1"),
    ("vit_tiny_patch4_32", {"norm_eps": -1}, "norm_eps=-1"),
    ("vit_tiny_patch4_32", {"norm_eps": "x"}, "norm_eps='x'"),
    ("vit_tiny_patch16_224", {"mlp_ratio": "4"}, "mlp_ratio='4'"),
    ("vit_tiny_patch4_32", {"layer_scale_init": "x"}, "layer_scale_init='x'"),
    ("vit_tiny_patch4_32", {"qkv_bias": "False"}, "qkv_bias='False'"),
    ("vit_tiny_patch4_32", {"fc_norm": "yes"}, "fc_norm='yes'"),
    ("vit_tiny_patch4_32", {"num_classes": True}, "num_classes=True"),
    ("vit_tiny_patch4_32", {"drop_rate": "0.1"}, "drop_rate='0.1'"),
    ("swin_tiny_patch2_window4_32", {"mlp_ratio": "4"}, "mlp_ratio='4'"),
    ("swin_tiny_patch2_window4_32", {"num_classes": True}, "num_classes=True"),
    ("swin_tiny_patch2_window4_32", {"norm_eps": 0}, "norm_eps=0"),
    ("swin_tiny_patch2_window4_32", {"depths": (True, 2, 2, 2)}, "depths="),
    ("unet_tiny", {"num_classes": True}, "num_classes=True"),
    ("unet_tiny", {"dropout": "0.1"}, "dropout='0.1'"),
    ("unet_tiny", {"attention_head_dim": "8"}, "attention_head_dim='8'"),
    ("unet_tiny", {"time_freq_shift": "a"}, "time_freq_shift='a'"),
    ("unet_tiny", {"time_freq_shift": 16.0}, "time_freq_shift=16.0"),  # base_channels // 2 = 16: division by zero
    ("unet_tiny", {"norm_eps": "x"}, "norm_eps='x'"),
    ("unet_tiny", {"learn_sigma": "yes"}, "learn_sigma='yes'"),
    ("unet_tiny", {"context_dim": True}, "context_dim=True"),
    ("dit_tiny", {"freq_dim": 3}, "freq_dim=3"),
    ("dit_tiny", {"mlp_ratio": "4"}, "mlp_ratio='4'"),
    ("dit_tiny", {"class_dropout_prob": "x"}, "class_dropout_prob='x'"),
    ("dit_tiny", {"time_freq_shift": 128}, "time_freq_shift=128"),
    ("dit_tiny", {"num_classes": True}, "num_classes=True"),
]


@pytest.mark.parametrize("name, overrides, named", CONFIG_CASES, ids=[f"{n}-{next(iter(o))}" for n, o, _ in CONFIG_CASES])
def test_bad_config_field_is_named(name, overrides, named):
    with pytest.raises(ValueError, match="^" + named.replace("(", r"\(").replace(")", r"\)")):
        vf.create_model(name, **overrides)


@pytest.mark.parametrize("build, named", [
    (lambda: Attention(0, 4), "dim=0"),
    (lambda: Attention(8, True), "num_heads=True"),
    (lambda: Attention(8, 2, attn_drop="x"), "attn_drop='x'"),
    (lambda: Attention(8, 2, context_dim=0), "context_dim=0"),
    (lambda: TransformerBlock(8, 2, layer_scale_init="x"), "layer_scale_init='x'"),
    (lambda: TransformerBlock(8, 2, norm_eps="x"), "norm_eps='x'"),
    (lambda: TransformerBlock(8, 2, mlp_ratio="4"), "mlp_ratio='4'"),
    (lambda: TransformerBlock(8, 2, drop_path=1.0), "drop_path=1.0"),
    (lambda: LayerScale(8, "x"), "init_value='x'"),
    (lambda: Mlp(8, "32"), "hidden_dim='32'"),
    (lambda: TimestepEmbedding(8, freq_dim=16, freq_shift="a"), "freq_shift='a'"),
    (lambda: TimestepEmbedding(8, freq_dim=16, freq_shift=8), "freq_shift=8"),
    (lambda: FourierFeatures(7), "dim=7"),
    (lambda: PatchEmbed(img_size="a"), "img_size='a'"),
    (lambda: PatchEmbed(32, 4, in_chans=0), "in_chans=0"),
    (lambda: vf.nn.RotaryEmbedding2D(8, base=-1), "base=-1"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_block_argument_is_named(build, named):
    with pytest.raises(ValueError, match="^" + named):
        build()


def test_shared_helpers_reject_bools_strings_and_nan():
    with pytest.raises(ValueError, match="^depth=True .*a positive int"):
        check_int("depth", True)
    with pytest.raises(ValueError, match="^eps='1e-6' .*a number > 0"):
        check_number("eps", "1e-6", above=0)
    with pytest.raises(ValueError, match="^eps=nan"):
        check_number("eps", float("nan"), above=0)
    check_int("head_dim", None, optional=True)
    check_number("scale", 1, above=0)


# ---- 4. head inputs and other forward arguments ---------------------------------------------------------


def test_vit_forward_head_checks_the_tokens():
    model = vit()
    with pytest.raises(ValueError, match=r"x=.*\(1, 5, 7\).*\(B, N, 32\)"):
        model.forward_head(torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match=r"x=.*3 dimensions"):
        model.forward_head(torch.randn(1, 32))
    with pytest.raises(ValueError, match=r"x=.*torch.float64"):
        model.forward_head(torch.randn(1, 5, 32, dtype=torch.float64))
    avg = vit(global_pool="avg", class_token=False, num_reg_tokens=2)
    with pytest.raises(ValueError, match=r"x=.*N >= 3"):
        avg.forward_head(torch.randn(1, 2, 32))  # only register tokens: nothing to average
    assert model.forward_head(torch.randn(1, 5, 32)).shape == (1, 3)


def test_swin_forward_head_checks_the_features():
    model = swin()
    with pytest.raises(ValueError, match=r"x=.*3 or 4 dimensions"):
        model.forward_head(torch.randn(64))
    with pytest.raises(ValueError, match=r"x=.*\(B, h, w, 32\)"):
        model.forward_head(torch.randn(1, 4, 4, 7))
    with pytest.raises(ValueError, match=r"x=.*at least one token"):
        model.forward_head(torch.randn(1, 0, 32))
    assert model.forward_head(torch.randn(1, 4, 4, 32)).shape == (1, 3)
    assert model.forward_head(torch.randn(1, 16, 32)).shape == (1, 3)


def test_vit_block_idx_must_be_an_int():
    with pytest.raises(ValueError, match=r"block_idx=True"):
        vit().get_attention_maps(images(1), block_idx=True)


def test_transformer_block_checks_x_and_cond():
    block = TransformerBlock(8, 2, cond_dim=6)
    with pytest.raises(ValueError, match=r"x=.*\(B, N, 8\)"):
        block(torch.randn(2, 3, 7), cond=torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"cond=.*\(B, 6\)"):
        block(torch.randn(2, 3, 8), cond=torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"cond=None"):
        block(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"cond=.*torch.float64"):
        block(torch.randn(2, 3, 8), cond=torch.randn(2, 6, dtype=torch.float64))
    assert block(torch.randn(2, 3, 8), cond=torch.randn(1, 6)).shape == (2, 3, 8)  # one cond for the batch
