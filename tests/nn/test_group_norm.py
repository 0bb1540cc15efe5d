"""nn.group_norm: the fused GroupNorm(+SiLU) against ATen in double, when the native kernel is taken, and the UNet on it."""
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionformers.nn.group_norm as gn_mod
from visionformers.native import build as _native
from visionformers.nn.group_norm import group_norm_act, native_group_norm_available

CAN_BUILD = sys.platform.startswith("linux") and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not native_group_norm_available(), reason="needs the native kernel (Linux with a C compiler)")
CL = torch.channels_last


@pytest.fixture
def kernel_calls(count_native_calls):
    """Counts the calls that reached the native kernel."""
    return count_native_calls(gn_mod._KERNEL)


def make_norm(groups, channels, affine=True, eps=1e-6, seed=0):
    norm = nn.GroupNorm(groups, channels, eps=eps, affine=affine)
    if affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(channels, generator=g))
            norm.bias.copy_(torch.randn(channels, generator=g))
    return norm


def reference64(x, norm, act, dy):
    """act(GroupNorm(x)) and its gradients, computed by ATen in float64."""
    xd = x.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in (norm.weight, norm.bias)] if norm.affine else [None, None]
    y = F.group_norm(xd, norm.num_groups, params[0], params[1], norm.eps)
    y = F.silu(y) if act == "silu" else y
    y.backward(dy.double())
    return y.detach(), xd.grad, *(None if p is None else p.grad for p in params)


def test_kernel_is_built_where_a_compiler_exists():
    assert native_group_norm_available() == (CAN_BUILD and _native.enabled())


@needs_kernel
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("shape,groups", [((2, 40, 5, 7), 8), ((4, 128, 16, 16), 32), ((3, 64, 1, 130), 4), ((2, 6, 3, 3), 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_and_backward_match_float64(act, shape, groups, affine, kernel_calls):
    torch.manual_seed(0)
    x = (2 * torch.randn(shape) + 0.5).contiguous(memory_format=CL).requires_grad_()
    norm = make_norm(groups, shape[1], affine)
    dy = torch.randn(shape)
    y = group_norm_act(x, norm, act)
    y.backward(dy)
    ref_y, ref_dx, ref_dw, ref_db = reference64(x, norm, act, dy)
    assert y.is_contiguous(memory_format=CL) and x.grad.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(x.grad.double(), ref_dx, rtol=1e-5, atol=1e-5)
    if affine:
        scale = ref_dw.abs().max().item()  # sums over B*H*W terms: compare relative to their size
        torch.testing.assert_close(norm.weight.grad.double(), ref_dw, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(norm.bias.grad.double(), ref_db, rtol=1e-5, atol=1e-6 * ref_db.abs().max().item())
    assert kernel_calls == ["vf_group_norm_fwd", "vf_group_norm_bwd"]


@needs_kernel
def test_at_least_as_accurate_as_aten():
    """Statistics in double: the fused step's error against float64 is no larger than ATen's float32 one."""
    torch.manual_seed(1)
    x = (3 * torch.randn(16, 128, 32, 32) + 2).contiguous(memory_format=CL).requires_grad_()
    norm, dy = make_norm(32, 128), torch.randn(16, 128, 32, 32)
    ref_y, ref_dx, ref_dw, _ = reference64(x, norm, "silu", dy)
    group_norm_act(x, norm, "silu").backward(dy)
    ours = [(group_norm_act(x, norm, "silu").detach().double() - ref_y).abs().max(),
            (x.grad.double() - ref_dx).abs().max(), (norm.weight.grad.double() - ref_dw).abs().max()]
    x.grad = None
    norm.zero_grad()
    F.silu(norm(x)).backward(dy)
    aten = [(F.silu(norm(x)).detach().double() - ref_y).abs().max(),
            (x.grad.double() - ref_dx).abs().max(), (norm.weight.grad.double() - ref_dw).abs().max()]
    for a, b in zip(ours, aten):
        assert a <= 1.5 * b


@needs_kernel
def test_inference_runs_the_kernel_without_autograd(kernel_calls):
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=CL)
    norm = make_norm(8, 32)
    with torch.inference_mode():
        y = group_norm_act(x, norm, "silu")
    torch.testing.assert_close(y, F.silu(norm(x)), rtol=1e-5, atol=2e-6)
    assert kernel_calls == ["vf_group_norm_fwd"]


@needs_kernel
def test_deterministic_and_independent_of_the_thread_count():
    torch.manual_seed(2)
    x = torch.randn(4, 64, 12, 12).contiguous(memory_format=CL).requires_grad_()
    norm, dy = make_norm(16, 64), torch.randn(4, 64, 12, 12)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            x.grad = None
            norm.zero_grad()
            y = group_norm_act(x, norm, "silu")
            y.backward(dy)
            results.append((y.detach(), x.grad, norm.weight.grad, norm.bias.grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("make_x", [
    lambda: torch.randn(2, 32, 8, 8),  # NCHW
    lambda: torch.randn(2, 32, 8, 8, dtype=torch.float64).contiguous(memory_format=CL),  # another dtype
    lambda: torch.randn(1, 32, 8, 8).contiguous(memory_format=CL),  # fewer samples than threads (2 here)
])
def test_other_inputs_run_aten(make_x, kernel_calls):
    x = make_x()
    norm = make_norm(8, 32).to(x.dtype)
    if x.shape[0] < torch.get_num_threads() or not x.is_contiguous(memory_format=CL) or x.dtype != torch.float32:
        assert torch.equal(group_norm_act(x, norm, "silu"), F.silu(norm(x)))
        assert kernel_calls == []


def test_double_backward_is_refused_clearly():
    if not native_group_norm_available():
        pytest.skip("needs the native kernel")
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL).requires_grad_()
    norm = make_norm(4, 16)
    (g,) = torch.autograd.grad(group_norm_act(x, norm, "silu").sum(), x, create_graph=True)
    assert not g.requires_grad  # first-order only: a second backward raises instead of returning zeros
    with pytest.raises(RuntimeError):
        g.sum().backward()
