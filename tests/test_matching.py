import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_seg.matching import min_cost_assignment


def _brute_force_minimum(cost: torch.Tensor) -> float:
    """Cheapest sum over injective maps rows -> columns of cost [T, Q], T <= Q."""
    t, q = cost.shape
    return min(sum(cost[i, j].item() for i, j in enumerate(cols)) for cols in itertools.permutations(range(q), t))


@st.composite
def marked_costs(draw):
    """N small integer cost matrices [N, T, Q] (ties abound) and which rows are marked."""
    n, t = draw(st.integers(1, 3)), draw(st.integers(0, 4))
    q = draw(st.integers(max(t, 1), 5))
    values = draw(st.lists(st.integers(-20, 20), min_size=n * t * q, max_size=n * t * q))
    rows = draw(st.lists(st.booleans(), min_size=n * t, max_size=n * t))
    return torch.tensor(values, dtype=torch.float64).view(n, t, q), torch.tensor(rows, dtype=torch.bool).view(n, t)


@settings(max_examples=200, deadline=None)
@given(marked_costs())
def test_marked_rows_get_distinct_columns_of_minimum_total_cost_and_unmarked_rows_none(case):
    cost, rows = case
    cols = min_cost_assignment(cost, rows)
    assert cols.shape == rows.shape and cols.dtype == torch.long
    for c, r, k in zip(cost, rows, cols):
        assert (k[~r] == -1).all() and ((k[r] >= 0) & (k[r] < cost.shape[2])).all()
        assert len(set(k[r].tolist())) == int(r.sum())  # distinct columns
        if r.any():
            assert c[r.nonzero()[:, 0], k[r]].sum().item() == pytest.approx(_brute_force_minimum(c[r]))


def test_agrees_with_scipy_row_for_row_on_random_costs_with_rows_left_out():
    """Continuous costs have one optimum: the same pairs as SciPy's solver on the marked rows alone."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    for n, t, q in [(4, 19, 100), (3, 7, 7), (2, 1, 1), (5, 6, 16)]:
        cost = torch.rand(n, t, q, generator=g, dtype=torch.float64)
        rows = torch.rand(n, t, generator=g) < 0.7
        cols = min_cost_assignment(cost.float(), rows)
        for c, r, k in zip(cost, rows, cols):
            marked = r.nonzero()[:, 0]
            i, j = scipy_opt.linear_sum_assignment(c[marked].numpy())
            expected = torch.full((t,), -1)
            expected[marked[i]] = torch.from_numpy(j)
            assert torch.equal(k, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_rows_by_default_on_the_costs_device_whatever_their_dtype(dtype):
    cost = torch.tensor([[[3.0, 1.0, 2.0], [1.0, 5.0, 4.0]]], dtype=dtype)
    assert min_cost_assignment(cost).tolist() == [[1, 0]]


def test_bad_costs_are_refused():
    with pytest.raises(ValueError, match="finite"):
        min_cost_assignment(torch.tensor([[[0.0, float("inf")]]]))
    with pytest.raises(ValueError, match="matrices"):
        min_cost_assignment(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="T <= Q"):
        min_cost_assignment(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="rows must be bool"):
        min_cost_assignment(torch.zeros(1, 2, 3), torch.ones(1, 3, dtype=torch.bool))
