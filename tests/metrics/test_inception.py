"""Parity of our Inception-v3 with pytorch-fid's (test extra) and torchvision's, on random perturbed weights.

Weights: pytorch-fid's network is built without its download (its URL loader and the strict load patched out),
every parameter is perturbed, the BatchNorm statistics are set from a forward in training mode (so activations
keep a bounded, image-dependent scale through the 47 layers instead of vanishing, and the tolerance means
something; the two networks agree to the bit here, as they run the same operations), and the state dict is saved as
``pt_inception-2015-12-05-6726825d.pth`` is: ``torch.save(fid_inception_v3().state_dict())``.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from visionformers.metrics import InceptionFeatures, build_feature_extractor, resize_images
from visionformers.metrics.inception import InceptionV3, inception_from_state_dict


def _perturb_and_calibrate(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative: one training-mode forward sets the running stats to its batch's
                m.reset_running_stats()
        aux, net.AuxLogits = net.AuxLogits, None  # torchvision's aux head needs 299x299 inputs in training mode
        net.train()
        net(torch.rand(1, 3, 299, 299, generator=g) * 2 - 1)  # 299: every layer sees enough positions for its stats
        net.AuxLogits = aux
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.01 * torch.randn(m.running_mean.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def pytorch_fid_pair(tmp_path_factory):
    """(pytorch_fid.InceptionV3 returning pool3, its fid_inception_v3 network, path of its saved weights)."""
    import torchvision
    from pytorch_fid import inception as pfi

    mp = pytest.MonkeyPatch()
    mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: None)  # no download
    mp.setattr(torchvision.models.inception.Inception3, "load_state_dict", lambda self, sd, *a, **k: None)
    try:
        torch.manual_seed(0)
        fid_net = pfi.fid_inception_v3()
    finally:
        mp.undo()
    _perturb_and_calibrate(fid_net, seed=1)
    path = tmp_path_factory.mktemp("w") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fid_net.state_dict(), path)
    mp.setattr(pfi, "fid_inception_v3", lambda: fid_net)
    try:
        wrapper = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        mp.undo()
    return wrapper, fid_net, path


def test_pool3_logits_and_spatial_match_pytorch_fid(pytorch_fid_pair):
    wrapper, fid_net, path = pytorch_fid_pair
    ours = InceptionFeatures(path)
    assert ours.name == "inception-pytorch-fid" and ours.net.variant == "pytorch_fid"
    x01 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # pytorch-fid's input range
    spatial_ref = {}
    hook = fid_net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial_ref.setdefault("x", o))
    with torch.no_grad():
        ref = wrapper(x01)[0].flatten(1)  # (1, 2048)
        out = ours.outputs(x01 * 2 - 1)
    hook.remove()
    assert ref.abs().mean() > 0.05  # calibrated: features far from 0, so the tolerance is meaningful
    torch.testing.assert_close(out["pool"], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["logits"], ref @ fid_net.fc.weight.T, atol=1e-4, rtol=1e-4)
    assert out["logits"].shape == (1, 1008)
    torch.testing.assert_close(out["spatial"], spatial_ref["x"][:, :7].flatten(1), atol=1e-4, rtol=1e-4)
    assert out["spatial"].shape == (1, 7 * 17 * 17)


def test_grey_images_are_repeated_to_rgb(pytorch_fid_pair):
    wrapper, _, path = pytorch_fid_pair
    grey = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = wrapper(grey.expand(-1, 3, -1, -1))[0].flatten(1)
        out = build_feature_extractor(f"inception:{path}")(grey * 2 - 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="channels"):
        InceptionFeatures(path)(torch.zeros(1, 2, 8, 8))


def test_torchvision_weights_are_accepted_and_labelled_apart(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = _perturb_and_calibrate(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False), 4)
    torch.save(tv.state_dict(), tmp_path / "inception_v3_google.pth")
    ours = InceptionFeatures(tmp_path / "inception_v3_google.pth")
    assert ours.name == "inception-torchvision" and ours.net.fc.out_features == 1000
    # float64: the two networks agree to round-off, so any structural difference would show
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        tv.fc = nn.Identity()
        ref = tv.double()(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
        out = ours.double()(x)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)


def test_wrong_weight_files_name_the_expected_keys(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(2)}, wrong)
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        InceptionFeatures(wrong)
    sd = InceptionV3("pytorch_fid").state_dict()
    old_pytorch = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # saved before 0.4.1
    assert inception_from_state_dict(old_pytorch).variant == "pytorch_fid"
    del sd["Mixed_6b.branch1x1.conv.weight"]
    with pytest.raises(ValueError, match="missing .*Mixed_6b.branch1x1.conv.weight"):
        inception_from_state_dict(sd)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        InceptionFeatures(tmp_path / "nothere.pth")
    with pytest.raises(ValueError, match="variant"):
        InceptionV3("tf")


def test_resize_policies():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # pytorch-fid: bilinear, align_corners=False, no antialias, on [0, 1]
    ref = F.interpolate((x + 1) / 2, size=(13, 13), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(resize_images(x, 13, "pytorch_fid"), ref)
    # clean-fid mode="clean": PIL bicubic on each float channel in [0, 255], clipped
    from PIL import Image
    img = ((x[1, 2] + 1) * 127.5).numpy()
    pil = np.asarray(Image.fromarray(img, mode="F").resize((13, 13), resample=Image.BICUBIC)).clip(0, 255)
    np.testing.assert_allclose(resize_images(x, 13, "clean")[1, 2].numpy(), pil / 127.5 - 1, atol=1e-6)
    flat = torch.full((1, 1, 9, 9), 0.25)
    for policy in ("pytorch_fid", "clean", "bilinear_antialias", "bicubic_antialias"):
        assert torch.allclose(resize_images(flat, 4, policy), torch.full((1, 1, 4, 4), 0.25), atol=1e-5)
    with pytest.raises(ValueError, match="resize"):
        resize_images(x, 4, "nearest")
