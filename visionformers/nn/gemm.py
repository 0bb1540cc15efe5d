"""Native products of many rows with packed weights and fused epilogues, for CPU fp32 inference.

``csrc/gemm.c`` computes ``act(x W^T + b) + residual`` and optionally ``LayerNorm`` of it in one call: each
tile of the output gets its epilogue while it is still in registers, and a block of rows gets its norm while it
is still in cache. W is packed once into the micro-kernel's panel layout and kept (see ``packed``), where BLAS
re-packs it on every call. On a Zen 3 EPYC (2 cores, AVX2) the micro-kernel runs at MKL's rate (90-95 GFLOP/s
per core); a product with its epilogue is 1.04-1.22x MKL's plus our epilogue pass at Swin-T's sizes (96-384 inputs),
1.02-1.09x at 768 inputs (Swin-T's last stage, ViT-B, BERT-base), 0.95-0.99x at ViT-L's 1024 (``GEMM_MAX_K``), and
Swin-T inference 1.02-1.04x of itself without it (``bench/RESULTS.md``).

``mlp`` runs a whole MLP (fc1, activation, fc2, residual, norm) block of rows by block of rows, the hidden
activations in a per-thread buffer that stays in cache.

The dispatch is ``nn.linear``'s: ``linear``, ``Mlp``, ``linear_add_norm`` and ``mlp_add_norm`` call these when
``gemm_taken(x, weight)`` says so (inference, CPU fp32 contiguous tensors, more than ``NATIVE_MAX_ROWS`` rows, at
most ``GEMM_MAX_K`` inputs, and the kernel measured faster than the library path once per process). Results agree with ``F.linear`` and
the PyTorch epilogues to float rounding; every row is summed in the same order on any number of threads.

Memory: packed weights are as large as the weights (+ padding to whole panels). They are kept for inference
until the weight changes (its storage or version) or is freed, up to ``PACK_BUDGET_BYTES`` in all; weights
beyond it go to the library path.
"""
from __future__ import annotations

import ctypes
import threading
import weakref

import torch
import torch.nn.functional as F

from visionformers import _env
from visionformers.native import build as _native

__all__ = ["gemm", "mlp", "gather_norm_gemm", "packed", "native_gemm_available", "clear_packed", "PACK_BUDGET_BYTES",
           "ACT_CODES"]

ACT_CODES = {"gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}  # vmath.h's ACT_* codes
PACK_BUDGET_BYTES: int | None = None  # None: VISIONFORMERS_PACK_BUDGET_MB, read where a weight is packed
_P, _L = ctypes.c_void_p, ctypes.c_long


def _configure(lib) -> None:
    lib.vf_gemm_packed_floats.argtypes, lib.vf_gemm_packed_floats.restype = [_L, _L], _L
    lib.vf_gemm_pack.argtypes, lib.vf_gemm_pack.restype = [_P, _L, _L, _P, ctypes.c_int], None
    lib.vf_gemm.argtypes = [_P, _P, _P, _L, _L, _L, _P, ctypes.c_int, _P, _P, _P, _P, ctypes.c_float, ctypes.c_int]
    lib.vf_gemm.restype = None
    lib.vf_mlp.argtypes = ([_P, _P, _P, ctypes.c_int, _P, _P, _P, _L, _L, _L, _L, _P, _P, _P, _P, ctypes.c_float,
                            ctypes.c_int])
    lib.vf_mlp.restype = ctypes.c_int
    lib.vf_gather_norm_gemm.argtypes = ([_P, _L, _L, _L, _P, _L, _L, ctypes.c_int, _P, _P, ctypes.c_float, _P, _L, _P, _P,
                                         ctypes.c_int])
    lib.vf_gather_norm_gemm.restype = ctypes.c_int


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _pack(lib, weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(lib.vf_gemm_packed_floats(n, k), dtype=torch.float32)
    lib.vf_gemm_pack(weight.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def _call(lib, x, panels, n, bias, act, residual, norm, keep_sum):
    k = x.shape[-1]
    rows = x.numel() // k
    s, h, g, beta, eps = _outputs(x.shape[:-1] + (n,), norm, keep_sum)
    lib.vf_gemm(x.data_ptr(), panels.data_ptr(), _ptr(s), rows, n, k, _ptr(bias), act, _ptr(residual), _ptr(h),
                _ptr(g), _ptr(beta), eps, torch.get_num_threads())
    return s, h


def _outputs(shape, norm, keep_sum):
    s = torch.empty(shape, dtype=torch.float32) if keep_sum or norm is None else None
    h = None if norm is None else torch.empty(shape, dtype=torch.float32)
    g, beta, eps = norm if norm is not None else (None, None, 0.0)
    return s, h, g, beta, eps


def _call_mlp(lib, x, p1, b1, act, p2, b2, n, hidden, residual, norm, keep_sum):
    k = x.shape[-1]
    s, h, g, beta, eps = _outputs(x.shape[:-1] + (n,), norm, keep_sum)
    failed = lib.vf_mlp(x.data_ptr(), p1.data_ptr(), _ptr(b1), act, p2.data_ptr(), _ptr(b2), _ptr(s), x.numel() // k, k,
                        hidden, n, _ptr(residual), _ptr(h), _ptr(g), _ptr(beta), eps, torch.get_num_threads())
    return None if failed else (s, h)


def _self_check(lib) -> bool:
    """Every epilogue against float64 PyTorch on ragged shapes (a partial panel, a partial row block, K over
    two blocks), threaded."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m, k, n in ((37, 41, 19), (101, 700, 67)):
            x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            r, nw, nb = torch.randn(m, n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
            panels = _pack(lib, w)
            ref = F.linear(x.double(), w.double(), b.double())
            tol = dict(rtol=1e-5, atol=1e-4 * k**0.5)
            s, _ = _call(lib, x, panels, n, b, ACT_CODES["gelu"], None, None, True)
            ok = torch.allclose(s.double(), F.gelu(ref), **tol)
            s, h = _call(lib, x, panels, n, b, 0, r, (nw, nb, 1e-5), True)
            ok &= torch.allclose(s.double(), r.double() + ref, **tol)
            ok &= torch.allclose(h.double(), F.layer_norm(r.double() + ref, (n,), nw.double(), nb.double(), 1e-5),
                                 rtol=1e-4, atol=1e-4)
            ok &= torch.equal(_call(lib, x, panels, n, b, 0, r, (nw, nb, 1e-5), False)[1], h)
            w2, b2 = torch.randn(n, 3 * n, generator=g) / n, torch.randn(n, generator=g)  # x -> 3n -> n, fused
            w1, b1 = torch.randn(3 * n, k, generator=g), torch.randn(3 * n, generator=g)
            ref = r.double() + F.linear(F.gelu(F.linear(x.double(), w1.double(), b1.double())), w2.double(), b2.double())
            out = _call_mlp(lib, x, _pack(lib, w1), b1, ACT_CODES["gelu"], _pack(lib, w2), b2, n, 3 * n, r, None, True)
            ok &= out is not None and torch.allclose(out[0].double(), ref, **tol)
            if not ok:
                return False
        x, index = torch.randn(2, 30, 12, generator=g), torch.randint(0, 31, (4 * 25,), generator=g)  # 30: a zero row
        w, b, nw, nb = (torch.randn(19, 48, generator=g), torch.randn(19, generator=g), torch.randn(48, generator=g),
                        torch.randn(48, generator=g))
        lo, panels = index.numel() // 4, _pack(lib, w)  # (panels held: a temporary would be freed before the call)
        out = torch.empty(2, lo, 19)
        lib.vf_gather_norm_gemm(x.data_ptr(), 2, 30, 12, index.data_ptr(), lo, 4, 1, nw.data_ptr(), nb.data_ptr(), 1e-5,
                                panels.data_ptr(), 19, b.data_ptr(), out.data_ptr(), torch.get_num_threads())
        a = torch.cat((x, x.new_zeros(2, 1, 12)), dim=1)[:, index].reshape(2, lo, 48).double()
        ref = F.linear(F.layer_norm(a, (48,), nw.double(), nb.double(), 1e-5), w.double(), b.double())
        return torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-4)


_KERNEL = _native.Kernel("gemm", _configure, _self_check)


def native_gemm_available() -> bool:
    """Whether the kernel is built and passed its self-check here (builds it on the first call)."""
    return _KERNEL.get() is not None


# weight id -> (weak reference, storage pointer, version, packed panels); dropped when the weight is freed
_packed: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}
_packed_bytes = 0
_lock = threading.RLock()  # (a weight freed while the lock is held runs _forget in the same thread)


def clear_packed() -> None:
    """Forget every packed weight (frees their memory; they are packed again on next use)."""
    global _packed_bytes
    with _lock:
        _packed.clear()
        _packed_bytes = 0


def _forget(key: int) -> None:
    global _packed_bytes
    with _lock:
        entry = _packed.pop(key, None)
        if entry is not None:
            _packed_bytes -= entry[3].numel() * 4


def packed(weight: torch.Tensor) -> torch.Tensor | None:
    """The panels of ``weight`` (N, K), packed on first use and again whenever the weight changes in place or
    is given new storage; None where the kernel is missing or the budget (``PACK_BUDGET_BYTES``) is spent."""
    global _packed_bytes
    lib = _KERNEL.get()
    if lib is None:
        return None
    if weight.is_inference():  # no version counter to see in-place changes by: not cached
        return None
    key = id(weight)
    current = _current(key, weight)
    if current is not None:
        return current
    size = lib.vf_gemm_packed_floats(*weight.shape) * 4
    if _packed_bytes + size > (PACK_BUDGET_BYTES if PACK_BUDGET_BYTES is not None else _env.pack_budget_mb() * 2**20):
        return None
    with torch.inference_mode(False), torch.no_grad():  # plain memory, usable later in any mode
        panels = _pack(lib, weight.detach())
    with _lock:
        current = _current(key, weight)  # (another thread may have packed it meanwhile)
        if current is not None:
            return current
        _forget(key)  # a stale entry: the weight changed
        ref = weakref.ref(weight, lambda _r, key=key: _forget(key))
        _packed[key] = (ref, weight.data_ptr(), weight._version, panels)
        _packed_bytes += size
    return panels


def _current(key: int, weight: torch.Tensor) -> torch.Tensor | None:
    """The kept panels of ``weight`` if they are still its current values."""
    entry = _packed.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight.data_ptr() and entry[2] == weight._version:
        return entry[3]
    return None


def gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act: str | None = None,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
    keep_sum: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """s = act(x W^T + b) + residual and h = LayerNorm(s) with ``norm`` = (weight, bias, eps): (s, h), s None
    unless ``keep_sum`` (or without a norm), h None without a norm. None where the kernel cannot take it (the
    caller checked the tensors with ``nn.linear.gemm_taken``; here only the kernel and the packing budget)."""
    panels = packed(weight)
    if panels is None:
        return None
    return _call(_KERNEL.get(), x, panels, weight.shape[0], bias, ACT_CODES[act] if act else 0, residual, norm,
                 keep_sum)


def mlp(
    x: torch.Tensor,
    fc1: torch.nn.Linear,
    act: str,
    fc2: torch.nn.Linear,
    *,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
    keep_sum: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """A whole MLP, s = residual + fc2(act(fc1(x))) and h = LayerNorm(s), block of rows by block of rows (the hidden
    activations stay in a per-thread buffer in cache); (s, h) as ``gemm``, or None where the kernel cannot take it."""
    p1, p2 = packed(fc1.weight), packed(fc2.weight)
    if p1 is None or p2 is None:
        return None
    return _call_mlp(_KERNEL.get(), x, p1, fc1.bias, ACT_CODES[act], p2, fc2.bias, fc2.weight.shape[0],
                     fc1.weight.shape[0], residual, norm, keep_sum)


def gather_norm_gemm(
    x: torch.Tensor,
    index: torch.Tensor,
    group: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
) -> torch.Tensor | None:
    """LayerNorm(A) W^T + b, (B, Lo, N), for A (B, Lo, group C) whose row o of image b concatenates the rows
    x[b, index[o group + j]], j < group (index L = x.shape[1] reads a zero row): a patch merging's gather, norm and
    reduction in one call, the rows gathered and normed block by block in cache. ``norm`` = (weight, bias, eps) or
    None. None where the kernel or the packing budget is missing (the caller checked the tensors and the index)."""
    panels = packed(weight)
    if panels is None:
        return None
    b, length, c = x.shape
    lo, n = index.numel() // group, weight.shape[0]
    out = torch.empty(b, lo, n, dtype=torch.float32)
    g, beta, eps = norm if norm is not None else (None, None, 0.0)
    failed = _KERNEL.get().vf_gather_norm_gemm(
        x.data_ptr(), b, length, c, index.data_ptr(), lo, group, norm is not None, _ptr(g), _ptr(beta), eps,
        panels.data_ptr(), n, _ptr(bias), out.data_ptr(), torch.get_num_threads(),
    )
    return None if failed else out
