"""nn.conv: Winograd F(2x2, 3x3) against F.conv2d in float64 (forward and every gradient), when it is taken, the
choice by environment or timing, and the UNet on it."""
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionformers.nn.conv as conv_mod
from visionformers.native import build as _native
from visionformers.nn.conv import WINOGRAD_MIN_CHANNELS, Conv2d, conv2d

CAN_BUILD = sys.platform.startswith("linux") and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
HAVE_KERNEL = conv_mod._KERNEL.get() is not None
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="needs the native kernel (Linux with a C compiler)")
CL = torch.channels_last


@pytest.fixture
def kernel_calls(count_native_calls, monkeypatch):
    """Names of the native transforms called, with Winograd chosen whatever this machine's timing said."""
    monkeypatch.setattr(conv_mod, "_chosen", True)
    return count_native_calls(conv_mod._KERNEL)


def make(b, c, k, h, w, seed=0, bias=True, weight_layout=CL):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g).contiguous(memory_format=CL)
    weight = (torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)).contiguous(memory_format=weight_layout)
    return x, weight, torch.randn(k, generator=g) if bias else None, torch.randn(b, k, h, w, generator=g)


def reference64(x, weight, bias, dy):
    """conv2d(x, weight, bias, padding=1) and its gradients, computed by ATen in float64."""
    xd, wd = x.double().requires_grad_(), weight.double().requires_grad_()
    bd = None if bias is None else bias.double().requires_grad_()
    y = F.conv2d(xd, wd, bd, padding=1)
    y.backward(dy.double())
    return y.detach(), xd.grad, wd.grad, None if bd is None else bd.grad


def test_kernel_is_built_where_a_compiler_exists():
    assert HAVE_KERNEL == (CAN_BUILD and _native.enabled())


@needs_kernel
@pytest.mark.parametrize("b,c,k,h,w", [
    (2, 32, 32, 8, 8),     # whole tiles, whole vectors
    (3, 40, 33, 7, 5),     # odd sizes: clipped edge tiles; ragged vector tails on both sides
    (2, 64, 48, 1, 9),     # a one-row map: every tile half outside
    (2, 48, 40, 46, 50),   # more tiles than one chunk at these widths: the products and the filter gradient sum chunks
])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_float64(b, c, k, h, w, bias, kernel_calls, monkeypatch):
    monkeypatch.setattr(conv_mod, "_CHUNK_FLOATS", 16 * 64 * 48)  # small chunks, so the last shape spans several
    x, weight, bias_t, dy = make(b, c, k, h, w, bias=bias)
    ref_y, ref_dx, ref_dw, ref_db = reference64(x, weight, bias_t, dy)
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bg = None if bias_t is None else bias_t.clone().requires_grad_()
    y = conv2d(xg, wg, bg, padding=1)
    y.backward(dy)
    assert y.shape == (b, k, h, w) and y.is_contiguous(memory_format=CL)
    assert xg.grad.is_contiguous(memory_format=CL) and wg.grad.is_contiguous(memory_format=CL)  # the inputs' layouts
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(xg.grad.double(), ref_dx, rtol=1e-5, atol=1e-5)
    # sums over B*H*W positions: compare relative to their size
    torch.testing.assert_close(wg.grad.double(), ref_dw, rtol=1e-5, atol=1e-6 * ref_dw.abs().max().item())
    if bias:
        torch.testing.assert_close(bg.grad.double(), ref_db, rtol=1e-5, atol=1e-6 * ref_db.abs().max().item())
    assert {"vf_wino_in", "vf_wino_out", "vf_wino_grad"} == set(kernel_calls)


@needs_kernel
def test_inference_equals_autograd_forward_and_nchw_weights_are_accepted(kernel_calls):
    x, weight, bias, _ = make(2, 32, 40, 9, 6, weight_layout=torch.contiguous_format)
    with torch.inference_mode():
        fast = conv2d(x, weight, bias, padding=1)
    wg = weight.clone().requires_grad_()
    slow = conv2d(x, wg, bias, padding=1)
    assert torch.equal(fast, slow.detach())
    slow.sum().backward()
    assert wg.grad.is_contiguous()  # an NCHW weight gets an NCHW gradient
    torch.testing.assert_close(fast, F.conv2d(x, weight, bias, padding=1), rtol=1e-5, atol=2e-6)
    assert kernel_calls.count("vf_wino_out") >= 2


@needs_kernel
def test_result_does_not_depend_on_thread_count(kernel_calls):
    x, weight, bias, dy = make(4, 48, 40, 11, 13)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xg = x.clone().requires_grad_()
            y = conv2d(xg, weight, bias, padding=1)
            y.backward(dy)
            outs.append((y.detach(), xg.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@needs_kernel
def test_not_taken_where_f_conv2d_must_run(kernel_calls):
    c = WINOGRAD_MIN_CHANNELS
    x, weight, bias, _ = make(2, c, c, 8, 8)
    cases = {
        "stride 2": (x, weight, bias, dict(stride=2, padding=1)),
        "padding 0": (x, weight, bias, dict(padding=0)),
        "dilation 2": (x, weight, bias, dict(padding=1, dilation=2)),
        "groups 2": (x, weight[:, : c // 2].contiguous(memory_format=CL), bias, dict(padding=1, groups=2)),
        "1x1 filter": (x, torch.randn(c, c, 1, 1), bias, dict(padding=1)),
        "few channels": (x[:, :8].contiguous(memory_format=CL), weight[:, :8].contiguous(memory_format=CL), bias,
                         dict(padding=1)),
        "NCHW input": (x.contiguous(), weight, bias, dict(padding=1)),
        "float64": (x.double(), weight.double(), bias.double(), dict(padding=1)),
        "empty batch": (x[:0], weight, bias, dict(padding=1)),
    }
    for name, (xi, wi, bi, kw) in cases.items():
        torch.testing.assert_close(conv2d(xi, wi, bi, **kw), F.conv2d(xi, wi, bi, **kw), msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv2d(x, weight, bias, padding=1).dtype == torch.bfloat16
    assert kernel_calls == []


@needs_kernel
def test_module_is_an_nn_conv2d_with_the_same_state(kernel_calls):
    torch.manual_seed(0)
    ours = Conv2d(32, 48, 3, padding=1)
    torch.manual_seed(0)
    ref = nn.Conv2d(32, 48, 3, padding=1)
    assert isinstance(ours, nn.Conv2d) and ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=CL)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=2e-6)
    assert kernel_calls  # Winograd ran
    reflect = Conv2d(32, 48, 3, padding=1, padding_mode="reflect")  # other padding modes: nn.Conv2d's own path
    kernel_calls.clear()
    reflect(x)
    assert kernel_calls == []


@needs_kernel
@pytest.mark.parametrize("choice", ["0", "1", "auto"])
def test_chosen_by_environment_or_timing(choice, monkeypatch, count_native_calls):
    """VISIONFORMERS_CONV_WINOGRAD: 1 always, 0 never, auto by timing against oneDNN on this machine."""
    monkeypatch.setenv("VISIONFORMERS_CONV_WINOGRAD", choice)
    monkeypatch.setattr(conv_mod, "_chosen", None)
    calls = count_native_calls(conv_mod._KERNEL)
    decision = conv_mod.winograd_chosen()
    assert isinstance(decision, bool) and conv_mod.winograd_chosen() is decision  # decided once
    if choice == "0":
        assert decision is False and calls == []
    elif choice == "1":
        assert decision is True and calls == []
    else:  # five timed rounds after a warm-up, each the two convolutions of _winograd_faster, chunk by chunk
        chunks = 0
        for c, size in ((128, 32), (256, 16)):
            tiles, chunk = conv_mod._tiles(torch.empty(16, c, size, size), c)
            chunks += -(-tiles // chunk)
        assert calls.count("vf_wino_out") == 6 * chunks
    x, weight, bias, _ = make(2, 32, 32, 8, 8)
    calls.clear()
    conv2d(x, weight, bias, padding=1)
    assert bool(calls) == decision


@needs_kernel
def test_unet_training_step_matches_f_conv2d(monkeypatch):
    """A tiny UNet's loss and every gradient, with the 3x3 convolutions on Winograd and on oneDNN."""
    import visionformers as vf

    torch.manual_seed(0)
    model = vf.create_model("unet_tiny", dropout=0.0)
    for p in model.parameters():  # zero-initialised output layers would hide the convolutions' gradients
        nn.init.normal_(p, std=0.05)
    x, t = torch.randn(4, 1, 32, 32), torch.tensor([1, 200, 500, 900])

    def step(chosen):
        monkeypatch.setattr(conv_mod, "_chosen", chosen)
        model.zero_grad()
        out = model(x, t)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    counted = []
    original = conv_mod._winograd
    monkeypatch.setattr(conv_mod, "_winograd", lambda *a: (counted.append(1), original(*a))[1])
    out_w, grads_w = step(True)
    assert counted  # the UNet's 3x3 convolutions of 32 channels and more ran on Winograd
    out_r, grads_r = step(False)
    torch.testing.assert_close(out_w, out_r, rtol=1e-4, atol=1e-5)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_w[name], g, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().max().item()), msg=name)
