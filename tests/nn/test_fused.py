"""nn.fused: the native epilogues against PyTorch ops, when they are taken, and the fused block path."""
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionformers.nn.blocks as blocks_mod
import visionformers.nn.fused as fused_mod
import visionformers.nn.gemm as gemm_mod
import visionformers.nn.linear as linear_mod
import visionformers.nn.mlp as mlp_mod
from visionformers.native import build as _native
from visionformers.nn import Mlp, RMSNorm, TransformerBlock
from visionformers.nn.fused import linear_add_norm, native_bias_act_, native_epilogue_available
from visionformers.nn.linear import NATIVE_MAX_ROWS
from visionformers.nn.mlp import activation

CAN_BUILD = sys.platform.startswith("linux") and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not native_epilogue_available(), reason="needs the native kernel (Linux with a C compiler)")


@pytest.fixture
def kernel_calls(count_native_calls):
    """Counts the calls that reached the native epilogue kernel and the native GEMM (which takes many rows)."""
    calls = count_native_calls(fused_mod._KERNEL)
    gemm_calls = count_native_calls(gemm_mod._KERNEL)
    return _Merged(calls, gemm_calls)


class _Merged(list):
    """Both kernels' calls in one list (the GEMM's packing left out)."""

    def __init__(self, *sources):
        super().__init__()
        self._sources = sources

    def _all(self):
        return [name for src in self._sources for name in src if name not in ("vf_gemm_pack", "vf_gemm_packed_floats")]

    def __eq__(self, other):
        return self._all() == other

    def __contains__(self, name):
        return name in self._all()

    def __repr__(self):
        return repr(self._all())

    def clear(self):
        for src in self._sources:
            src.clear()


def test_kernel_is_built_where_a_compiler_exists():
    assert native_epilogue_available() == (CAN_BUILD and _native.enabled())


@needs_kernel
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("rows,cols", [(1, 5), (3, 16), (7, 37), (1024, 384)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_act_matches_pytorch(act, rows, cols, with_bias, kernel_calls):
    h = 4 * torch.randn(rows, cols)
    b = torch.randn(cols) if with_bias else None
    ref = activation(act, h if b is None else h + b)
    out = h.clone()
    with torch.inference_mode():
        assert native_bias_act_(out, b, act)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    assert kernel_calls == ["vf_bias_act"]


@needs_kernel
def test_bias_act_extremes():
    # huge and tiny inputs: no overflow to NaN, no subnormal tails; NaN stays NaN as in PyTorch
    h = torch.tensor([-1e30, -200.0, -30.0, -5.0, -1e-30, 0.0, 1e-30, 5.0, 30.0, 200.0, 1e30, float("nan")])
    for act in ("gelu", "gelu_tanh", "relu", "silu"):
        out = h.clone()
        with torch.inference_mode():
            native_bias_act_(out, None, act)
        ref = activation(act, h)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, equal_nan=True)


@needs_kernel
def test_gelu_on_a_dense_grid():
    # steps of 1e-4 through the rational fit of erf, its clamp at |x| = 4.2 sqrt 2 and the saturation of float's erf
    # (|x| = 3.92 sqrt 2): within the fit's error (4.3e-7 of erf, so about 2.2e-7 |x|) of float64 GELU; PyTorch's
    # float GELU is within 1.6e-7 max(|x|, 1)
    h = torch.linspace(-12.0, 12.0, 240_001)
    out = h.clone()
    with torch.inference_mode():
        assert native_bias_act_(out, None, "gelu")
    err = (out.double() - F.gelu(h.double())).abs() / h.double().abs().clamp_min(1.0)
    assert err.max().item() <= 2.5e-7
    assert (out[h <= -6.0] == 0).all() and torch.equal(out[h >= 6.0], h[h >= 6.0])  # Phi exactly 0 and 1 far out


def test_bias_act_declines_what_it_cannot_take():
    h = torch.randn(8, 16, dtype=torch.float64)
    with torch.inference_mode():
        assert not native_bias_act_(h.clone(), None, "gelu")  # float64
        assert not native_bias_act_(torch.randn(8, 16).t(), None, "gelu")  # not contiguous
    x = torch.randn(8, 16, requires_grad=True)
    assert not native_bias_act_(x, None, "gelu")  # autograd


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 600])
@pytest.mark.parametrize("norm_kind", ["none", "affine", "no_bias", "plain"])
@pytest.mark.parametrize("keep_sum", [True, False])
def test_linear_add_norm_matches_pytorch(rows, norm_kind, keep_sum, kernel_calls):
    layer = nn.Linear(40, 24)
    norm = {
        "none": None,
        "affine": nn.LayerNorm(24, eps=1e-6),
        "no_bias": nn.LayerNorm(24, bias=False),
        "plain": nn.LayerNorm(24, elementwise_affine=False),
    }[norm_kind]
    if norm is not None and norm.weight is not None:
        nn.init.normal_(norm.weight)
        if norm.bias is not None:
            nn.init.normal_(norm.bias)
    x, residual = torch.randn(rows, 1, 40), torch.randn(rows, 1, 24)
    with torch.inference_mode():
        s, h = linear_add_norm(x, layer, residual, norm, keep_sum=keep_sum)
        ref_s = residual + layer(x)
        ref_h = None if norm is None else norm(ref_s)
    keep_sum = keep_sum or norm is None  # without a norm the sum is the result
    assert (s is None) != keep_sum and (h is None) == (norm is None)
    if keep_sum:
        torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=1e-5)
    if norm is not None:
        torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
    # a few rows: the product, then the fused epilogue; many rows: one GEMM with the epilogue inside
    assert kernel_calls == (["vf_add_norm"] if rows <= NATIVE_MAX_ROWS else ["vf_gemm"])


def test_linear_add_norm_falls_back_to_pytorch(kernel_calls):
    layer, residual = nn.Linear(8, 6), torch.randn(40, 6)
    x = torch.randn(40, 8)
    # autograd: PyTorch ops, gradients flow
    s, h = linear_add_norm(x.requires_grad_(), layer, residual, nn.LayerNorm(6))
    h.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.inference_mode():
        s, h = linear_add_norm(x.detach(), layer, residual, RMSNorm(6))  # not a LayerNorm
        torch.testing.assert_close(h, RMSNorm(6)(residual + layer(x)))
        s, h = linear_add_norm(x.double(), layer.double(), residual.double(), None)  # float64
        assert s.dtype == torch.float64
    assert kernel_calls == []


def _unfused(monkeypatch, block, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(blocks_mod, "native_epilogue_available", lambda: False)
        m.setattr(mlp_mod, "native_epilogue_available", lambda: False)
        m.setattr(linear_mod, "_gemm", False)
        return block(*args, **kwargs)


@needs_kernel
@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("tokens", [1, 50])
def test_block_fused_inference_equals_the_plain_path(pre_norm, act, tokens, kernel_calls, monkeypatch):
    block = TransformerBlock(48, 4, pre_norm=pre_norm, mlp_act=act, qkv_bias=True).eval()
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(2, tokens, 48)
    with torch.inference_mode():
        out = block(x)
        assert ("vf_add_norm" if tokens == 1 else "vf_gemm") in kernel_calls  # the fused path was taken
        kernel_calls.clear()
        ref = _unfused(monkeypatch, block, x)
        assert kernel_calls == []
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_block_training_and_layer_scale_keep_the_plain_path(kernel_calls, monkeypatch):
    fused_gemm = []  # linear_add_norm's GEMM (plain products may still use the GEMM, without an epilogue)
    monkeypatch.setattr(fused_mod, "gemm", lambda *a, **k: fused_gemm.append(1))
    block = TransformerBlock(32, 4)
    x = torch.randn(2, 9, 32)
    block(x).sum().backward()  # training: autograd path
    scaled = TransformerBlock(32, 4, layer_scale_init=0.1).eval()
    with torch.inference_mode():
        scaled(x)  # a layer scale between the product and the residual: not fused
    assert "vf_add_norm" not in kernel_calls and not fused_gemm


@needs_kernel
@pytest.mark.parametrize("gemm_on", [True, False])
def test_mlp_hidden_fuses_bias_and_activation(gemm_on, kernel_calls, monkeypatch):
    monkeypatch.setattr(linear_mod, "_gemm", gemm_on)
    mlp = Mlp(24, 64).eval()
    x = torch.randn(50, 24)
    with torch.inference_mode():
        out = mlp(x)
    # with the GEMM: the activation inside fc1's product, and fc2; without: fc1's product, then the epilogue
    assert kernel_calls == (["vf_gemm", "vf_gemm"] if gemm_on else ["vf_bias_act"])
    torch.testing.assert_close(out, mlp.fc2(F.gelu(mlp.fc1(x))), rtol=1e-5, atol=1e-5)


def _merge_reference64(x, index, group, norm, layer):
    """The rows of x gathered in groups (index L = a zero row), concatenated, normed and projected, in float64."""
    b, length, c = x.shape
    src = torch.cat((x, x.new_zeros(b, 1, c)), dim=1).double()
    a = src[:, index].reshape(b, index.numel() // group, group * c)
    if norm is not None:
        a = F.layer_norm(a, (group * c,), norm.weight.double(), norm.bias.double(), norm.eps)
    return F.linear(a, layer.weight.double(), None if layer.bias is None else layer.bias.double()).float()


@pytest.mark.parametrize("with_norm, with_bias", [(True, False), (False, True)])
def test_gather_norm_linear_matches_the_gathered_modules(with_norm, with_bias):
    """Swin's patch merging from the stream: 4 neighbours per new token, some of them padding (index L)."""
    torch.manual_seed(0)
    b, length, c, lo = 3, 50, 24, 15
    x = torch.randn(b, length, c)
    index = torch.randint(0, length + 1, (lo * 4,))
    index[:3] = length  # zero rows, as an odd grid's padding
    norm = nn.LayerNorm(4 * c) if with_norm else None
    layer = nn.Linear(4 * c, 40, bias=with_bias)
    for p in [*layer.parameters(), *(norm.parameters() if norm is not None else ())]:
        p.data.add_(0.1 * torch.randn_like(p))
    with torch.no_grad():
        out = fused_mod.gather_norm_linear(x, index, 4, norm, layer)
    if out is None:
        assert not (gemm_mod.native_gemm_available() and linear_mod.gemm_chosen())
        pytest.skip("the native GEMM does not take this product here")
    torch.testing.assert_close(out, _merge_reference64(x, index, 4, norm, layer), rtol=1e-4, atol=1e-4)


def test_gather_norm_linear_declines_what_it_cannot_take():
    torch.manual_seed(0)
    x, index = torch.randn(2, 40, 16), torch.arange(40)
    norm, layer = nn.LayerNorm(64), nn.Linear(64, 32)
    with torch.no_grad():
        taken = fused_mod.gather_norm_linear(x, index, 4, norm, layer) is not None
        assert taken == (gemm_mod.native_gemm_available() and linear_mod.gemm_chosen())
        assert fused_mod.gather_norm_linear(x, index + 2, 4, norm, layer) is None  # 40 is the zero row, 41 out of range
        assert fused_mod.gather_norm_linear(x, index.int(), 4, norm, layer) is None
        assert fused_mod.gather_norm_linear(x, index, 4, RMSNorm(64), layer) is None
        assert fused_mod.gather_norm_linear(x, index, 4, nn.LayerNorm(32), layer) is None  # not over the 4 C features
        assert fused_mod.gather_norm_linear(x.double(), index, 4, norm, layer) is None
        assert fused_mod.gather_norm_linear(x, index[:38], 4, norm, layer) is None  # not whole groups
    assert fused_mod.gather_norm_linear(x, index, 4, norm, layer) is None  # autograd: the weights require grad
