import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmaccel.runtime.budget import (
    ConstantSchedule,
    CosineSchedule,
    DensitySchedule,
    LinearSchedule,
    StepSchedule,
    TokenBudget,
    allocate,
    top_p_mask,
)

# -- TokenBudget --------------------------------------------------------------------------


def test_budget_resolve_ratio_and_count():
    assert TokenBudget(ratio=0.2).resolve(2880) == 576
    assert TokenBudget(ratio=1.0).resolve(7) == 7
    assert TokenBudget(ratio=0.01).resolve(10) == 1  # never zero
    assert TokenBudget(count=64).resolve(576) == 64
    assert TokenBudget(count=1000).resolve(576) == 576  # capped at n
    assert TokenBudget(ratio=1.0).is_full and not TokenBudget(ratio=0.5).is_full


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"count": 0}, "count"),
        ({}, "exactly one"),
        ({"ratio": 0.5, "count": 3}, "exactly one"),
    ],
)
def test_budget_invalid(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TokenBudget(**kwargs)


def test_budget_type_errors_and_frozen():
    with pytest.raises(TypeError, match="count"):
        TokenBudget(count=2.5)
    with pytest.raises(TypeError, match="ratio"):
        TokenBudget(ratio="0.5")
    b = TokenBudget(ratio=0.5)
    with pytest.raises(AttributeError):
        b.ratio = 0.3
    with pytest.raises(ValueError, match="n must be"):
        b.resolve(0)


@given(st.floats(min_value=1e-6, max_value=1.0), st.integers(1, 100_000))
def test_budget_resolve_in_range(ratio, n):
    k = TokenBudget(ratio=ratio).resolve(n)
    assert 1 <= k <= n
    assert abs(k - ratio * n) <= max(0.5, 1 - ratio * n) + 1e-9


# -- allocate -----------------------------------------------------------------------------


def test_allocate_examples():
    assert allocate(10, torch.tensor([1.0, 1.0]), torch.tensor([10, 10])).tolist() == [5, 5]
    assert allocate(10, torch.tensor([3.0, 1.0]), torch.tensor([100, 100])).tolist() == [8, 2]  # 7.5/2.5: tie -> first
    # overflow redistributed: group 0 wants 9 but holds 3
    assert allocate(10, torch.tensor([9.0, 1.0]), torch.tensor([3, 100])).tolist() == [3, 7]
    # total above capacity: everything full
    assert allocate(50, torch.tensor([1.0, 2.0]), torch.tensor([4, 5])).tolist() == [4, 5]
    # zero total
    assert allocate(0, torch.tensor([1.0, 2.0]), torch.tensor([4, 5])).tolist() == [0, 0]


def test_allocate_zero_weights_uniform_fallback():
    # all-zero weights: split in proportion to capacity (uniform density)
    assert allocate(6, torch.zeros(3), torch.tensor([4, 4, 4])).tolist() == [2, 2, 2]
    # zero-weight groups only get what the weighted groups cannot hold
    assert allocate(6, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([10, 10, 10])).tolist() == [6, 0, 0]
    assert allocate(6, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2, 2, 6])).tolist() == [2, 1, 3]


@pytest.mark.parametrize(
    "weights, capacity, match",
    [
        ([float("nan"), 1.0], [3, 3], "finite"),
        ([float("inf"), 1.0], [3, 3], "finite"),
        ([-1.0, 1.0], [3, 3], "non-negative"),
        ([1.0, 1.0], [3, -1], "capacity"),
        ([1.0], [3, 3], "same length"),
        ([], [], "empty"),
        ([1.0, 1.0], [1.5, 2.0], "integers"),
    ],
)
def test_allocate_invalid(weights, capacity, match):
    with pytest.raises(ValueError, match=match):
        allocate(3, torch.tensor(weights), torch.tensor(capacity))


def test_allocate_invalid_total():
    with pytest.raises(ValueError, match="total"):
        allocate(-1, torch.ones(2), torch.ones(2, dtype=torch.long))


groups = st.integers(1, 12)


@st.composite
def allocation_inputs(draw):
    n = draw(groups)
    weights = draw(st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=n, max_size=n))
    capacity = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    total = draw(st.integers(0, 400))
    return total, torch.tensor(weights, dtype=torch.float64), torch.tensor(capacity)


@settings(max_examples=300, deadline=None)
@given(allocation_inputs())
def test_allocate_sum_and_capacity(inputs):
    total, weights, capacity = inputs
    out = allocate(total, weights, capacity)
    assert out.dtype == torch.long
    assert int(out.sum()) == min(total, int(capacity.sum()))
    assert (out >= 0).all() and (out <= capacity).all()


@settings(max_examples=300, deadline=None)
@given(allocation_inputs())
def test_allocate_proportional_when_capacity_not_binding(inputs):
    total, weights, _ = inputs
    if weights.sum() == 0:
        return
    capacity = torch.full_like(weights, total + 1, dtype=torch.long)
    out = allocate(total, weights, capacity).double()
    ideal = weights / weights.sum() * total
    assert ((out - ideal).abs() < 1.0 + 1e-9).all()  # within one token of the exact share (quota rule)


@settings(max_examples=200, deadline=None)
@given(allocation_inputs())
def test_allocate_capped_groups_respect_weight_order(inputs):
    # A group that is not full never gets fewer tokens than its exact share minus one, i.e.
    # no capped group's overflow is lost or handed to zero-weight groups while others have room.
    total, weights, capacity = inputs
    out = allocate(total, weights, capacity)
    positive_open = (weights > 0) & (out < capacity)
    if positive_open.any():
        assert int(out[weights == 0].sum()) == 0


@settings(max_examples=200, deadline=None)
@given(allocation_inputs())
def test_allocate_monotone_in_total(inputs):
    # The allocated sum grows by exactly one per extra token until capacity is reached, and
    # every group's share stays within one token of the previous total's (largest-remainder
    # rounding is not house-monotone per group: the Alabama paradox can move one token).
    total, weights, capacity = inputs
    a = allocate(total, weights, capacity)
    b = allocate(total + 1, weights, capacity)
    assert int(b.sum()) - int(a.sum()) == (1 if int(a.sum()) < int(capacity.sum()) else 0)
    assert ((b - a) >= -1).all()
    big = allocate(total + 50, weights, capacity)
    assert int(big.sum()) >= int(b.sum())


# -- top_p_mask ---------------------------------------------------------------------------


def test_top_p_mask_examples():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_mask(probs, 0.5, probs=True).tolist() == [[True, False, False, False]]
    assert top_p_mask(probs, 0.6, probs=True).tolist() == [[True, True, False, False]]  # crossing kept
    assert top_p_mask(probs, 0.8, probs=True).tolist() == [[True, True, False, False]]
    assert top_p_mask(probs, 0.81, probs=True).tolist() == [[True, True, True, False]]
    assert top_p_mask(probs, 1.0, probs=True).all()
    assert top_p_mask(probs, 0.1, min_keep=3, probs=True).tolist() == [[True, True, True, False]]
    # unsorted input and logits
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert top_p_mask(logits, 0.5).tolist() == [[False, True, False]]


@pytest.mark.parametrize("p", [0.0, -0.1, 1.01, float("nan")])
def test_top_p_mask_invalid_p(p):
    with pytest.raises(ValueError, match="p must be"):
        top_p_mask(torch.randn(2, 3), p)


def test_top_p_mask_invalid_other():
    with pytest.raises(ValueError, match="min_keep"):
        top_p_mask(torch.randn(2, 3), 0.5, min_keep=0)
    with pytest.raises(ValueError, match="non-negative"):
        top_p_mask(torch.tensor([[-1.0, 2.0]]), 0.5, probs=True)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 40),
    st.floats(0.01, 1.0),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)
def test_top_p_mask_is_minimal_prefix(rows, cols, p, min_keep, seed):
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    mask = top_p_mask(scores, p, min_keep=min_keep)
    probs = scores.double().softmax(-1)
    for r in range(rows):
        kept = probs[r][mask[r]]
        dropped = probs[r][~mask[r]]
        k = int(mask[r].sum())
        assert k >= min(min_keep, cols)
        if dropped.numel() and kept.numel():
            assert kept.min() >= dropped.max()  # a top set
        assert kept.sum() >= p - 1e-6 or k == cols  # reaches p
        if k > min(min_keep, cols):  # minimal: without its smallest element it would not reach p
            assert kept.sum() - kept.min() < p


def test_top_p_mask_batched_shape():
    scores = torch.randn(2, 3, 5, 7)
    mask = top_p_mask(scores, 0.9)
    assert mask.shape == scores.shape and mask.dtype == torch.bool


# -- schedules ----------------------------------------------------------------------------


def test_schedules_values():
    assert ConstantSchedule(0.25)(0.7) == 0.25
    lin = LinearSchedule(0.25, 1.0)
    assert lin(0.0) == 0.25 and lin(1.0) == 1.0 and math.isclose(lin(0.5), 0.625)
    cos = CosineSchedule(0.25, 1.0)
    assert math.isclose(cos(0.0), 0.25) and math.isclose(cos(1.0), 1.0) and math.isclose(cos(0.5), 0.625)
    step = StepSchedule(boundaries=(0.3, 0.6), ratios=(0.25, 0.5, 1.0))
    assert [step(t) for t in (0.0, 0.29, 0.3, 0.59, 0.6, 1.0)] == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    for s in (ConstantSchedule(), lin, cos, step):
        assert isinstance(s, DensitySchedule)


@given(st.floats(0.0, 1.0), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_schedules_in_range(t, a, b):
    for s in (LinearSchedule(a, b), CosineSchedule(a, b)):
        assert min(a, b) - 1e-12 <= s(t) <= max(a, b) + 1e-12


def test_schedules_invalid():
    with pytest.raises(ValueError, match="start"):
        LinearSchedule(0.0, 1.0)
    with pytest.raises(ValueError, match="ratios"):
        StepSchedule(boundaries=(0.5,), ratios=(0.5,))
    with pytest.raises(ValueError, match="boundaries"):
        StepSchedule(boundaries=(0.6, 0.4), ratios=(0.2, 0.5, 1.0))
    with pytest.raises(ValueError, match=r"ratios\[1\]"):
        StepSchedule(boundaries=(0.5,), ratios=(0.5, 1.2))
    with pytest.raises(ValueError, match="progress"):
        ConstantSchedule(0.5)(1.5)


@pytest.mark.parametrize(
    ("scores", "probs", "match"),
    [
        (torch.tensor([[0.1, float("nan"), 0.2]]), False, "must not be NaN; got 1 NaN"),
        (torch.tensor([[0.1, float("nan"), 0.2]]), True, "must not be NaN"),
        (torch.tensor([[1.0, float("inf")]]), False, r"got \+inf"),
        (torch.tensor([[0.5, float("inf")]]), True, "needs finite scores"),
        (torch.tensor([[0.5, float("-inf")]]), True, "needs finite scores"),
        (torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]), False, "all -inf"),
    ],
)
def test_top_p_mask_refuses_nan_and_inf(scores, probs, match):
    with pytest.raises(ValueError, match=match):
        top_p_mask(scores, 0.9, probs=probs)


def test_top_p_mask_keeps_masked_minus_inf_logits_out():
    logits = torch.tensor([[2.0, float("-inf"), 1.0, float("-inf")]])
    assert top_p_mask(logits, 1.0).tolist() == [[True, False, True, False]]
    with pytest.raises(TypeError, match="torch.Tensor"):
        top_p_mask([[0.1, 0.2]], 0.5)
