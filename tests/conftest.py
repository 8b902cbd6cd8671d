"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One thread: tiny ops on a busy machine otherwise wait on OpenMP thread scheduling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
