"""nn.drop.dropout: F.dropout's contract with the native counter-based mask, and stochastic depth."""
import pytest
import torch
import torch.nn.functional as F

import visionformers.nn.drop as drop_mod
from visionformers.nn.drop import dropout, drop_path

needs_kernel = pytest.mark.skipif(drop_mod._KERNEL.get() is None, reason="needs the native kernel (Linux with a C compiler)")
CL = torch.channels_last


@needs_kernel
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keeps_one_minus_p_and_scales_the_kept(p):
    x = torch.rand(1_000_003) + 0.5  # no zeros in x
    y = dropout(x, p)
    kept = y != 0
    n = x.numel()
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # 5 standard deviations
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))


@needs_kernel
def test_mask_has_no_visible_structure():
    """Neighbouring elements and runs of 16 (one vector) are independent: their joint keep rate is the product."""
    y = dropout(torch.ones(1 << 20), 0.5)
    kept = (y != 0).double()
    for lag in (1, 8, 16, 17):
        joint = (kept[:-lag] * kept[lag:]).mean().item()
        assert abs(joint - 0.25) < 0.005
    per_lane = kept.view(-1, 16).mean(0)
    assert (per_lane - 0.5).abs().max() < 0.01


@needs_kernel
def test_seeded_by_torch_generator():
    x = torch.randn(4, 8, 16, 16)
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    b = dropout(x, 0.3)
    c = dropout(x, 0.3)
    assert torch.equal(a, b) and not torch.equal(b, c)


@needs_kernel
def test_same_mask_for_any_thread_count():
    x = torch.randn(300_001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(4)
        a = dropout(x, 0.2)
        torch.set_num_threads(2)
        torch.manual_seed(4)
        b = dropout(x, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


@needs_kernel
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
def test_backward_applies_the_forward_mask(layout, grad_layout):
    x = torch.randn(2, 16, 5, 6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    y = dropout(x, 0.4)
    dy = torch.randn(2, 16, 5, 6)
    if grad_layout == "channels_last":
        dy = dy.contiguous(memory_format=CL)
    y.backward(dy)
    mask = (y != 0).float() / 0.6
    torch.testing.assert_close(x.grad, dy * mask)
    assert y.is_contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)


@needs_kernel
def test_inplace_without_autograd():
    x = torch.randn(1000) + 10
    with torch.no_grad():
        out = dropout(x, 0.5, inplace=True)
    assert out.data_ptr() == x.data_ptr() and (x == 0).any() and (x != 0).any()


def test_identity_in_eval_and_at_p0():
    x = torch.randn(10)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x


def test_other_inputs_follow_f_dropout():
    assert torch.equal(dropout(torch.ones(100), 1.0), torch.zeros(100))  # p = 1: all dropped
    x = torch.randn(8, 8, dtype=torch.float64)
    torch.manual_seed(0)
    a = dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(a, F.dropout(x, 0.5))  # float64 runs ATen's dropout
    strided = torch.randn(8, 16)[:, ::2]
    torch.manual_seed(0)
    a = dropout(strided, 0.5)
    torch.manual_seed(0)
    assert torch.equal(a, F.dropout(strided, 0.5))  # not dense: ATen


def test_drop_path_drops_whole_samples():
    torch.manual_seed(0)
    y = drop_path(torch.ones(1000, 3, 4), 0.5, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 400 < (per_sample[:, 0] == 0).sum() < 600
    assert drop_path(y, 0.5, training=False) is y
