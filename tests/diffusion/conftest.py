import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run long loops of small tensor ops: one intra-op thread is fastest, and on
    a loaded 2-core machine two threads make each op tens of times slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
