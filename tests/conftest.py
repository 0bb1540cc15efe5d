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
