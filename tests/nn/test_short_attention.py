"""nn.short_attention: the native attention for short sequences against float64 math, and when attend takes it."""
import copy
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

import visionformers.nn.attention as attention_mod
import visionformers.nn.short_attention as sa_mod
from visionformers.native import build as _native
from visionformers.nn import Attention, TransformerBlock
from visionformers.nn.attention import attend
from visionformers.nn.linear import gemm_taken
from visionformers.nn.short_attention import (
    MAX_TOKENS,
    QKV_MAX_TOKENS,
    native_short_attention_available,
    qkv_attention,
    short_attention,
    window_block,
)

CAN_BUILD = sys.platform.startswith("linux") and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not native_short_attention_available(), reason="needs the native kernel")


def qkv_views(b, h, n, d, seed=0):
    """q, k, v as the strided (B, H, N, D) views of one fused (B, N, 3, H, D) projection, as Attention makes them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3, h, d, generator=g).permute(2, 0, 3, 1, 4).unbind(0)


def reference64(q, k, v, bias, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.double()
    weights = scores.softmax(-1).nan_to_num(0.0)  # fully masked rows: zeros, as ATen's CPU SDPA
    return weights @ v.double()


def test_kernel_is_built_where_a_compiler_exists():
    assert native_short_attention_available() == (CAN_BUILD and _native.enabled())


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 49, QKV_MAX_TOKENS, QKV_MAX_TOKENS + 1, 100, 197, MAX_TOKENS])
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("bias_shape", [None, "1H", "BH", "B1", "2d"])
def test_matches_float64(n, d, bias_shape):
    b, h = 3, 4
    q, k, v = qkv_views(b, h, n, d)
    g = torch.Generator().manual_seed(1)
    shapes = {"1H": (1, h, n, n), "BH": (b, h, n, n), "B1": (b, 1, n, n), "2d": (n, n)}
    bias = None if bias_shape is None else 2 * torch.randn(shapes[bias_shape], generator=g)
    with torch.inference_mode():
        out = short_attention(q, k, v, bias, None)
    assert out is not None and out.shape == (b, h, n, d)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) memory: the caller's merge of the heads is a view
    torch.testing.assert_close(out.double(), reference64(q, k, v, bias), rtol=1e-5, atol=2e-6)


@needs_kernel
@pytest.mark.parametrize("n, d", [(49, 32), (197, 24)])  # the register path; the products' path, a partial panel
def test_masks_scale_and_fully_masked_rows(n, d):
    b, h = 2, 3
    q, k, v = qkv_views(b, h, n, d, seed=2)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(b, h, n, n, generator=g).masked_fill(torch.rand(b, 1, n, n, generator=g) < 0.5, float("-inf"))
    bias[1, :, 5] = float("-inf")  # query 5 of the second sample sees no key
    with torch.inference_mode():
        out = short_attention(q, k, v, bias, 0.3)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out.double(), reference64(q, k, v, bias, 0.3), rtol=1e-5, atol=2e-6)
    assert torch.equal(out[1, :, 5], torch.zeros(h, d)) and torch.equal(sdpa[1, :, 5], out[1, :, 5])


@needs_kernel
@pytest.mark.parametrize("n", [49, 197])
def test_result_does_not_depend_on_thread_count(n):
    q, k, v = qkv_views(8, 3, n, 32)
    bias = torch.randn(1, 3, n, n)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            with torch.inference_mode():
                outs.append(short_attention(q, k, v, bias, None))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@needs_kernel
def test_declines_what_it_cannot_take():
    q, k, v = qkv_views(2, 2, 9, 32)
    with torch.inference_mode():
        long_q, long_k, long_v = qkv_views(1, 2, MAX_TOKENS + 1, 32)
        assert short_attention(long_q, long_k, long_v, None, None) is None  # too many tokens
        odd = qkv_views(1, 2, 9, 12)  # a head dim that is not a multiple of any vector width
        assert short_attention(*odd, None, None) is None
        assert short_attention(q, k, v, torch.ones(2, 2, 9, 9, dtype=torch.bool), None) is None  # bool masks: SDPA
        assert short_attention(q, k, v, torch.randn(2, 1, 1, 9), None) is None  # a bias broadcast over queries
        assert short_attention(q.double(), k.double(), v.double(), None, None) is None
        assert short_attention(q, k[:, :, :5], v[:, :, :5], None, None) is None  # Nq != Nk
    qg = q.detach().clone().requires_grad_()
    assert short_attention(qg, k, v, None, None) is None  # autograd: SDPA


@needs_kernel
def test_attend_and_attention_take_it_in_inference_only(monkeypatch):
    calls = []
    original, fused = sa_mod._run, attention_mod.qkv_attention
    monkeypatch.setattr(sa_mod, "_run", lambda *a: (calls.append("attention"), original(*a))[1])
    def counted_fused(*args):
        out = fused(*args)
        if out is not None:
            calls.append("qkv + attention")
        return out

    monkeypatch.setattr(attention_mod, "qkv_attention", counted_fused)
    torch.manual_seed(0)
    layer = Attention(96, 3, qkv_bias=True).eval()
    x, bias = torch.randn(4, 49, 96), torch.randn(1, 3, 49, 49)
    with torch.inference_mode():
        fast = layer(x, bias=bias)
    # one native call: the fused projection + attention where the GEMM takes the product, else the attention alone
    assert calls in (["qkv + attention"], ["attention"])
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(attention_mod, "SHORT_MAX_TOKENS", 0)  # SDPA for the comparison
        ref = layer(x, bias=bias)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    calls.clear()
    layer(x.requires_grad_(), bias=bias).sum().backward()  # training: SDPA, gradients as usual
    q, k, v = qkv_views(1, 2, 9, 32)
    attend(q, k, v, bias=torch.randn(1, 2, 9, 9), dropout_p=0.1)  # dropout: SDPA
    assert calls == []


def _fused_reference(x, layer, bias):
    """qkv(x) split into heads, float64 attention, heads back to (B, N, H*D)."""
    b, n, _ = x.shape
    h = layer.num_heads
    q, k, v = layer.qkv(x).view(b, n, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return reference64(q, k, v, bias).transpose(1, 2).reshape(b, n, -1).float()


@needs_kernel
@pytest.mark.parametrize("windows, n, heads, head_dim", [(37, 49, 3, 32), (5, 13, 2, 16), (3, 64, 1, 64)])
def test_qkv_attention_matches_projection_then_attention(windows, n, heads, head_dim):
    """Many windows (several groups per thread and a ragged last group), Swin's window, a ragged length, 64 keys."""
    torch.manual_seed(0)
    layer = Attention(heads * head_dim, heads, qkv_bias=True).eval()
    x = torch.randn(windows, n, heads * head_dim)
    per_window = torch.randn(windows, heads, n, n).masked_fill(torch.rand(windows, 1, n, n) < 0.3, float("-inf"))
    per_window[..., torch.arange(n), torch.arange(n)] = 0.0
    with torch.no_grad():
        if not gemm_taken(x, layer.qkv.weight, layer.qkv.bias):
            pytest.skip("the native GEMM does not take this product here")
        for bias in (per_window, torch.randn(1, heads, n, n), torch.randn(heads, n, n), None):
            got = qkv_attention(x, layer.qkv, heads, bias, None)
            assert got is not None and got.shape == (windows, n, heads * head_dim)
            torch.testing.assert_close(got, _fused_reference(x, layer, bias), rtol=1e-4, atol=1e-5)


@needs_kernel
def test_qkv_attention_is_the_unfused_native_result_bit_for_bit():
    """The same GEMM and attention kernels, only without the round trip through memory: identical floats."""
    torch.manual_seed(0)
    layer = Attention(96, 3, qkv_bias=True).eval()
    x, bias = torch.randn(64, 49, 96), torch.randn(64, 3, 49, 49)
    with torch.no_grad():
        if not gemm_taken(x, layer.qkv.weight, layer.qkv.bias):
            pytest.skip("the native GEMM does not take this product here")
        fused = layer(x, bias=bias, project=False)
        q, k, v = layer.qkv(x).view(64, 49, 3, 3, 32).permute(2, 0, 3, 1, 4).unbind(0)
        separate = short_attention(q, k, v, bias, None).transpose(1, 2).reshape(64, 49, 96)
    assert torch.equal(fused, separate)


@needs_kernel
def test_qkv_attention_declines_what_it_cannot_take():
    torch.manual_seed(0)
    layer = Attention(64, 2, qkv_bias=True).eval()
    x = torch.randn(4, 9, 64)
    with torch.no_grad():
        assert qkv_attention(torch.randn(2, QKV_MAX_TOKENS + 1, 64), layer.qkv, 2, None, None) is None  # too long
        assert qkv_attention(x, layer.qkv, 2, torch.ones(4, 2, 9, 9, dtype=torch.bool), None) is None  # bool mask
        assert qkv_attention(x, layer.qkv, 2, torch.randn(4, 2, 1, 9), None) is None  # broadcast over queries
        assert qkv_attention(x.double(), layer.qkv, 2, None, None) is None
        assert qkv_attention(x, layer.qkv, 5, None, None) is None  # the width is not 3 x 5 heads
    assert qkv_attention(x, layer.qkv, 2, None, None) is None  # autograd: the weight requires grad


def _block_reference64(block, x, n, bias, gather):
    """The pre-norm block per window in float64: x reordered by gather, split into windows of n tokens."""
    b, length, c = x.shape
    blk = copy.deepcopy(block).double()
    xw = (x if gather is None else x[:, gather]).double().reshape(-1, n, c)
    with torch.no_grad():
        s = xw + blk.attn(blk.norm1(xw), bias=None if bias is None else bias.double())
        return (s + blk.mlp(blk.norm2(s))).reshape(b, length, c).float()


@needs_kernel
@pytest.mark.parametrize("images, windows, n, dim, heads, kw", [
    (3, 4, 49, 96, 3, dict()),  # Swin-T's stage 1 at a small batch: ragged groups of windows
    (2, 3, 13, 32, 2, dict(proj_bias=False, norm_bias=False, mlp_act="gelu_tanh")),  # a ragged window, no biases
    (1, 2, 64, 64, 1, dict(mlp_ratio=2.5, mlp_act="silu")),  # the longest window, one head of 64
])
def test_window_block_matches_the_block_per_window_in_float64(images, windows, n, dim, heads, kw):
    torch.manual_seed(0)
    block = TransformerBlock(dim, heads, qkv_bias=True, norm_eps=1e-5, **kw).eval()
    for p in block.parameters():  # norms and biases away from their initial 1 / 0, so that every term counts
        p.data.add_(0.1 * torch.randn_like(p))
    x, gather = torch.randn(images, windows * n, dim), torch.randperm(windows * n)
    w = images * windows
    shifted = torch.randn(w, heads, n, n).masked_fill(torch.rand(w, 1, n, n) < 0.3, float("-inf"))
    shifted[..., torch.arange(n), torch.arange(n)] = 0.0
    with torch.no_grad():
        if not gemm_taken(x, block.attn.qkv.weight):
            pytest.skip("the native GEMM does not take this product here")
        per_image = shifted[:windows]  # one per window of an image, read by every image (not tiled)
        for bias, order, tiled in ((shifted, gather, shifted), (torch.randn(heads, n, n), None, None), (None, gather, None),
                                   (per_image, gather, per_image.repeat(images, 1, 1, 1))):
            got = window_block(x, n, order, block.norm1, block.attn, block.norm2, block.mlp, bias)
            assert got is not None and got.shape == x.shape
            expected = _block_reference64(block, x, n, bias if tiled is None else tiled, order)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_window_block_result_does_not_depend_on_thread_count():
    torch.manual_seed(0)
    block = TransformerBlock(64, 2, qkv_bias=True).eval()
    x, gather = torch.randn(4, 8 * 49, 64), torch.randperm(8 * 49)
    args = (x, 49, gather, block.norm1, block.attn, block.norm2, block.mlp, torch.randn(2, 49, 49))
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = window_block(*args)
            torch.set_num_threads(2)
            two = window_block(*args)
    finally:
        torch.set_num_threads(threads)
    if one is None:
        pytest.skip("the native GEMM does not take this product here")
    assert torch.equal(one, two)


@needs_kernel
def test_window_block_declines_what_it_cannot_take():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 32)
    plain = TransformerBlock(32, 2, qkv_bias=True).eval()

    def offer(block, x=x, n=16, gather=None, bias=None):
        return window_block(x, n, gather, block.norm1, block.attn, block.norm2, block.mlp, bias)

    with torch.no_grad():
        if offer(plain) is None:
            pytest.skip("the native GEMM does not take this product here")
        assert offer(TransformerBlock(32, 2, mlp_act="swiglu").eval()) is None  # gated MLP
        assert offer(TransformerBlock(32, 2, norm="rmsnorm").eval()) is None
        assert offer(TransformerBlock(32, 2, qk_norm=True).eval()) is None
        assert offer(TransformerBlock(32, 2, num_kv_heads=1).eval()) is None  # GQA
        assert offer(TransformerBlock(32, 2, attn_type="differential").eval()) is None
        assert offer(plain, x=torch.randn(1, 2 * (QKV_MAX_TOKENS + 1), 32), n=QKV_MAX_TOKENS + 1) is None  # too long
        assert offer(plain, n=5) is None  # not a divisor of the stream
        assert offer(plain, x=x.double()) is None
        assert offer(plain, bias=torch.ones(4, 2, 16, 16, dtype=torch.bool)) is None
        assert offer(plain, gather=torch.arange(32) + 1) is None  # out of range
    assert offer(plain) is None  # autograd: the weights require grad
