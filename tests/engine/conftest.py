"""Engine tests share one set-up: torch on one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model's ops are too small to split across threads; on a shared 2-core machine two threads
    contending with other processes made these tests 30x slower (measured: 18.8 s vs 0.6 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
