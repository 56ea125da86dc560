import gc
import os

import pytest
import torch

# Two cores, several test processes: one intra-op thread keeps timings and runs predictable.
# `make test` runs two pytest workers (pytest-xdist, `-n 2 --dist loadfile`): a file's tests
# stay in one worker, so its module fixtures (the zoo, the TensorBoard servers) are built once.
torch.set_num_threads(1)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _thaw_at_the_end():
    yield
    gc.unfreeze()
    gc.collect()


_module_of_last_collection: list[object] = [None]


@pytest.fixture(autouse=True)
def _collect_garbage_watchers(request):
    """A watcher an earlier test left open (an exception stopped its training) is closed
    by the garbage collector: before this test, not at a moment that depends on the
    allocations of this one (its close would run this test's monkeypatched internals).

    A full collection walks every object in the process (torch, transformers, the
    module-scoped fixtures: about 0.5 s before each test here). What survives it is frozen
    (``gc.freeze``), so the next collection walks only what the test in between made, which
    is where its leftovers are; frozen objects are never collected, automatically or not,
    so none is closed inside a test either. The frozen set is thawed and collected in full
    at the first test of each module (the previous module's fixtures are torn down by then)
    and at the end of the session."""
    if request.module is not _module_of_last_collection[0]:
        _module_of_last_collection[0] = request.module
        gc.unfreeze()
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    """The 12-block GPT-2-style training (``tests.support.gpt2log``), trained once for the
    plugin and the custom-scalars tests: they only read its logdir and what it returns."""
    from tests.support import gpt2log

    return gpt2log.train(str(tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(params=["C kernels", "PyTorch ops"])
def kernels(request, monkeypatch):
    """Run the test twice: with the C kernels of the CPU sampled statistics
    (``gradwatch.cpukernels``), and with the PyTorch ops that CUDA and every tensor the
    kernels do not take use."""
    import gradwatch.cpukernels

    if request.param == "PyTorch ops":
        monkeypatch.setattr(gradwatch.cpukernels, "_kernels", None)
    else:
        assert gradwatch.cpukernels.AVAILABLE, "gradwatch._kernels was not built"
    return request.param
