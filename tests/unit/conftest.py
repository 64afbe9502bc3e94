"""Fixtures for the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Train tiny models on one torch thread, as the sparsify pipeline does: on a shared
    2-core machine two threads spin against each other and run 10-40x slower."""
    torch = pytest.importorskip("torch", reason="needs the [sparsify] extra")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
