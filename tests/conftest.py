import os

import pytest
import torch

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
