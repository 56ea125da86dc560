import os

import pytest
import torch

# Two cores, several test processes: one intra-op thread keeps timings and runs predictable.
torch.set_num_threads(1)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
