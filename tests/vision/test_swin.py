"""Swin: presets at tiny width, published parameter counts, the shift mask, window clipping, padding,
the window-order stream (against a plain roll/partition reference), caches, save/load and input checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import visionformers as vf
from visionformers.vision.swin import SwinTransformer, shift_regions, shifted_window_bias

# Millions: torchvision's published counts of its ImageNet swin_t / swin_s / swin_b weights (the paper's
# table 1 rounds them to 28M / 50M / 88M); Swin-L from the paper (197M).
PUBLISHED_M = {
    "swin_tiny_patch4_window7_224": 28.288354,
    "swin_small_patch4_window7_224": 49.606258,
    "swin_base_patch4_window7_224": 87.768224,
    "swin_large_patch4_window7_224": 197.0,
}
TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=5)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny(**overrides) -> SwinTransformer:
    cfg = dict(TINY, img_size=56, patch_size=4, window_size=7, drop_path_rate=0.0)
    cfg.update(overrides)
    return randomize_(vf.create_model("swin_tiny_patch4_window7_224", **cfg).eval())


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_counts_match_published(name):
    with torch.device("meta"):
        model = vf.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.01, count


@pytest.mark.parametrize("name", vf.list_models("swin*"))
def test_every_preset_at_tiny_width_forward_backward(name):
    _, preset = vf.registry.get_preset(name)
    size = preset.patch_size * preset.window_size * 2  # stage 1 shifts (grid 2 windows), stage 2 is clipped
    model = randomize_(vf.create_model(name, **TINY, img_size=size, drop_path_rate=0.1)).train()
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 5)
    logits.square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("res, window, shift", [((8, 8), (4, 4), (2, 2)), ((14, 14), (7, 7), (3, 3)), ((12, 8), (4, 4), (2, 2))])
def test_shift_mask_never_crosses_a_region_of_the_rolled_map(res, window, shift):
    """Two tokens of a shifted window may attend each other only if they were within one window of each
    other in the image *without* wrapping around the border (the regions of Liu et al. 2021, fig. 4)."""
    regions = shift_regions(res, window, shift)
    mask = regions[:, :, None] == regions[:, None, :]  # (nW, N, N)
    # independent construction: roll a map of coordinates and partition it
    rows, cols = torch.meshgrid(torch.arange(res[0]), torch.arange(res[1]), indexing="ij")
    coords = torch.stack((rows, cols), -1).roll((-shift[0], -shift[1]), dims=(0, 1))  # (H, W, 2)
    win = rearrange(coords, "(nh wh) (nw ww) c -> (nh nw) (wh ww) c", wh=window[0], ww=window[1])
    delta = (win[:, :, None] - win[:, None, :]).abs()  # (nW, N, N, 2)
    allowed = (delta[..., 0] < window[0]) & (delta[..., 1] < window[1])
    assert torch.equal(mask, allowed)
    assert not mask.all()  # the last window row/column really is split


def test_shifted_block_bias_is_minus_inf_exactly_across_regions():
    table = tiny().layers[0].rel_bias[1]
    with torch.no_grad():
        bias = shifted_window_bias(table(), (14, 14), (7, 7), (3, 3))  # (nW, H, N, N): the same for every image
        plain = shifted_window_bias(table(), (14, 14), (7, 7), (0, 0))
    regions = shift_regions((14, 14), (7, 7), (3, 3))
    assert bias.shape == (4, 1, 49, 49) and plain.shape == (1, 1, 49, 49)  # regular windows: no mask
    assert torch.equal(torch.isinf(bias), (regions[:, :, None] != regions[:, None, :])[:, None])


def reference_forward(model: SwinTransformer, x: torch.Tensor, stages: list | None = None) -> torch.Tensor:
    """Plain Swin (timm's order of roll -> pad -> partition -> attention -> reverse -> unroll) with the
    same modules, written independently of the model (incl. padding and odd sizes)."""
    c = model.config
    x = F.pad(x, (0, -x.shape[-1] % c.patch_size, 0, -x.shape[-2] % c.patch_size))
    x = model.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C)
    x = model.patch_embed.norm(x)
    for si, stage in enumerate(model.layers):
        if stage.downsample is not None:
            h, w = x.shape[1:3]
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            x = rearrange(x, "b (h dy) (w dx) c -> b h w (dx dy c)", dy=2, dx=2)  # x0, x1, x2, x3 order
            x = stage.downsample.reduction(stage.downsample.norm(x))
        b, h, w, ch = x.shape
        tw = model.table_windows[si]
        ws = (min(tw[0], h), min(tw[1], w))
        for j, block in enumerate(stage.blocks):
            sh = tuple(s // 2 if j % 2 and r > s else 0 for r, s in zip((h, w), ws))
            hn = block.norm1(x).roll((-sh[0], -sh[1]), dims=(1, 2))
            hn = F.pad(hn, (0, 0, 0, -w % ws[1], 0, -h % ws[0]))
            hp, wp = hn.shape[1:3]
            win = rearrange(hn, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=ws[0], ww=ws[1])
            n = ws[0] * ws[1]
            table = stage.rel_bias[j].table
            coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij")).flatten(1)
            rel = coords[:, :, None] - coords[:, None, :]
            idx = (rel[0] + tw[0] - 1) * (2 * tw[1] - 1) + (rel[1] + tw[1] - 1)
            bias = table[idx.flatten()].view(n, n, -1).permute(2, 0, 1)[None]  # (1, H, N, N)
            if any(sh):
                regions = shift_regions((hp, wp), ws, sh)
                allowed = regions[:, :, None] == regions[:, None, :]
                bias = bias.masked_fill(~allowed[:, None], float("-inf")).repeat(b, 1, 1, 1)
            out = block.attn(win, bias=bias)
            out = rearrange(out, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", b=b, nh=hp // ws[0], wh=ws[0])
            x = x + out[:, :h, :w].roll(sh, dims=(1, 2))
            x = x + block.mlp(block.norm2(x))
        if stages is not None:
            stages.append(x.permute(0, 3, 1, 2))  # (B, C, H, W)
    return model.head(model.norm(x).mean(dim=(1, 2)))


@pytest.mark.parametrize("size", [(56, 56), (60, 44), (52, 84), (30, 30)])
def test_forward_equals_a_spelled_out_roll_and_partition(size):
    model = tiny()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(model, x), atol=1e-5, rtol=1e-5)


def test_window_is_clipped_to_small_stage_grids_without_shift():
    with torch.device("meta"):  # shapes only: no need for real weights
        model = vf.create_model("swin_tiny_patch2_window4_32")
    assert model.table_windows == [(4, 4), (4, 4), (4, 4), (2, 2)]
    assert model.layers[3].rel_bias[0].table.shape == (3 * 3, 24)


def test_forward_intermediates_and_features_are_in_raster_order():
    model = tiny(depths=(2, 2, 2), num_heads=(1, 2, 2), img_size=112)
    x = torch.randn(2, 3, 100, 112)
    expected = []
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        last = model.forward_features(x)
        reference_forward(model, x, expected)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 25, 28), (2, 32, 13, 14), (2, 64, 7, 7)]
    for ours, ref in zip(feats, expected):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, model.norm(feats[-1].permute(0, 2, 3, 1)))


def test_batch_sizes_give_the_same_rows():
    model = tiny()
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], atol=1e-5, rtol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny().train()
    x = torch.randn(2, 3, 56, 56)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_eval_is_deterministic_and_inference_path_matches_autograd_path():
    model = tiny(drop_rate=0.3, attn_drop_rate=0.3, proj_drop_rate=0.3, drop_path_rate=0.3)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(model(x), a)


@pytest.mark.parametrize("train", [False, True])
def test_compiles_without_graph_breaks(train):
    """torch.compile sees one graph (dynamo with the eager backend: tracing only, no inductor build)."""
    torch._dynamo.reset()
    model = tiny().train(train)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = model(x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.set_grad_enabled(train):
        out = compiled(x)
    if train:
        out.square().sum().backward()
    else:
        torch.testing.assert_close(out, expected)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny()
    x = torch.randn(2, 3, 56, 56)
    vf.save_pretrained(model, tmp_path)
    loaded = vf.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.randn(1, 1, 56, 56), "3 channels"),
        (torch.randn(3, 56, 56), "4 dimensions"),
        (torch.randint(0, 255, (1, 3, 56, 56)), "floating-point"),
    ],
)
def test_bad_images_raise_value_error_naming_the_argument(images, match):
    with pytest.raises(ValueError, match=match) as err:
        tiny()(images)
    assert "images" in str(err.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_heads=(1, 2, 4)), "num_heads"),
        (dict(num_heads=(3, 2)), "num_heads"),
        (dict(depths=()), "depths"),
        (dict(window_size=0), "window_size"),
        (dict(img_size=(56,)), "img_size"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)


def test_patch_merging_checks_its_input_and_pads_odd_sides():
    merging = tiny().layers[1].downsample
    with torch.no_grad():
        assert merging(torch.randn(2, 14, 14, 16)).shape == (2, 7, 7, 32)
        assert merging(torch.randn(2, 13, 15, 16)).shape == (2, 7, 8, 32)
        with pytest.raises(ValueError, match="x"):
            merging(torch.randn(2, 196, 16))
        with pytest.raises(ValueError, match="x"):
            merging(torch.randn(2, 14, 14, 8))
