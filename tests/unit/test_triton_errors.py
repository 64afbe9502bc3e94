"""Every row of the upstream-error table of the Triton backend: tritonclient's
exceptions (as it raises them for each gRPC status) -> our domain errors -> the status
the client of sparseserve sees."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from sparseserve.backends.triton import _domain_error
from sparseserve.errors import status_of


@pytest.mark.parametrize(
    ("upstream", "ours"),
    [
        ("StatusCode.UNAVAILABLE", "UNAVAILABLE"),
        ("StatusCode.DEADLINE_EXCEEDED", "UNAVAILABLE"),
        ("StatusCode.CANCELLED", "UNAVAILABLE"),
        ("StatusCode.INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        ("StatusCode.NOT_FOUND", "UNAVAILABLE"),
        ("StatusCode.INTERNAL", "INTERNAL"),
        (None, "INTERNAL"),
    ],
)
def test_upstream_status_maps_to_a_domain_error(upstream: str | None, ours: str) -> None:
    error = _domain_error(InferenceServerException("boom", status=upstream), "gpu:8001")
    assert status_of(error) == ours
    assert "gpu:8001" in str(error) and "boom" in str(error)
