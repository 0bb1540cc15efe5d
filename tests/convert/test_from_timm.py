"""timm -> visionformers: logits parity with random weights (full-size ViT-S/16 and Swin-T, plus reduced
variants: registers, avg pooling, qk-norm + LayerScale, dynamic sizes, padded Swin), resampling, errors."""
from __future__ import annotations

import pytest
import timm
import torch

import visionformers as vf


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb the parameters that start constant (norms, biases, tokens, zero heads) so a wrong mapping
    cannot hide; large random matrices are left as initialised (randomising them costs seconds)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() < 100_000 or not p.any():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def convert_and_compare(ref, x, atol=1e-5, **kw):
    cfg, state = vf.convert.from_timm(ref.state_dict(), return_config=True, **kw)
    ours = vf.convert.build_model(cfg, state).eval()
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    return ours, cfg


def test_vit_small_patch16_224_full_size_parity():
    ref = randomize_(timm.create_model("vit_small_patch16_224", pretrained=False))
    _, cfg = convert_and_compare(ref, torch.randn(1, 3, 224, 224))
    assert cfg == vf.registry.get_preset("vit_small_patch16_224")[1]


def test_swin_tiny_patch4_window7_224_full_size_parity():
    ref = randomize_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False))
    ours, cfg = convert_and_compare(ref, torch.randn(1, 3, 224, 224))
    assert (cfg.depths, cfg.num_heads, cfg.embed_dim, cfg.window_size) == ((2, 2, 6, 2), (3, 6, 12, 24), 96, 7)


VIT_SMALL = dict(embed_dim=64, depth=2, num_heads=4, num_classes=7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(reg_tokens=4, no_embed_class=True),
        dict(global_pool="avg", class_token=False),
        dict(global_pool="avg"),
        dict(qk_norm=True, init_values=1e-3),
        dict(num_classes=0),
    ],
)
def test_vit_variants_parity(kwargs):
    ref = randomize_(timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, **{**VIT_SMALL, **kwargs}))
    convert_and_compare(ref, torch.randn(2, 3, 64, 64), num_heads=4)


def test_vit_dynamic_img_size_non_square_parity():
    ref = randomize_(timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, dynamic_img_size=True, **VIT_SMALL))
    config = vf.registry.replace_config(vf.registry.get_preset("vit_small_patch16_224")[1], dict(img_size=64, dynamic_img_size=True, num_heads=4))
    ours, cfg = convert_and_compare(ref, torch.randn(2, 3, 48, 96), config=config, num_heads=4)
    assert cfg.dynamic_img_size


def test_img_size_resamples_like_timm_at_run_time():
    """Converted for 96x96, the model equals timm's run-time resampling (dynamic_img_size) at 96x96."""
    ref = randomize_(timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, dynamic_img_size=True, **VIT_SMALL))
    cfg, state = vf.convert.from_timm(ref.state_dict(), img_size=96, num_heads=4, return_config=True)
    assert cfg.img_size == 96 and state["pos_embed.weight"].shape == (1, 1 + 36, 64)
    ours = vf.convert.build_model(cfg, state).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_swin_padded_input_and_features_parity():
    """100 px: grids 25, 13, 7, 4 need window padding, odd patch merging (timm's order: roll, then pad)
    and a window clipped to the last grid."""
    ref = randomize_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=100, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)))
    ours, _ = convert_and_compare(ref, torch.randn(2, 3, 100, 100))
    assert ours.table_windows == [(7, 7)] * 3 + [(4, 4)]  # the clipped last-stage table is kept
    x = torch.randn(1, 3, 100, 100)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=0)


def test_swin_small_image_preset_parity_and_window_inference():
    ref = randomize_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=10))
    _, cfg = convert_and_compare(ref, torch.randn(2, 3, 32, 32))  # img_size read from the clipped last-stage table
    assert cfg.img_size == 32 and cfg.window_size == 4 and cfg.patch_size == 2


def test_legacy_swin_layout_with_merging_at_stage_ends():
    ref = randomize_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=16, depths=(2, 2), num_heads=(1, 2)))
    legacy = {}
    for k, v in ref.state_dict().items():  # timm < 0.9 held patch merging in the stage before
        if k.startswith("layers.1.downsample."):
            k = "layers.0.downsample." + k[len("layers.1.downsample."):]
        legacy[k] = v
    ours = vf.convert.build_model(*vf.convert.from_timm(legacy, return_config=True)).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_target_config_sets_heads_and_size():
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, **VIT_SMALL)
    target = vf.registry.replace_config(vf.registry.get_preset("vit_tiny_patch4_32")[1], dict(embed_dim=64, num_heads=8, img_size=80, patch_size=16))
    cfg, state = vf.convert.from_timm(ref.state_dict(), target, return_config=True)
    assert (cfg.num_heads, cfg.img_size) == (8, 80) and state["pos_embed.weight"].shape == (1, 1 + 25, 64)


def test_unknown_architecture_names_keys_and_what_is_accepted():
    with pytest.raises(ValueError, match="conv1.weight") as err:
        vf.convert.from_timm({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})
    assert "accepted" in str(err.value) and "swin" in str(err.value).lower()
    with pytest.raises(ValueError, match="state_dict"):
        vf.convert.from_timm([torch.zeros(1)])


def test_unsupported_timm_vit_variant_is_refused_by_name():
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, pre_norm=True, **VIT_SMALL)
    with pytest.raises(ValueError, match="norm_pre"):
        vf.convert.from_timm(ref.state_dict())
