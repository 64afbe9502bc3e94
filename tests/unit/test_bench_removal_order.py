"""bench/removal_order_speed.py's reference: the plain full-size update removes the same
groups, at the same costs, as `reconstruct.removal_order` (the run itself times them on
MiniLM-sized maps: python -m bench.removal_order_speed)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")

from bench.removal_order_speed import plain_removal_order, problem
from sparseserve.sparsify.reconstruct import removal_order


@pytest.mark.parametrize(("group", "remove"), [(1, 40), (4, 10)])
def test_the_plain_form_removes_the_same_groups(group: int, remove: int) -> None:
    normal = problem(inputs=48, outputs=6, tokens=800, seed=3)
    order, costs = removal_order(normal, group, remove, 1e-4)
    plain_order, plain_costs = plain_removal_order(normal, group, remove, 1e-4)
    assert order == plain_order
    assert costs == pytest.approx(plain_costs, rel=1e-6, abs=1e-9)
