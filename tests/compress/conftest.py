"""Shared fixtures for tests/compress."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one thread is faster than two fighting over a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
