"""torchvision -> visionformers: logits parity with random weights (full-size vit_b_16 and swin_t, reduced
variants), detection of every torchvision ViT / Swin v1 size, resampling, legacy names and errors."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.swin_transformer import SwinTransformer as TVSwin  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer as TVViT  # noqa: E402

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


def convert_and_compare(ref, x, **kw):
    cfg, state = vf.convert.from_torchvision(ref.state_dict(), return_config=True, **kw)
    ours = vf.convert.build_model(cfg, state).eval()
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return ours, cfg


def test_vit_b_16_full_size_parity():
    ref = randomize_(torchvision.models.vit_b_16(weights=None))
    _, cfg = convert_and_compare(ref, torch.randn(1, 3, 224, 224))
    assert cfg == vf.registry.get_preset("vit_base_patch16_224")[1]


def test_swin_t_full_size_parity():
    ref = randomize_(torchvision.models.swin_t(weights=None))
    _, cfg = convert_and_compare(ref, torch.randn(1, 3, 224, 224))
    preset = vf.registry.get_preset("swin_tiny_patch4_window7_224")[1]
    assert (cfg.depths, cfg.num_heads, cfg.embed_dim, cfg.window_size) == (preset.depths, preset.num_heads, preset.embed_dim, preset.window_size)


def test_reduced_vit_parity_batch_two():
    ref = randomize_(TVViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=7))
    convert_and_compare(ref, torch.randn(2, 3, 32, 32), num_heads=2)


def test_reduced_swin_parity_with_shifted_and_clipped_stages():
    ref = randomize_(TVSwin(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[7, 7], num_classes=7))
    convert_and_compare(ref, torch.randn(2, 3, 56, 56))  # grids 14 (shifted windows) and 7 (one window)


@pytest.mark.parametrize(
    "builder, preset",
    [
        ("vit_b_32", "vit_base_patch32_224"),
        ("vit_l_16", "vit_large_patch16_224"),
        ("vit_h_14", "vit_huge_patch14_224"),
        ("swin_s", "swin_small_patch4_window7_224"),
        ("swin_b", "swin_base_patch4_window7_224"),
    ],
)
def test_every_torchvision_size_is_detected(builder, preset):
    with torch.device("meta"):  # shapes only
        ref = getattr(torchvision.models, builder)(weights=None)
    cfg, state = vf.convert.from_torchvision(ref.state_dict(), return_config=True)
    expected = vf.registry.get_preset(preset)[1]
    fields = ("img_size", "patch_size", "embed_dim", "depth", "num_heads") if "vit" in builder else ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size")
    assert {f: getattr(cfg, f) for f in fields} == {f: getattr(expected, f) for f in fields}
    with torch.device("meta"):
        target = vf.registry.get_preset(preset)[0](cfg)
    assert set(state) == set(target.state_dict()) and all(state[k].shape == v.shape for k, v in target.state_dict().items())


def test_img_size_resamples_the_position_table():
    import timm.layers as timm_layers
    ref = randomize_(TVViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64))
    cfg, state = vf.convert.from_torchvision(ref.state_dict(), img_size=48, num_heads=2, return_config=True)
    assert cfg.img_size == 48
    expected = timm_layers.resample_abs_pos_embed(ref.encoder.pos_embedding, (6, 6), (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(state["pos_embed.weight"], expected)
    assert vf.convert.build_model(cfg, state).eval()(torch.randn(1, 3, 48, 48)).shape == (1, 1000)


def test_legacy_mlp_names_convert_alike():
    ref = randomize_(TVViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64))
    state = ref.state_dict()
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in state.items()}
    new, old = vf.convert.from_torchvision(state, num_heads=2), vf.convert.from_torchvision(legacy, num_heads=2)
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


def test_unknown_and_unsupported_architectures_are_refused():
    with torch.device("meta"):
        resnet = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="conv1.weight") as err:
        vf.convert.from_torchvision(resnet.state_dict())
    assert "accepted" in str(err.value) and "swin_t" in str(err.value)
    with torch.device("meta"):
        v2 = torchvision.models.swin_v2_t(weights=None)
    with pytest.raises(ValueError, match="Swin V2"):
        vf.convert.from_torchvision(v2.state_dict())
    ref = TVViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, representation_size=16)
    with pytest.raises(ValueError, match="pre_logits"):
        vf.convert.from_torchvision(ref.state_dict())
