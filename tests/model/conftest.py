import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the model tests run tiny tensors: with several threads on a loaded 2-core machine, thread
    # hand-offs cost more than the math (a 8x64 float64 matmul went from 7 us to 5 ms)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
