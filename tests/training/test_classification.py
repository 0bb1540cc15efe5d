"""Classifier training library: no-decay rule and layer-wise lr decay (against timm and the BEiT formula), foreign
checkpoints through vf.convert with logits parity, top-k evaluation, the best checkpoint, one epoch of training."""
import re

import pytest
import timm
import torch
from accelerate import Accelerator
from timm.optim import param_groups_layer_decay as timm_layer_decay  # noqa: E402
from timm.optim import param_groups_weight_decay as timm_weight_decay  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset

import visionformers as vf
from visionformers.training import classification as clf

VIT = dict(embed_dim=24, depth=3, num_heads=2, img_size=16, patch_size=4, num_classes=10)
SWIN = dict(embed_dim=12, depths=(2, 1, 1), num_heads=(1, 2, 2), img_size=16, patch_size=2, window_size=2,
            num_classes=10)
TIMM_VIT = dict(embed_dim=24, depth=3, num_heads=2, img_size=16, patch_size=4, num_classes=10)
TIMM_SWIN = dict(embed_dim=12, depths=(2, 1, 1), num_heads=(1, 2, 2), img_size=16, patch_size=2, window_size=2,
                 num_classes=10)


def _tiny(kind):
    return (vf.create_model("vit_tiny_patch4_32", **VIT) if kind == "vit"
            else vf.create_model("swin_tiny_patch2_window4_32", **SWIN))


def _timm(kind, **kw):
    if kind == "vit":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_VIT, **kw)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **TIMM_SWIN, **kw)


def _per_param(groups, key) -> dict[int, float]:
    return {id(p): g[key] for g in groups for p in g["params"]}


def _through_converter(timm_model, values: dict[int, float], kind):
    """Our model holding, in every parameter, the value its timm counterpart was given (mapped by vf.convert)."""
    with torch.no_grad():
        for p in timm_model.parameters():
            p.fill_(values[id(p)])
    cfg, state = vf.convert.from_timm(timm_model.state_dict(), return_config=True)
    ours = _tiny(kind)
    ours.load_state_dict({k: v for k, v in state.items() if k in ours.state_dict()}, strict=False)
    return ours


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_no_weight_decay_matches_timm(kind):
    """Same parameters undecayed as timm's rule (1-D, biases, model.no_weight_decay(): positions, tokens, tables)."""
    ref = _timm(kind)
    groups = timm_weight_decay(ref, 0.05, no_weight_decay_list=ref.no_weight_decay())
    ours = _through_converter(ref, {k: float(v == 0) for k, v in _per_param(groups, "weight_decay").items()}, kind)
    expected = {n for n, p in ours.named_parameters() if bool(p.flatten()[0] == 1)}
    assert clf.no_weight_decay_names(ours) == expected
    if kind == "vit":
        assert {"pos_embed.weight", "cls_token"} <= expected
    else:
        assert {n for n in dict(ours.named_parameters()) if "rel_bias" in n} <= expected
    assert not any(n.endswith(("qkv.weight", "fc1.weight", "head.weight")) for n in expected)


def _beit_layer(name: str, kind: str) -> int:
    """The expected layer id, written from the architecture independently of the library's module walk."""
    if kind == "vit":
        m = re.match(r"blocks\.(\d+)\.", name)
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            return 0
        return int(m.group(1)) + 1 if m else VIT["depth"] + 1
    starts = [sum(SWIN["depths"][:s]) for s in range(len(SWIN["depths"]))]
    m = re.match(r"layers\.(\d+)\.(blocks|rel_bias)\.(\d+)\.", name)
    if m:
        return starts[int(m.group(1))] + int(m.group(3)) + 1
    m = re.match(r"layers\.(\d+)\.downsample\.", name)  # patch merging joins the first block of its stage
    if m:
        return starts[int(m.group(1))] + 1
    return 0 if name.startswith("patch_embed") else sum(SWIN["depths"]) + 1


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_layer_decay_follows_the_beit_formula(kind):
    model, lr, decay = _tiny(kind), 1e-3, 0.7
    groups = clf.param_groups_layer_decay(model, lr, weight_decay=0.05, layer_decay=decay)
    top = (VIT["depth"] if kind == "vit" else sum(SWIN["depths"])) + 1
    got_lr, got_layer = _per_param(groups, "lr"), _per_param(groups, "layer_id")
    no_decay = clf.no_weight_decay_names(model)
    for name, p in model.named_parameters():
        layer = _beit_layer(name, kind)
        assert got_layer[id(p)] == layer, name
        assert got_lr[id(p)] == pytest.approx(lr * decay ** (top - layer), rel=1e-12), name
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:  # one weight decay per group: none on the no-decay set
        assert {names[id(p)] in no_decay for p in g["params"]} == {g["weight_decay"] == 0.0}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # and the optimizer's scheduler scales those per-group rates together
    opt = clf.build_optimizer(model, lr, 0.05, decay)
    sched = vf.training.build_lr_scheduler(opt, "cosine", 2, 10)
    for _ in range(5):
        opt.step(), sched.step()
    ratios = {round(g["lr"] / g["initial_lr"], 12) for g in opt.param_groups}
    assert len(ratios) == 1


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_layer_scales_match_timm_except_the_final_norm(kind):
    """timm groups the final norm with the last block; BEiT (and we) with the head. Everything else agrees."""
    ref = _timm(kind)
    groups = timm_layer_decay(ref, 0.05, layer_decay=0.5, no_weight_decay_list=ref.no_weight_decay())
    ours = _through_converter(ref, _per_param(groups, "lr_scale"), kind)
    mine = _per_param(clf.param_groups_layer_decay(ours, 1.0, 0.05, 0.5), "lr_scale")
    for name, p in ours.named_parameters():
        if not name.startswith("norm."):
            assert mine[id(p)] == pytest.approx(float(p.detach().flatten()[0]), rel=1e-6), name


def test_frozen_parameters_are_left_out_and_bad_values_rejected():
    model = _tiny("vit")
    model.patch_embed.requires_grad_(False)
    groups = clf.param_groups_layer_decay(model, 1e-3)
    params = {id(p) for g in groups for p in g["params"]}
    assert id(model.patch_embed.proj.weight) not in params and id(model.head.weight) in params
    for kw, name in [(dict(layer_decay=0), "layer_decay"), (dict(layer_decay=1.5), "layer_decay"),
                     (dict(weight_decay=-1), "weight_decay")]:
        with pytest.raises(ValueError, match=name):
            clf.param_groups_layer_decay(model, 1e-3, **kw)
    with pytest.raises(ValueError, match="learning_rate"):
        clf.param_groups_layer_decay(model, 0.0)


# ---- foreign checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_timm_checkpoint_file_loads_with_logits_parity(kind, tmp_path):
    ref = _timm(kind, in_chans=3).eval()
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)  # a DDP trainer's file
    preset = "vit_tiny_patch4_32" if kind == "vit" else "swin_tiny_patch2_window4_32"
    hint = {"num_heads": VIT["num_heads"]} if kind == "vit" else {}  # a ViT's head count is not in its weights
    model = clf.build_classifier(preset, init_checkpoint=path, init_format="timm", **hint,
                                 num_classes=10, img_size=16).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
        # another label set: the head starts afresh, the features are the checkpoint's
        five = clf.build_classifier(preset, init_checkpoint=path, init_format="timm", **hint, num_classes=5,
                                    img_size=16).eval()
        torch.testing.assert_close(five.forward_head(five.forward_features(x), pre_logits=True),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True), rtol=1e-5, atol=1e-5)
    assert five(x).shape == (3, 5)


def test_torchvision_checkpoint_and_safetensors_file(tmp_path):
    import torchvision as tv
    from safetensors.torch import save_file

    ref = tv.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=24,
                                      mlp_dim=96, num_classes=10).eval()
    path = tmp_path / "tv.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = clf.build_classifier("vit_tiny_patch4_32", init_checkpoint=path, init_format="torchvision",
                                 num_heads=2, num_classes=10, img_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_pretrained_dir_to_new_classes_and_size(tmp_path):
    src = _tiny("vit").eval()
    vf.save_pretrained(src, tmp_path / "m")
    model = clf.build_classifier(pretrained=tmp_path / "m", num_classes=3, img_size=24).eval()
    assert model.config.num_classes == 3 and model.config.img_size == 24
    mine, theirs = dict(model.named_parameters()), dict(src.named_parameters())
    for name in ("blocks.0.attn.qkv.weight", "cls_token", "norm.weight"):
        assert torch.equal(mine[name], theirs[name])
    assert mine["pos_embed.weight"].shape[1] == 1 + 6 * 6  # resampled from a 4x4 to a 6x6 grid
    with pytest.raises(ValueError, match="model name"):
        clf.build_classifier("vit_nope")


# ---- evaluation, one epoch, best checkpoint -----------------------------------------------------------


class _LogitsAsImages(torch.nn.Module):
    """A 'classifier' whose logits are its input: images (B, K, 1, 1) -> (B, K)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.flatten(1) * self.w


def test_evaluate_top_k_on_a_toy():
    g = torch.Generator().manual_seed(1)
    n, k = 37, 10  # 37 = 3 batches of 16 with a ragged last one
    logits, labels = torch.randn(n, k, generator=g), torch.randint(0, k, (n,), generator=g)
    rank = (logits > logits.gather(1, labels[:, None])).sum(1)  # how many classes beat the label
    loader = DataLoader([{"pixel_values": logits[i].view(k, 1, 1), "label": labels[i]} for i in range(n)],
                        batch_size=16)
    acc = Accelerator(cpu=True)
    result = clf.evaluate(_LogitsAsImages(), acc.prepare(loader), acc, topk=(1, 5))
    assert result.num_samples == n
    assert result.top1 == pytest.approx(float((rank < 1).float().mean()))
    assert result.top5 == pytest.approx(float((rank < 5).float().mean()))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_train_one_epoch_steps_the_schedule_once_per_update(accumulation):
    torch.manual_seed(0)
    model = _tiny("vit")
    x, y = torch.randn(24, 3, 16, 16), torch.randint(0, 10, (24,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=lambda b: {
        "pixel_values": torch.stack([i[0] for i in b]), "label": torch.stack([i[1] for i in b])})
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    opt = clf.build_optimizer(model, 1e-3)
    sched = vf.training.build_lr_scheduler(opt, "constant", 0, 100)
    before = model.head.weight.detach().clone()
    model, opt = acc.prepare(model, opt)
    stats = clf.train_one_epoch(model, loader, opt, sched, acc, num_classes=10, mixup_alpha=0.2, cutmix_alpha=1.0,
                                generator=torch.Generator().manual_seed(0))
    assert stats["steps"] == 6 // accumulation == sched.last_epoch and stats["samples"] == 24
    assert stats["loss"] == pytest.approx(2.302585, abs=0.05)  # zero-initialised head: ln(10) at the start
    assert not torch.equal(before, acc.unwrap_model(model).head.weight)
    stats = clf.train_one_epoch(model, loader, opt, sched, acc, num_classes=10, max_steps=1)
    assert stats["steps"] == 1


def test_best_checkpoint_keeps_the_best_and_loads(tmp_path):
    from visionformers.metrics import AccuracyResult

    acc, model = Accelerator(cpu=True), _tiny("vit")
    best = clf.BestCheckpoint(tmp_path / "best", {"preprocess.json": {"image_size": 16}})
    assert best.update(model, acc, AccuracyResult(10, {1: 0.5, 5: 0.9}), epoch=0)
    with torch.no_grad():
        model.head.bias.fill_(1.0)
    assert not best.update(model, acc, AccuracyResult(10, {1: 0.5, 5: 1.0}), epoch=1)  # a tie keeps the first
    loaded = vf.from_pretrained(tmp_path / "best")
    assert torch.equal(loaded.head.bias, torch.zeros(10))
    assert best.update(model, acc, AccuracyResult(10, {1: 0.6, 5: 1.0}), epoch=2)
    assert torch.equal(vf.from_pretrained(tmp_path / "best").head.bias, torch.ones(10))
    import json

    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary or trashed directory left
