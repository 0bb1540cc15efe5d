"""nn.linear: the native decoding kernel and the oneDNN path against F.linear, when each is taken, and the cached
native build."""
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

import visionformers as vf
import visionformers.nn.linear as linear_mod
from visionformers.native import build as _native
from visionformers.nn import Linear
from visionformers.nn.linear import (
    NATIVE_MAX_ROWS, ONEDNN_MIN_K, linear, native_kernel_off, native_linear_available, onednn_linear_chosen,
)

CAN_BUILD = sys.platform.startswith("linux") and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the calls that took the native kernel."""
    calls = []
    run = linear_mod._run

    def counted(fn, x, w, b):
        calls.append(tuple(x.shape))
        return run(fn, x, w, b)

    monkeypatch.setattr(linear_mod, "_run", counted)
    return calls


def test_native_kernel_is_built_where_a_compiler_exists():
    # Linux with a C compiler (CI): the kernel must build and pass its self-check; elsewhere linear falls back
    assert native_linear_available() == (CAN_BUILD and _native.enabled())


@pytest.mark.parametrize("rows", [1, 2, 3, 5, NATIVE_MAX_ROWS])
@pytest.mark.parametrize("out_features,in_features", [(7, 3), (37, 53), (301, 300), (2304, 768)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_matches_f_linear(rows, out_features, in_features, with_bias, native_calls):
    x = torch.randn(rows, 1, in_features)
    w = torch.randn(out_features, in_features)
    b = torch.randn(out_features) if with_bias else None
    with torch.inference_mode():
        y = linear(x, w, b)
    ref = F.linear(x, w, b)
    assert y.shape == ref.shape == (rows, 1, out_features)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * in_features**0.5)
    assert len(native_calls) == (1 if native_linear_available() else 0)


@pytest.mark.skipif(not native_linear_available(), reason="needs the native kernel (Linux with a C compiler)")
def test_native_result_does_not_depend_on_thread_count():
    # every output element is one reduction in a fixed order, whichever thread computes it: bit-identical
    x, w, b = torch.randn(3, 768), torch.randn(3072, 768), torch.randn(3072)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = linear(x, w, b)
            torch.set_num_threads(2)
            two = linear(x, w, b)
            again = linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(two, again)


def test_edge_shapes_and_default_dtype(native_calls):
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)  # the output is float32 like the inputs, whatever the default
        f32 = dict(dtype=torch.float32)
        x, w, b = torch.randn(2, 5, **f32), torch.randn(7, 5, **f32), torch.randn(7, **f32)
        with torch.inference_mode():
            y = linear(x, w, b)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, F.linear(x, w, b))
    finally:
        torch.set_default_dtype(default)
    with torch.inference_mode():
        for x, w in ((torch.randn(0, 5), torch.randn(7, 5)), (torch.randn(2, 5), torch.randn(0, 5)),
                     (torch.randn(2, 0), torch.randn(7, 0))):  # no rows, no outputs, no inputs
            torch.testing.assert_close(linear(x, w), F.linear(x, w))


def test_not_taken_where_f_linear_must_run(native_calls):
    w, b = torch.randn(16, 8), torch.randn(16)
    x = torch.randn(2, 8)
    cases = {
        "many rows": (torch.randn(NATIVE_MAX_ROWS + 1, 8), w, b),
        "float64": (x.double(), w.double(), b.double()),
        "transposed weight": (x, torch.randn(8, 16).t(), b),
        "strided input": (torch.randn(2, 16)[:, ::2], w, b),
        "bias of another dtype": (x, w, b.double()),
    }
    with torch.inference_mode():
        for name, (xi, wi, bi) in cases.items():
            if name == "bias of another dtype":
                with pytest.raises(RuntimeError):  # F.linear's own error: the native path does not hide it
                    linear(xi, wi, bi)
                continue
            torch.testing.assert_close(linear(xi, wi, bi), F.linear(xi, wi, bi), msg=name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, w, b).dtype == torch.bfloat16  # autocast applies as it does to F.linear
    with torch.no_grad():  # (F.linear cannot take a sparse weight under inference_mode)
        torch.testing.assert_close(linear(x[None], w.to_sparse(), b), F.linear(x[None], w, b), msg="sparse weight")
    assert native_calls == []


def test_torch_func_transforms_use_f_linear(native_calls):
    w, b = torch.randn(16, 8), torch.randn(16)
    x = torch.randn(3, 1, 8)
    with torch.no_grad():
        batched = torch.vmap(lambda t: linear(t, w, b))(x)  # each call sees one row: the kernel's size
    torch.testing.assert_close(batched, F.linear(x, w, b))
    jacobian = torch.func.jacrev(lambda t: linear(t, w, b))(torch.randn(8))
    torch.testing.assert_close(jacobian, w)
    assert native_calls == []


def test_autograd_uses_f_linear_and_gets_gradients(native_calls):
    layer = Linear(8, 16)
    x = torch.randn(1, 8, requires_grad=True)
    layer(x).square().sum().backward()
    assert native_calls == []
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    with torch.no_grad():  # no autograd needed: the kernel may run
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert len(native_calls) == (1 if native_linear_available() else 0)


def test_linear_module_is_an_nn_linear_with_the_same_state():
    torch.manual_seed(0)
    ours = Linear(8, 16)
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 16)
    assert isinstance(ours, torch.nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], ref.state_dict()[k]) for k in ref.state_dict())


def test_generation_is_the_same_with_and_without_the_kernel():
    model = vf.create_model("gpt_tiny").eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    with_kernel = model.generate(prompt, 12)
    fallback = vf.create_model("gpt_tiny").eval()
    fallback.load_state_dict(model.state_dict())
    with native_kernel_off():  # as on a machine without a compiler
        assert torch.equal(fallback.generate(prompt, 12), with_kernel)


def test_native_kernel_off_is_scoped(native_calls):
    x, w = torch.randn(1, 8), torch.randn(16, 8)
    with torch.inference_mode():
        with native_kernel_off():
            assert not native_linear_available()
            linear(x, w)
        assert native_calls == []
        linear(x, w)
    assert len(native_calls) == (1 if native_linear_available() else 0)


@pytest.mark.skipif(not native_linear_available(), reason="needs the native kernel (Linux with a C compiler)")
@pytest.mark.parametrize("choice", ["0", "1", "auto"])
def test_kernel_is_used_where_it_pays(choice, monkeypatch):
    """VISIONFORMERS_LINEAR_ROWS: 1 always, 0 never, auto by timing the kernel against BLAS on this machine."""
    monkeypatch.setenv("VISIONFORMERS_LINEAR_ROWS", choice)
    lib = linear_mod._KERNEL.get()
    calls = []
    original = linear_mod._run
    monkeypatch.setattr(linear_mod, "_run", lambda fn, *a: (calls.append(1), original(fn, *a))[1])
    decision = linear_mod._faster_than_blas(lib)
    assert decision is {"0": False, "1": True}.get(choice, decision)
    if choice == "auto":
        assert isinstance(decision, bool) and len(calls) == 6 * 8  # six rounds over eight matrices were timed


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the products that went to oneDNN."""
    calls = []
    product = linear_mod._onednn_product

    def counted(x, w, b):
        calls.append(tuple(x.shape))
        return product(x, w, b)

    monkeypatch.setattr(linear_mod, "_onednn_product", counted)
    return calls


ONEDNN_HERE = linear_mod._onednn_agrees()


@pytest.mark.skipif(not ONEDNN_HERE, reason="needs PyTorch built with oneDNN")
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(NATIVE_MAX_ROWS + 1, ONEDNN_MIN_K), (2, 33, ONEDNN_MIN_K + 3), (300, 768)])
def test_onednn_matches_f_linear(shape, with_bias, onednn_calls, monkeypatch):
    monkeypatch.setattr(linear_mod, "_onednn", True)
    monkeypatch.setattr(linear_mod, "_gemm", False)  # (the native GEMM comes first where it is chosen)
    x, w = torch.randn(shape), torch.randn(45, shape[-1]) / shape[-1] ** 0.5
    b = torch.randn(45) if with_bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
    reference = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == shape[:-1] + (45,)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
    assert onednn_calls == [shape]


@pytest.mark.skipif(not ONEDNN_HERE, reason="needs PyTorch built with oneDNN")
def test_onednn_not_taken_where_f_linear_must_run(onednn_calls, monkeypatch):
    monkeypatch.setattr(linear_mod, "_onednn", True)
    monkeypatch.setattr(linear_mod, "_gemm", False)
    k = ONEDNN_MIN_K
    w, b = torch.randn(16, k), torch.randn(16)
    x = torch.randn(NATIVE_MAX_ROWS + 4, k)
    cases = {
        "few inputs": (torch.randn(64, k - 1), torch.randn(16, k - 1), b),
        "float64": (x.double(), w.double(), b.double()),
        "strided input": (torch.randn(x.shape[0], 2 * k)[:, ::2], w, b),
        "transposed weight": (x, torch.randn(k, 16).t(), b),
        "no rows": (x[:0], w, b),
    }
    with torch.inference_mode():
        for name, (xi, wi, bi) in cases.items():
            torch.testing.assert_close(linear(xi, wi, bi), F.linear(xi, wi, bi), msg=name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, w, b).dtype == torch.bfloat16
    assert onednn_calls == []
    layer = Linear(k, 16)
    xg = torch.randn(NATIVE_MAX_ROWS + 4, k, requires_grad=True)
    layer(xg).sum().backward()  # autograd: F.linear, gradients as usual
    assert onednn_calls == [] and layer.weight.grad is not None and xg.grad is not None
    with monkeypatch.context() as m, torch.inference_mode():
        m.setattr(torch.backends.mkldnn, "enabled", False)  # the user turned oneDNN off
        assert not torch._C._get_mkldnn_enabled()
        linear(x, w, b)
    assert torch.backends.mkldnn.enabled
    monkeypatch.setattr(linear_mod, "_onednn", False)  # not chosen on this machine
    with torch.inference_mode():
        linear(x, w, b)
    assert onednn_calls == []


@pytest.mark.parametrize("choice", ["0", "1", "auto"])
def test_onednn_chosen_by_environment_or_timing(choice, monkeypatch, onednn_calls):
    """VISIONFORMERS_LINEAR_ONEDNN: 1 always (where it agrees with F.linear), 0 never, auto by timing."""
    monkeypatch.setenv("VISIONFORMERS_LINEAR_ONEDNN", choice)
    monkeypatch.setattr(linear_mod, "_onednn", None)
    decision = onednn_linear_chosen()
    assert isinstance(decision, bool) and onednn_linear_chosen() is decision  # decided once
    if choice == "0":
        assert decision is False and onednn_calls == []
    elif choice == "1":
        assert decision is ONEDNN_HERE and len(onednn_calls) == (2 if ONEDNN_HERE else 0)  # the agreement check
    elif ONEDNN_HERE:
        assert len(onednn_calls) == 2 + 12 * 2  # the check, then twelve rounds of the two products were timed
