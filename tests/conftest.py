"""Test tiers: the default run is the CPU tier; `slow` is opt-in, `gpu` needs CUDA."""
import os

import pytest
import torch  # torch does not import triton

# Must be set before anything imports triton: without a GPU, Triton kernels run on CPU tensors
# through the interpreter; with one, the GPU tier runs the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The planner keeps its simulations in the user's cache; tests must not write there (its own
# test turns the cache on in a temporary folder).
os.environ.setdefault("LD3M_FAST_PLANNER_CACHE", "0")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


# Test tensors are tiny: one intra-op thread is faster than two (no OpenMP spin-up),
# and far faster when the 2-core machine is shared. Tests that exercise threading
# (the C++ kernels' determinism across thread counts) set their own count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread_after_each_test():
    """In-process CLI runs apply their thread policy to this process: restore one thread."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
