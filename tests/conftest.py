"""Which tests run where, decided here only; tests say what they need with a marker (pyproject.toml
registers them):

    gpu          a CUDA GPU and compiled kernels (TRITON_INTERPRET unset): the `make gpu-test` suite
    interpreter  the Triton kernels on CPU tensors, which only the interpreter runs: TRITON_INTERPRET=1
                 before triton is imported (`make test`)
    slow         a long CPU test

Both skip with the reason when what they need is missing. Conditions of one test (two GPUs, gloo, a
vendored peer, ptxas) stay a `skipif` on that test.
"""
import pytest
import torch

from specssm._runtime import kernels_interpreted

# the model tests run tiny tensors: with several threads on a loaded 2-core machine, thread hand-offs
# cost more than the math (an 8x64 float64 matmul went from 7 us to 5 ms)
ONE_THREAD_DIRS = ("model",)


def pytest_collection_modifyitems(config, items):
    interpreted = kernels_interpreted()
    gpu = torch.cuda.is_available() and not interpreted
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU with compiled kernels (TRITON_INTERPRET unset)")
    skip_interp = pytest.mark.skip(reason="runs the Triton kernels on the CPU: needs TRITON_INTERPRET=1 "
                                          "before triton is imported")
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not interpreted:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request):
    if request.node.path.parent.name not in ONE_THREAD_DIRS:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tuned():
    """tuned(over): the steps of this test launch with `over` merged on their config
    (`tuning.overridden`) until it ends; a later call replaces an earlier one."""
    import contextlib

    from specssm.step import tuning
    stack = contextlib.ExitStack()

    def set_override(over: dict) -> None:
        stack.close()
        stack.enter_context(tuning.overridden(over))
    yield set_override
    stack.close()
