"""IS, precision/recall, the reference cache and FD-DINOv2's extractor, each against a reference computation."""
import numpy as np
import pytest
import torch

from visionformers.metrics import (
    compute_metric,
    dinov2_features,
    inception_score,
    load_reference,
    precision_recall,
    protocol_note,
    reference_key,
    save_reference,
    split_in_two,
)
from visionformers.metrics.features import RandomConvFeatures


def _improved_gan_is(logits, splits):
    """openai/improved-gan's formula, in numpy (softmax, then exp(mean KL(p(y|x) || p(y))) per split)."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(splits):
        part = preds[i * len(preds) // splits : (i + 1) * len(preds) // splits]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_the_reference_formula_and_its_limits():
    logits = np.random.default_rng(0).normal(size=(53, 12)) * 3
    mean, std = inception_score(logits, splits=10)
    ref = _improved_gan_is(logits, 10)
    assert mean == pytest.approx(ref[0], rel=1e-10) and std == pytest.approx(ref[1], rel=1e-8)
    assert inception_score(np.zeros((20, 7)), splits=2)[0] == pytest.approx(1.0)  # uniform p(y|x): IS = 1
    sure = np.eye(5)[np.arange(40) % 5] * 60  # confident and balanced over 5 classes: IS = 5
    assert inception_score(sure, splits=4)[0] == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="splits=10"):
        inception_score(np.zeros((9, 3)))


def _brute_force_pr(real, fake, k):
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    d_ff = ((fake[:, None] - fake[None]) ** 2).sum(-1)
    d_fr = ((fake[:, None] - real[None]) ** 2).sum(-1)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    precision = np.mean((d_fr <= r_real[None]).any(1))
    recall = np.mean((d_fr.T <= r_fake[None]).any(1))
    return precision, recall


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(70, 6))
    fake = rng.normal(size=(50, 6)) * 1.5 + 0.5
    p, r = precision_recall(real, fake, k=3)
    bp, br = _brute_force_pr(real, fake, 3)
    assert (p, r) == pytest.approx((bp, br)) and 0 < p < 1 and 0 < r < 1
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(real[:3], fake)


def test_notes_baseline_split_and_missing_features():
    assert protocol_note("fid", 50_000, 50_000) == ""
    assert protocol_note("fid", 9_999, 50_000) == "below the standard protocol: real n=9999 < 10,000"
    assert "fake n=40 < 50,000" in protocol_note("is", 0, 40) and "real" not in protocol_note("is", 0, 40)
    feats = {"pool": np.arange(20.0).reshape(10, 2)}
    a, b = split_in_two(feats)
    assert len(a["pool"]) == 5 and sorted(np.concatenate([a["pool"], b["pool"]])[:, 0]) == list(range(0, 20, 2))
    with pytest.raises(ValueError, match="inception:PATH"):
        compute_metric("sfid", feats, feats, "random_conv")


def test_reference_cache_refuses_another_key(tmp_path):
    ext = RandomConvFeatures()
    key = reference_key(ext, "digits:test", resolution=32, channels=3, resize="pytorch_fid", num_images=364)
    feats = {"pool": np.ones((3, 2), np.float32)}
    save_reference(tmp_path / "r.npz", key, feats)
    assert np.array_equal(load_reference(tmp_path / "r.npz", key)["pool"], feats["pool"])
    other = dict(key, resize="clean", extractor_weights_sha256="abc")
    with pytest.raises(ValueError, match="resize: 'pytorch_fid' in the cache, 'clean' in this run") as e:
        load_reference(tmp_path / "r.npz", other)
    assert "extractor_weights_sha256" in str(e.value)
    with pytest.raises(ValueError, match="fingerprint"):
        reference_key(torch.nn.Identity(), "digits:test", resolution=32, channels=3, resize="pytorch_fid", num_images=1)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="save_reference"):
        load_reference(tmp_path / "bad.npz", key)


def test_fd_dinov2_extractor_matches_timm(tmp_path):
    """A shrunk random DINOv2-layout timm ViT (patch 14, LayerScale), converted by vf.convert.from_timm."""
    import timm
    import torch.nn.functional as F

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=2, embed_dim=48,
                            num_heads=2, num_classes=0).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save(vit.state_dict(), tmp_path / "dinov2.pth")
    ext = dinov2_features(tmp_path / "dinov2.pth", image_size=28, num_heads=2)
    assert ext.name == "dinov2" and len(ext.fingerprint) == 64
    x = torch.rand(3, 3, 20, 20) * 2 - 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        big = F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False, antialias=True)  # EDM2's resize
        ref = vit.forward_head(vit.forward_features(((big + 1) / 2 - mean) / std), pre_logits=True)
        out = ext(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="cls_token"):
        dinov2_features(tmp_path / "wrong.pth")
