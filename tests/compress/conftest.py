"""Shared by the compress tests."""
from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on one thread: two torch threads on two shared cores spin against each other
    (30x slower steps, measured)."""
    try:
        import torch
    except ImportError:  # the torch-free tests (data, metrics, eval) need no setting
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
