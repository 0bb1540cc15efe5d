"""The one linear layer, y = x W^T + b (``nn.Linear``'s layout), with a native path for decoding.

Token-by-token decoding is a chain of products of one row with a weight matrix, bound by how fast the
weights stream from memory. On some CPUs BLAS runs that case on one core; ``csrc/linear_rows.c`` splits the
rows of W over PyTorch's threads and streams them at the machine's full read bandwidth (GPT-2 124M:
the 48 per-layer products take 14 instead of 22 ms per token on 2 cores). It is taken only for
inference on CPU fp32 inputs of at most ``NATIVE_MAX_ROWS`` rows, with contiguous tensors, outside
autograd, ``torch.func`` transforms, autocast, ``torch.compile`` and tracing; everything else is
``F.linear``. The results agree with ``F.linear`` to float rounding (the sums run in another order)
and are deterministic run to run and for any number of threads. Whether the kernel pays is measured once per
process against BLAS (``_faster_than_blas``); ``VISIONFORMERS_LINEAR_ROWS=1`` / ``0`` uses it always / never.

Products of many rows (prefill, encoders, vision blocks) are BLAS-bound. PyTorch's x86 wheels send ``F.linear``
to MKL; oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor emits for CPU linears) is
the other library in the same wheel, and which is faster depends on the CPU: 10-20% faster than MKL at
BERT-base / ViT-B sizes on a Zen 4 EPYC, slower on an AVX-512 Xeon. ``linear`` measures the two once per process
(``_onednn_faster``) and sends inference products with more than ``NATIVE_MAX_ROWS`` rows and at least
``ONEDNN_MIN_K`` inputs to oneDNN where it is clearly faster; ``VISIONFORMERS_LINEAR_ONEDNN=1`` / ``0`` uses oneDNN always / never.
Both compute in fp32 (oneDNN in its strict fp32 mode unless ``torch.backends.mkldnn`` says otherwise) and
agree to float rounding.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from visionformers.native import build as _native
from visionformers.nn.gemm import gemm, native_gemm_available

__all__ = ["Linear", "linear", "native_linear_available", "native_kernel_off", "native_inference_ready", "native_ready",
           "onednn_linear_chosen", "gemm_chosen", "gemm_taken", "NATIVE_MAX_ROWS", "ONEDNN_MIN_K", "GEMM_MAX_K"]

# Rows up to which the kernel is used. On GPT-2's matrices here (2 cores, AVX2) it is 1.6-3x faster than MKL from 1
# to 16 rows and even with it at 64-96; with many rows a BLAS matrix product, blocked for the caches, wins.
NATIVE_MAX_ROWS = 16
# Inputs up to which the native GEMM (nn.gemm) may take a product. It saves the weights' re-packing and the epilogue's
# passes, which matter most where K is small (Swin-T's K = 96-384: 1.1-1.2x MKL with the fused GELU / residual +
# LayerNorm). With the tile prefetches it is also ahead at 768 (Zen 3, 2 cores, paired calls: 1.02-1.09x at Swin-T's
# last stage, 392 x 768 -> 2304, -> 768 with residual + norm, and its MLP; 1.02-1.06x at ViT-B's 1576 rows; 1.06x at
# the patch merging of 768 inputs), and whole models gained a little (a limit of 1536 over one of 512: Swin-T 1.021x,
# quartiles 0.987-1.044, 40 paired rounds; ViT-B 1.019x, 0.972-1.045, 20; BERT-base 1.01x -> 1.07-1.09x transformers
# at 768). Not above: each block of rows streams all of W through the cache, and at ViT-L's and ViT-H's 1024 and 1280
# inputs (W of 12-20 MB) that made the qkv product and the MLP 0.95-0.99x MKL's, which streams W once.
GEMM_MAX_K = 768
# Inputs from which oneDNN may take a product: with 96-192 inputs (Swin-T's first stages) it was no faster than MKL
# even where it wins at 768 (Zen 4, 2 cores: 170-178 vs 188-197 GFLOP/s at 96, even at 192, +2-4% at 384).
ONEDNN_MIN_K = 384
_F32 = torch.float32
_STRIDED = torch.strided
_PLAIN = (torch.Tensor, nn.Parameter)
# torch.func's wrapper tensors (vmap's batched tensors, grad's tracking tensors) look like plain tensors
_is_transformed = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)


def _configure(lib) -> None:
    lib.vf_linear_rows.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.vf_linear_rows.restype = None


def _run(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows, k = weight.shape
    y = torch.empty(x.shape[:-1] + (rows,), dtype=_F32)  # not the default dtype, which a user may change
    fn(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
       x.numel() // k, rows, k, torch.get_num_threads())
    return y


def _self_check(lib) -> bool:
    """The built kernel against F.linear on a serial and a threaded shape, each with a ragged last block."""
    g = torch.Generator().manual_seed(0)
    for m, r, k in ((3, 37, 53), (1, 301, 300)):
        x, w, b = torch.randn(m, k, generator=g), torch.randn(r, k, generator=g), torch.randn(r, generator=g)
        for bias in (b, None):
            if not torch.allclose(_run(lib.vf_linear_rows, x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-4):
                return False
    return True


def _faster_than_blas(lib) -> bool:
    """Whether the kernel streams one row's product faster than BLAS on this machine (measured once, ~0.1 s).

    Machines differ: where MKL runs one-row products on a single core (2-core AVX2 here) the kernel is 1.4-1.8x
    faster; where MKL already reads at full bandwidth on all cores (AVX-512 here) it is ~0.9x. The working set
    (8 x 16 MB) is larger than the caches, as a model's weights are, and BLAS gets the (in, out) layout that
    ``use_decoding_layout`` gives it. The kernel is kept if it is clearly (5%) faster.
    """
    choice = os.environ.get("VISIONFORMERS_LINEAR_ROWS", "auto")
    if choice in ("0", "1"):
        return choice == "1"
    with torch.inference_mode():
        return _time_against_blas(lib)


def _speedup(blas, candidate, rounds: int, warmup: int = 1) -> float:
    """How many times faster ``candidate()`` runs than ``blas()``: the median ratio over paired rounds, one call
    of each per round, the first ``warmup`` rounds not counted (as ``bench/common.py`` pairs its rounds)."""
    ratios = []
    for round_ in range(rounds):
        times = []
        for fn in (blas, candidate):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        if round_ >= warmup:
            ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def _time_against_blas(lib) -> bool:
    mats = [torch.full((1024, 4096), 0.5) for _ in range(8)]  # kernel: (out, in) rows; BLAS: the (in, out) view
    x_in, x_out = torch.ones(1, 4096), torch.ones(1, 1024)
    fn = lib.vf_linear_rows
    ratio = _speedup(lambda: [F.linear(x_out, w.t()) for w in mats], lambda: [_run(fn, x_in, w, None) for w in mats], 6)
    _native._log.info("native linear kernel: %.2fx BLAS for 8 x 16 MB", ratio)
    return ratio >= 1.05


_KERNEL = _native.Kernel("linear_rows", _configure, lambda lib: _self_check(lib) and _faster_than_blas(lib))


def native_linear_available() -> bool:
    """Whether ``linear`` has its native decoding path here (builds it on the first call)."""
    return _KERNEL.get() is not None


def native_kernel_off() -> contextlib.AbstractContextManager[None]:
    """Inside, ``linear`` is plain ``F.linear`` (for comparisons and debugging; process-wide, not per thread)."""
    return _KERNEL.disabled()


def native_inference_ready(*tensors: torch.Tensor) -> bool:
    """Whether a native kernel may read these tensors' memory: plain CPU fp32 contiguous tensors, outside
    autograd, ``torch.func`` transforms, autocast, ``torch.compile`` and tracing."""
    return native_ready(*tensors)


def native_ready(*tensors: torch.Tensor, inference: bool = True, memory_format=torch.contiguous_format) -> bool:
    """``native_inference_ready``; with ``inference=False`` the tensors may require grad (for a kernel wrapped in
    an autograd Function), and 4-D tensors must be contiguous in ``memory_format`` (e.g. channels_last); with
    ``memory_format=None`` any strides are accepted (a kernel that reads through strides checks them itself)."""
    # (compile first: dynamo must not reach the functorch query below, which it cannot trace)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.is_autocast_enabled("cpu"):
        return False
    grad = inference and torch.is_grad_enabled()
    for t in tensors:
        if t.dtype != _F32 or not t.is_cpu or t.layout != _STRIDED:
            return False
        if memory_format is not None and not (
            t.is_contiguous(memory_format=memory_format) if t.ndim == 4 else t.is_contiguous()
        ):
            return False
        if type(t) not in _PLAIN or (grad and t.requires_grad) or _is_transformed(t):
            return False  # subclasses keep their own dispatch; torch.func's wrappers have no plain memory
    return True


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_agrees() -> bool:
    """oneDNN's product is in this build and agrees with F.linear (bias and none, a ragged shape, 3-D input)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    g = torch.Generator().manual_seed(0)
    k = ONEDNN_MIN_K + 5
    x, w, b = torch.randn(3, 41, k, generator=g), torch.randn(37, k, generator=g), torch.randn(37, generator=g)
    try:
        return all(
            torch.allclose(_onednn_product(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-4) for bias in (b, None)
        )
    except RuntimeError:  # a build whose oneDNN cannot run this CPU's kernels
        return False


def _onednn_faster() -> bool:
    """Whether oneDNN runs a transformer MLP's two products (256 rows, 768 <-> 3072) clearly (8%) faster than
    BLAS here: median ratio of ten paired rounds after two warm-up rounds, ~0.2 s once per process.

    The margin and the second warm-up round keep a noisy first measurement from choosing the slower library for the
    whole process: on a Zen 3 EPYC where oneDNN is 0.89-0.99x (18 measurements), a ViT-B process once chose it with
    one warm-up round and a 5% margin, and ran 7% slower. Where oneDNN wins (Zen 4: 1.1-1.2x) it is still chosen."""
    choice = os.environ.get("VISIONFORMERS_LINEAR_ONEDNN", "auto")
    if choice == "0":
        return False
    with torch.inference_mode():
        if not _onednn_agrees():
            return False
        if choice == "1":
            return True
        g = torch.Generator().manual_seed(0)
        x1, w1, b1 = torch.randn(256, 768, generator=g), torch.randn(3072, 768, generator=g), torch.randn(3072, generator=g)
        x2, w2, b2 = torch.randn(256, 3072, generator=g), torch.randn(768, 3072, generator=g), torch.randn(768, generator=g)
        ratio = _speedup(lambda: (F.linear(x1, w1, b1), F.linear(x2, w2, b2)),
                         lambda: (_onednn_product(x1, w1, b1), _onednn_product(x2, w2, b2)), 12, warmup=2)
    _native._log.info("oneDNN linear: %.2fx BLAS on 256 x 768 <-> 3072", ratio)
    return ratio >= 1.08


_onednn: bool | None = None  # decided on first use


def onednn_linear_chosen() -> bool:
    """Whether ``linear`` sends inference products of many rows to oneDNN here (measured on the first call)."""
    global _onednn
    if _onednn is None:
        _onednn = _onednn_faster()
    return _onednn


def _path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """"rows" (the native kernel may take it), "many" (native GEMM or oneDNN may) or "blas". Runs on every call
    of every Linear: cheap shape checks first (~2 us; F.linear is ~5 us)."""
    if x.dtype != _F32 or weight.ndim != 2 or not x.ndim:
        return "blas"
    k = weight.shape[1]
    if not k or x.shape[-1] != k or not x.numel():
        return "blas"
    path = "rows" if x.numel() <= NATIVE_MAX_ROWS * k else "many"
    if bias is None:
        ready = native_inference_ready(x, weight)
    else:
        ready = bias.ndim == 1 and bias.shape[0] == weight.shape[0] and native_inference_ready(x, weight, bias)
    return path if ready else "blas"


def gemm_taken(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether ``nn.gemm`` takes the product x W^T (and its epilogue's tensors ``others``): inference on CPU fp32
    contiguous tensors of more than ``NATIVE_MAX_ROWS`` rows and at most ``GEMM_MAX_K`` inputs, where it measured
    faster (``gemm_chosen``)."""
    if x.dtype != _F32 or weight.ndim != 2 or not x.ndim or x.shape[-1] != weight.shape[1]:
        return False
    if not 0 < weight.shape[1] <= GEMM_MAX_K:
        return False
    if x.numel() <= NATIVE_MAX_ROWS * weight.shape[1]:
        return False
    return native_inference_ready(x, weight, *(t for t in others if t is not None)) and gemm_chosen()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CPU in inference, a few rows go through the native kernel, and many rows
    through the native GEMM (``nn.gemm``) or oneDNN where it measures faster than BLAS."""
    path = _path(x, weight, bias)
    if path == "rows":
        lib = _KERNEL.get()
        if lib is not None:
            return _run(lib.vf_linear_rows, x, weight, bias)
    elif path == "many":
        if weight.shape[1] <= GEMM_MAX_K and gemm_chosen():
            out = gemm(x, weight, bias)
            if out is not None:
                return out[0]
        return _library_product(x, weight, bias)
    return F.linear(x, weight, bias)


def _library_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What ``linear`` runs for many rows without the native GEMM: oneDNN where chosen (and the user's
    ``torch.backends.mkldnn`` switch is on), else BLAS."""
    if weight.shape[1] >= ONEDNN_MIN_K and onednn_linear_chosen() and torch.backends.mkldnn.enabled:
        return _onednn_product(x, weight, bias)
    return F.linear(x, weight, bias)


def _gemm_faster() -> bool:
    """Whether the native GEMM with its epilogue runs a transformer MLP (512 rows, 384 -> 1536 with GELU -> 384)
    clearly (3%) faster than the library path with PyTorch's epilogue: median of seven paired rounds, ~0.1 s
    once per process. The micro-kernel is the same loop on every x86 CPU; BLAS differs from CPU to CPU."""
    choice = os.environ.get("VISIONFORMERS_LINEAR_GEMM", "auto")
    if choice in ("0", "1") or not native_gemm_available():
        return choice == "1" and native_gemm_available()
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: inference tensors' packing is not cached
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 384, generator=g)
        w1, b1 = torch.randn(1536, 384, generator=g) * 0.05, torch.randn(1536, generator=g)
        w2, b2 = torch.randn(384, 1536, generator=g) * 0.05, torch.randn(384, generator=g)
        if gemm(x, w1) is None:  # over the packing budget already
            return False

        def library():
            h = F.gelu(_library_product(x, w1).add_(b1))
            return _library_product(h, w2).add_(b2).add_(x)

        def native():
            h = gemm(x, w1, b1, act="gelu")[0]
            return gemm(h, w2, b2, residual=x)[0]

        ratio = _speedup(library, native, 8)  # (the packed timing weights go with w1 and w2)
    _native._log.info("native GEMM: %.2fx the library path on a 512-row MLP", ratio)
    return ratio >= 1.03


_gemm: bool | None = None  # decided on first use


def gemm_chosen() -> bool:
    """Whether inference products of many rows go to the native GEMM here (measured on the first call)."""
    global _gemm
    if _gemm is None:
        _gemm = _gemm_faster()
    return _gemm


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and state dict) whose forward is ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
