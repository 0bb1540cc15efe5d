import numpy as np
import pytest
import torch
import torch.nn as nn

from visionformers.data import DigitsDataset
from visionformers.metrics import (
    ClassifierFeatures,
    RandomConvFeatures,
    build_feature_extractor,
    extract_features,
    feature_statistics,
    fid,
    iter_image_batches,
)


class _ToyClassifier(nn.Module):
    """timm-style protocol: forward_features -> forward_head(pre_logits=True)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward_features(self, x):
        return self.body(x).mean(dim=(2, 3))  # (B, 6)

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_classifier_adapter_returns_pre_logits_and_converts_channels():
    torch.manual_seed(0)
    model = _ToyClassifier()
    x = torch.rand(2, 1, 10, 10) * 2 - 1
    feats = ClassifierFeatures(model, image_size=12, in_chans=3)(x)
    resized = nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(12, 12), mode="bilinear",
                                        align_corners=False, antialias=True)
    assert torch.allclose(feats, model.forward_features(resized))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    normed = ClassifierFeatures(model, mean=mean, std=std, in_chans=3)(x)
    ref = ((x.expand(-1, 3, -1, -1) + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normed, model.forward_features(ref), atol=1e-6)
    plain = ClassifierFeatures(lambda t: t[:, :, :2, :2])(x)  # any callable, flattened to (B, D)
    assert plain.shape == (2, 4)


def test_classifier_adapter_on_a_timm_vit():
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                            depth=2)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = ClassifierFeatures(vit)(x)
        assert torch.allclose(feats, vit.forward_head(vit.forward_features(x), pre_logits=True))
    assert feats.shape == (3, vit.num_features)


def test_random_conv_is_deterministic_across_instances():
    x = torch.rand(3, 1, 20, 20) * 2 - 1
    a, b = RandomConvFeatures(seed=0)(x), RandomConvFeatures(seed=0)(x)
    assert a.shape == (3, 64) and torch.equal(a, b)
    assert not torch.allclose(a, RandomConvFeatures(seed=1)(x))


def test_build_feature_extractor_specs(tmp_path):
    assert isinstance(build_feature_extractor("random_conv:3"), RandomConvFeatures)
    with pytest.raises(ValueError, match="feature_extractor"):
        build_feature_extractor("clip")
    with pytest.raises(FileNotFoundError, match="no_dir"):
        build_feature_extractor(f"visionformers:{tmp_path / 'no_dir'}")
    with pytest.raises(FileNotFoundError):
        build_feature_extractor(f"inception:{tmp_path / 'none.pth'}")


def test_sources_tensor_dataset_loader_agree():
    ds = DigitsDataset("test", image_size=16, channels=3, captions=False)
    ext = RandomConvFeatures(dim=8)
    from_tensor = extract_features(ds.images, ext, batch_size=50)
    from_dataset = extract_features(ds, ext, batch_size=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=33)
    from_loader = extract_features(loader, ext)
    assert from_tensor.shape == (len(ds), 8)
    assert np.allclose(from_tensor, from_dataset, atol=1e-6) and np.allclose(from_tensor, from_loader, atol=1e-6)
    (images, labels), = list(iter_image_batches((ds.images[:5], ds.labels[:5]), batch_size=8))
    assert labels.tolist() == ds.labels[:5].tolist()
    with pytest.raises(ValueError, match="images"):
        extract_features(torch.zeros(4, 8), ext)


def test_fid_ranks_held_out_digits_closer_than_noise():
    ext = RandomConvFeatures(dim=16)
    train = feature_statistics(DigitsDataset("train", image_size=16, channels=3), ext, batch_size=512)
    test = feature_statistics(DigitsDataset("test", image_size=16, channels=3), ext, batch_size=512)
    noise = feature_statistics(torch.rand(364, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, ext)
    close, far = fid(train, test), fid(train, noise)
    assert 0 < close.value < far.value / 10
    assert (close.num_real, close.num_fake) == (1433, 364)


def test_visionformers_classifier_dir(tmp_path):
    import visionformers as vf
    names = vf.list_models("vit*")
    assert names, "the registry lists no vit* preset"
    name = min(names, key=lambda n: (("tiny" not in n), ("small" not in n), n))  # the smallest preset
    model = vf.create_model(name, num_classes=10, img_size=32).eval()
    vf.save_pretrained(model, tmp_path / "clf")
    extractor = build_feature_extractor(f"visionformers:{tmp_path / 'clf'}")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = extractor(x)
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
    assert feats.shape == ref.flatten(1).shape and torch.allclose(feats, ref.flatten(1), atol=1e-5)
