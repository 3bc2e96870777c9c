"""Run these tests single-threaded: on a shared 2-core machine, intra-op threads
spin-waiting for each other make tiny conv nets many times slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` for the test, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
