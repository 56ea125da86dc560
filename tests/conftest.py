import os

import pytest
import torch

# Two cores, several test processes: one intra-op thread keeps timings and runs predictable.
torch.set_num_threads(1)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _collect_garbage_watchers():
    """A watcher an earlier test left open (an exception stopped its training) is closed
    by the garbage collector: before this test, not at a moment that depends on the
    allocations of this one (its close would run this test's monkeypatched internals)."""
    import gc

    gc.collect()
