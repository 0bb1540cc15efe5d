"""nn.gemm: the native products with packed weights and fused epilogues, against float64 PyTorch; the packing
cache; the dispatch from nn.linear, nn.mlp and nn.fused; the choice by environment or timing."""
import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionformers.nn.gemm as gemm_mod
import visionformers.nn.linear as linear_mod
from visionformers.nn import TransformerBlock
from visionformers.nn.gemm import gemm, native_gemm_available, packed
from visionformers.nn.linear import NATIVE_MAX_ROWS, Linear, gemm_chosen, gemm_taken, linear

needs_kernel = pytest.mark.skipif(not native_gemm_available(), reason="needs the native kernel (Linux with a C compiler)")


@pytest.fixture
def gemm_calls(count_native_calls):
    return count_native_calls(gemm_mod._KERNEL)


def _ref(x, w, b=None, act=None, residual=None):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    if act == "gelu":
        y = F.gelu(y)
    elif act == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif act == "relu":
        y = F.relu(y)
    elif act == "silu":
        y = F.silu(y)
    return y if residual is None else residual.double() + y


def _tol(k):
    return dict(rtol=1e-5, atol=2e-6 * k**0.5)


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 3, 7), (17, 40, 33), (131, 96, 288), (97, 800, 50), (300, 64, 1000)])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "relu", "silu"])
def test_product_with_bias_and_activation(m, k, n, act):
    # ragged: partial panels (n % 16), partial row blocks, K over several blocks (800 > KC)
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    s, h = gemm(x, w, b, act=act)
    assert h is None and s.shape == (m, n) and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), _ref(x, w, b, act), **_tol(k))
    s, _ = gemm(x, w, None, act=act)  # no bias
    torch.testing.assert_close(s.double(), _ref(x, w, None, act), **_tol(k))


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(3, 5, 7), (100, 384, 96), (77, 513, 200)])
@pytest.mark.parametrize("norm_kind", ["none", "affine", "no_bias", "plain"])
@pytest.mark.parametrize("keep_sum", [True, False])
def test_residual_and_layer_norm_epilogue(m, k, n, norm_kind, keep_sum):
    x, w, b, r = torch.randn(2, m, k), torch.randn(n, k) / k**0.5, torch.randn(n), torch.randn(2, m, n)
    g, beta = 1 + torch.randn(n), torch.randn(n)
    norm = {"none": None, "affine": (g, beta, 1e-6), "no_bias": (g, None, 1e-5), "plain": (None, None, 1e-5)}[norm_kind]
    s, h = gemm(x, w, b, residual=r, norm=norm, keep_sum=keep_sum)
    ref_s = _ref(x, w, b, residual=r)
    if norm is None or keep_sum:
        torch.testing.assert_close(s.double(), ref_s, **_tol(k))
    else:
        assert s is None
    if norm is None:
        assert h is None
    else:
        nw, nb, eps = norm
        ref_h = F.layer_norm(ref_s, (n,), None if nw is None else nw.double(), None if nb is None else nb.double(), eps)
        torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_result_does_not_depend_on_thread_count():
    x, w, b = torch.randn(301, 200), torch.randn(70, 200), torch.randn(70)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(gemm(x, w, b, act="gelu")[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernel
def test_packing_is_kept_and_renewed_when_the_weight_changes():
    w = torch.randn(40, 24)
    first = packed(w)
    assert packed(w) is first  # kept
    x = torch.randn(20, 24)
    with torch.no_grad():
        w.mul_(2)  # in place: a new version
    assert packed(w) is not first
    torch.testing.assert_close(gemm(x, w)[0].double(), _ref(x, w), **_tol(24))
    layer = nn.Linear(24, 40)
    before = packed(layer.weight)
    layer.weight.data = torch.randn(40, 24)  # new storage under the same parameter
    assert packed(layer.weight) is not before
    torch.testing.assert_close(gemm(x, layer.weight)[0].double(), _ref(x, layer.weight), **_tol(24))


@needs_kernel
def test_packing_is_freed_with_the_weight_and_bounded(monkeypatch):
    gemm_mod.clear_packed()
    w = torch.randn(64, 32)
    packed(w)
    used = gemm_mod._packed_bytes
    assert used >= 64 * 32 * 4 and len(gemm_mod._packed) == 1
    del w
    gc.collect()
    assert gemm_mod._packed_bytes == 0 and not gemm_mod._packed
    monkeypatch.setattr(gemm_mod, "PACK_BUDGET_BYTES", used - 1)  # over the budget: not packed, not taken
    w = torch.randn(64, 32)
    assert packed(w) is None and gemm(torch.randn(20, 32), w) is None
    with torch.inference_mode():
        layer = Linear(32, 64)
        x = torch.randn(20, 32)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # the library path instead
    with torch.inference_mode():
        assert packed(torch.randn(8, 8)) is None  # inference tensors have no version counter: not cached


@needs_kernel
def test_packing_from_several_threads_keeps_one_copy():
    gemm_mod.clear_packed()
    w = torch.randn(256, 128)
    results = []
    threads = [threading.Thread(target=lambda: results.append(packed(w))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is packed(w) for r in results)  # every thread got the kept panels
    assert len(gemm_mod._packed) == 1 and gemm_mod._packed_bytes == packed(w).numel() * 4


@needs_kernel
def test_linear_takes_the_gemm_for_many_rows_in_inference(gemm_calls, monkeypatch):
    monkeypatch.setattr(linear_mod, "_gemm", True)
    layer = Linear(48, 36)
    few, many = torch.randn(NATIVE_MAX_ROWS, 48), torch.randn(3, 11, 48)
    with torch.inference_mode():
        linear(few, layer.weight, layer.bias)
        assert gemm_calls == []  # the rows kernel's case
        out = layer(many)
    assert gemm_calls.count("vf_gemm") == 1
    torch.testing.assert_close(out.double(), _ref(many, layer.weight, layer.bias), **_tol(48))


@needs_kernel
def test_not_taken_where_f_linear_must_run(gemm_calls, monkeypatch):
    monkeypatch.setattr(linear_mod, "_gemm", True)
    w, b = torch.randn(16, 32), torch.randn(16)
    x = torch.randn(40, 32)
    cases = {
        "float64": (x.double(), w.double(), b.double()),
        "strided input": (torch.randn(40, 64)[:, ::2], w, b),
        "transposed weight": (x, torch.randn(32, 16).t(), b),
        "no rows": (x[:0], w, b),
    }
    with torch.inference_mode():
        for name, (xi, wi, bi) in cases.items():
            assert not gemm_taken(xi, wi, bi), name
            torch.testing.assert_close(linear(xi, wi, bi), F.linear(xi, wi, bi), msg=name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, w, b).dtype == torch.bfloat16
    layer = Linear(32, 16)
    xg = torch.randn(40, 32, requires_grad=True)
    layer(xg).sum().backward()  # autograd: F.linear, gradients as usual
    assert layer.weight.grad is not None and xg.grad is not None
    monkeypatch.setattr(linear_mod, "_gemm", False)  # not chosen on this machine
    with torch.inference_mode():
        linear(x, w, b)
    assert "vf_gemm" not in gemm_calls


@needs_kernel
@pytest.mark.parametrize("pre_norm", [True, False])
def test_block_inference_is_the_same_with_and_without_the_gemm(pre_norm, gemm_calls, monkeypatch):
    block = TransformerBlock(64, 4, pre_norm=pre_norm, qkv_bias=True).eval()
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 70, 64)  # more tokens than nn.short_attention's fused qkv + attention takes: qkv is a product
    with torch.inference_mode():
        monkeypatch.setattr(linear_mod, "_gemm", True)
        out = block(x)
        # qkv, proj (+ residual + norm), then the whole MLP (fc1 + GELU, fc2 + residual (+ norm)) in one call
        assert gemm_calls.count("vf_gemm") == 2 and gemm_calls.count("vf_mlp") == 1
        monkeypatch.setattr(linear_mod, "_gemm", False)
        ref = block(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("choice", ["0", "1", "auto"])
def test_chosen_by_environment_or_timing(choice, monkeypatch, gemm_calls):
    """VISIONFORMERS_LINEAR_GEMM: 1 always (where the kernel builds), 0 never, auto by timing."""
    monkeypatch.setenv("VISIONFORMERS_LINEAR_GEMM", choice)
    monkeypatch.setattr(linear_mod, "_gemm", None)
    with torch.inference_mode():
        decision = gemm_chosen()
    assert isinstance(decision, bool) and gemm_chosen() is decision  # decided once
    if choice == "0":
        assert decision is False and gemm_calls == []
    elif choice == "1":
        assert decision is native_gemm_available() and "vf_gemm" not in gemm_calls
    elif native_gemm_available():
        assert gemm_calls.count("vf_gemm") == 1 + 8 * 2  # the packing probe, then eight rounds of two products
