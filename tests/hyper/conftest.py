"""Shared settings for the hyperparameter-learning tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tests use small tensors, and on a shared 2-core machine
    intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
