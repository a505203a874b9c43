"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other work, OpenMP threads spinning against each
    other make small training runs many times slower (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
