"""ViT: presets at tiny width, published parameter counts, position schemes, attention maps (math vs fused),
image-size changes (on load and at run time), save/load, checkpointing and input checks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import visionformers as vf
import visionformers.nn.attention as attention_module
from visionformers.vision.vit import VisionTransformer

# Published sizes (millions): DeiT (Touvron et al. 2021) for Ti/S, ViT (Dosovitskiy et al. 2021, table 1) for the rest.
PUBLISHED_M = {
    "vit_tiny_patch16_224": 5.7,
    "vit_small_patch16_224": 22.0,
    "vit_base_patch16_224": 86.0,
    "vit_base_patch32_224": 88.0,
    "vit_large_patch16_224": 304.0,
    "vit_huge_patch14_224": 632.0,
}
TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for zero/one-initialised tensors (head, prefix tokens, norms) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny(**overrides) -> VisionTransformer:
    cfg = dict(TINY, img_size=16, patch_size=4)
    cfg.update(overrides)
    return randomize_(vf.create_model("vit_tiny_patch4_32", **cfg).eval())


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_counts_match_published(name):
    with torch.device("meta"):
        model = vf.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.01, count


@pytest.mark.parametrize("name", vf.list_models("vit*"))
def test_every_preset_at_tiny_width_forward_backward(name):
    _, preset = vf.registry.get_preset(name)
    model = vf.create_model(name, **TINY, img_size=2 * preset.patch_size, drop_path_rate=0.1)
    randomize_(model).train()
    x = torch.randn(2, preset.in_chans, 2 * preset.patch_size, 2 * preset.patch_size)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pos_embed="sincos"),
        dict(pos_embed="rope"),
        dict(pos_embed="none"),
        dict(global_pool="avg"),
        dict(global_pool="avg", class_token=False),
        dict(num_reg_tokens=2),
        dict(num_reg_tokens=2, pos_embed_prefix=False),
        dict(layer_scale_init=1e-4, qk_norm=True),
        dict(dynamic_img_pad=True, img_size=18),
    ],
)
def test_variants_forward_backward(overrides):
    model = tiny(**overrides).train()
    size = overrides.get("img_size", 16)
    model(torch.randn(2, 3, size, size)).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_feature_extractor_and_pre_logits():
    model = tiny(num_classes=0)
    x = torch.randn(2, 3, 16, 16)
    feats = model(x)
    assert feats.shape == (2, 32)
    full = tiny()
    tokens = full.forward_features(x)
    assert tokens.shape == (2, 1 + 16, 32)
    assert torch.equal(full.forward_head(tokens, pre_logits=True), tokens[:, 0])
    torch.testing.assert_close(full.forward_head(tokens), full.head(tokens[:, 0]))


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_attention_maps_rows_sum_to_one_and_math_forward_equals_fused(monkeypatch, pos_embed):
    model = tiny(pos_embed=pos_embed, num_reg_tokens=1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        maps = model.get_attention_maps(x)
        first = model.get_attention_maps(x, block_idx=0)
        fused = model(x)
    assert maps.shape == first.shape == (2, 2, 2 + 16, 2 + 16)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 18))
    assert (maps >= 0).all() and not torch.equal(maps, first)

    # the whole forward on the math path (softmax(qk^T)v) gives the fused forward's logits
    def math_attend(q, k, v, **kw):
        return attention_module.attend_math(q, k, v, **kw)[0]

    monkeypatch.setattr(attention_module, "attend", math_attend)
    with torch.no_grad():
        math = model(x)
    torch.testing.assert_close(math, fused, atol=1e-5, rtol=1e-5)


def test_attention_maps_block_idx_is_checked():
    model = tiny()
    with pytest.raises(ValueError, match="block_idx"):
        model.get_attention_maps(torch.randn(1, 3, 16, 16), block_idx=2)


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny().train()
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_eval_is_deterministic_with_dropout_and_inference_path_matches_autograd_path():
    model = tiny(drop_rate=0.3, pos_drop_rate=0.3, attn_drop_rate=0.3, proj_drop_rate=0.3, drop_path_rate=0.3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(model(x), a)  # autograd on: out-of-place activations give the same numbers


@pytest.mark.parametrize("train", [False, True])
def test_compiles_as_one_graph(train):
    """torch.compile(fullgraph=True) traces the whole model (eager backend: tracing only, no inductor build)."""
    torch._dynamo.reset()
    model = tiny(pos_embed="rope").train(train)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x) if not train else None
    out = torch.compile(model, backend="eager", fullgraph=True)(x)
    if train:
        out.square().sum().backward()
    else:
        torch.testing.assert_close(out, expected)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny(pos_embed="learned", num_reg_tokens=1, img_size=(16, 20))
    x = torch.randn(2, 3, 16, 20)
    vf.save_pretrained(model, tmp_path)
    loaded = vf.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_img_size_change_on_load_resamples_the_position_table(tmp_path):
    import timm.layers as timm_layers
    model = tiny()
    vf.save_pretrained(model, tmp_path)
    bigger = vf.from_pretrained(tmp_path, img_size=(24, 32)).eval()
    table = bigger.pos_embed.weight
    assert table.shape == (1, 1 + 6 * 8, 32)
    expected = timm_layers.resample_abs_pos_embed(model.pos_embed.weight, (6, 8), (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(table, expected)
    assert bigger(torch.randn(1, 3, 24, 32)).shape == (1, 5)


def test_dynamic_img_size_non_square_equals_a_model_built_for_that_size():
    model = tiny(dynamic_img_size=True)
    x = torch.randn(2, 3, 12, 24)  # non-square, not the build size
    fixed = VisionTransformer(dataclasses.replace(model.config, img_size=(12, 24), dynamic_img_size=False))
    fixed.load_state_dict(fixed.adapt_state_dict(model.state_dict(), model.config))
    with torch.no_grad():
        torch.testing.assert_close(model(x), fixed.eval()(x))
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 5)


def test_sincos_table_follows_the_run_time_grid():
    """A dynamic sin-cos model at 20x12 equals one built for 20x12: the table is the fixed one of that grid."""
    model = tiny(pos_embed="sincos", dynamic_img_size=True, class_token=False, global_pool="avg").eval()
    fixed = VisionTransformer(dataclasses.replace(model.config, img_size=(20, 12), dynamic_img_size=False)).eval()
    fixed.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 20, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fixed(x))


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.randn(1, 3, 17, 16), "divisible by patch_size"),
        (torch.randn(1, 1, 16, 16), "3 channels"),
        (torch.randn(3, 16, 16), "4 dimensions"),
        (torch.randint(0, 255, (1, 3, 16, 16)), "floating-point"),
    ],
)
def test_bad_images_raise_value_error_naming_the_argument(images, match):
    model = tiny(dynamic_img_size=True)
    with pytest.raises(ValueError, match=match) as err:
        model(images)
    assert "images" in str(err.value)


def test_wrong_size_without_dynamic_img_size_is_refused():
    with pytest.raises(ValueError, match="dynamic_img_size"):
        tiny()(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(pos_embed="alibi"), "pos_embed"),
        (dict(global_pool="max"), "global_pool"),
        (dict(class_token=False), "global_pool"),
        (dict(img_size=18), "img_size"),
        (dict(embed_dim=30, num_heads=4), "embed_dim"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(pos_embed="rope", embed_dim=24, num_heads=4), "pos_embed"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        vf.create_model("vit_tiny_patch4_32", **{**TINY, "img_size": 16, "patch_size": 4, **overrides})


@pytest.mark.parametrize("overrides", [dict(), dict(num_reg_tokens=2), dict(global_pool="avg"), dict(pos_embed="rope")])
def test_forward_is_the_head_of_the_features(overrides):
    torch.manual_seed(0)
    model = vf.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, **overrides).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_head(model.forward_features(x)))
