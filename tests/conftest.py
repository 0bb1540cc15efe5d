import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Native kernels (visionformers/native/build.py) are built afresh for every test session, so CI exercises the build.
if "VISIONFORMERS_CACHE" not in os.environ:
    os.environ["VISIONFORMERS_CACHE"] = tempfile.mkdtemp(prefix="visionformers-test-cache-")
    atexit.register(shutil.rmtree, os.environ["VISIONFORMERS_CACHE"], ignore_errors=True)

# nn.linear's rows kernel is used where it measures faster than BLAS; the tests exercise it wherever it builds.
os.environ.setdefault("VISIONFORMERS_LINEAR_ROWS", "1")
# Likewise oneDNN for products of many rows (chosen by timing against BLAS otherwise).
os.environ.setdefault("VISIONFORMERS_LINEAR_ONEDNN", "1")
# And the native GEMM for inference products of many rows (chosen by timing against BLAS / oneDNN otherwise).
os.environ.setdefault("VISIONFORMERS_LINEAR_GEMM", "1")
# And Winograd for the UNet's 3x3 convolutions (chosen by timing against oneDNN otherwise).
os.environ.setdefault("VISIONFORMERS_CONV_WINOGRAD", "1")

# Two cores are shared by everything in CI; one intra-op thread per test process keeps timings predictable.
torch.set_num_threads(max(1, min(2, int(os.environ.get("VF_TEST_THREADS", "2")))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
