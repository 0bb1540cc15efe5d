"""native.ops: the linear_rows op against F.linear, its fake (shape) function, and its fallback without the kernel."""
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from visionformers.native import build as _native
from visionformers.native import ops
from visionformers.native.check import linear_rows_agrees

CAN_BUILD = sys.platform.startswith("linux") and (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not ops.kernel_available(), reason="needs the native kernel (Linux with a C compiler)")


def test_kernel_is_built_where_a_compiler_exists():
    assert ops.kernel_available() == bool(CAN_BUILD and _native.enabled())


@pytest.mark.parametrize("shape", [(1, 768), (3, 5, 64), (16, 33)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_op_matches_f_linear(shape, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(101, shape[-1])
    b = torch.randn(101) if with_bias else None
    out = torch.ops.visionformers.linear_rows(x, w, b)
    assert out.shape == shape[:-1] + (101,)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_result_does_not_depend_on_thread_count():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 512), torch.randn(1000, 512), torch.randn(1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear_rows(x, w, b)
        torch.set_num_threads(2)
        assert torch.equal(ops.linear_rows(x, w, b), one)
    finally:
        torch.set_num_threads(threads)


def test_self_check_rejects_a_wrong_kernel():
    assert linear_rows_agrees(F.linear)
    assert not linear_rows_agrees(lambda x, w, b: F.linear(x, w, b) + 1e-3)


def test_fake_function_gives_shapes_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = ops.linear_rows(torch.empty(2, 3, 8), torch.empty(5, 8), None)
    assert out.shape == (2, 3, 5)
    torch.library.opcheck(ops.linear_rows, (torch.randn(2, 8), torch.randn(5, 8), torch.randn(5)))


def test_without_the_kernel_the_op_is_f_linear(monkeypatch):
    monkeypatch.setattr(ops, "_lib", None)  # as on a machine without a compiler
    x, w, b = torch.randn(2, 8), torch.randn(5, 8), torch.randn(5)
    assert torch.equal(ops.linear_rows(x, w, b), F.linear(x, w, b))
