"""mmaccel.parallel_video.schedule: the DualParal block/step schedule and stage split, without processes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmaccel.parallel_video.layer_pipeline import LayerPipelineConfig, block_noise
from mmaccel.parallel_video.schedule import BlockSchedule, split_stages


@given(blocks=st.integers(1, 12), steps=st.integers(1, 12))
def test_every_block_gets_every_step_once_in_order(blocks, steps):
    schedule = BlockSchedule(blocks, steps)
    order = schedule.order()
    assert len(order) == blocks * steps == len(set(order))
    for b in range(blocks):
        assert [s for bb, s in order if bb == b] == list(range(steps))
    for k in range(schedule.num_iterations):
        items = schedule.iteration(k)
        assert all(b + s == k for b, s in items)  # FIFO diagonal: block b takes step s at iteration b + s
        assert [b for b, _ in items] == sorted(b for b, _ in items)  # oldest block first
        assert 1 <= schedule.in_flight(k) <= min(blocks, steps)
    # a block's predecessor is always one step ahead (or finished) when the block runs
    position = {item: i for i, item in enumerate(order)}
    for b, s in order:
        if b > 0:
            before = (b - 1, min(s + 1, steps - 1))
            assert position[before] < position[(b, s)]


def test_schedule_shape_and_validation():
    schedule = BlockSchedule(num_blocks=3, steps=2)
    assert schedule.num_iterations == 4
    assert [schedule.iteration(k) for k in range(4)] == [
        [(0, 0)],
        [(0, 1), (1, 0)],
        [(1, 1), (2, 0)],
        [(2, 1)],
    ]
    with pytest.raises(ValueError, match="steps"):
        BlockSchedule(3, 0)


@given(layers=st.integers(1, 40), ranks=st.integers(1, 8))
def test_stages_are_contiguous_and_balanced(layers, ranks):
    if ranks > layers:
        with pytest.raises(ValueError, match="more ranks"):
            split_stages(layers, ranks)
        return
    stages = split_stages(layers, ranks)
    assert stages[0][0] == 0 and stages[-1][1] == layers
    assert all(a[1] == b[0] for a, b in zip(stages, stages[1:]))
    sizes = [hi - lo for lo, hi in stages]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_coordinated_noise_is_one_shuffled_template():
    template = block_noise(3, 0, 4, (2, 3, 5))
    for block in (1, 2, 7):
        noise = block_noise(3, block, 4, (2, 3, 5))
        as_set = sorted(noise[0, 0, :, 0, 0].tolist())
        assert as_set == sorted(template[0, 0, :, 0, 0].tolist())
    assert not all(torch.equal(block_noise(3, b, 4, (2, 3, 5)), template) for b in range(1, 6))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(frames_per_block=0), "frames_per_block"), (dict(frames_per_block=2, num_cat=3), "num_cat")],
)
def test_pipeline_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerPipelineConfig(**kwargs)


@given(blocks=st.integers(1, 12), steps=st.integers(1, 12))
def test_newest_first_is_the_reference_order(blocks, steps):
    """DualParal's reference walks each iteration's queue from the newest block to the oldest; the
    same items, on the same diagonal, in reverse order within each iteration."""
    newest = BlockSchedule(blocks, steps, iteration_order="newest_first")
    oldest = BlockSchedule(blocks, steps)
    for k in range(newest.num_iterations):
        assert newest.iteration(k) == oldest.iteration(k)[::-1]
    assert sorted(newest.order()) == sorted(oldest.order())
    # a block finds the next block's K/V of the same iteration: it ran immediately before
    order = newest.order()
    for i, (b, s) in enumerate(order):
        if b + 1 < blocks and s >= 1:
            assert order[i - 1] == (b + 1, s - 1)


def test_schedule_and_pipeline_options_validate():
    with pytest.raises(ValueError, match="iteration_order must be one of"):
        BlockSchedule(2, 2, iteration_order="random")
    with pytest.raises(ValueError, match="context must be one of"):
        LayerPipelineConfig(context="both")
    with pytest.raises(ValueError, match="order must be one of"):
        LayerPipelineConfig(order="sideways")
    with pytest.raises(TypeError, match="num_cat"):
        LayerPipelineConfig(num_cat=1.0)
    with pytest.raises(ValueError, match="tail_lag must be 0 or 1"):
        LayerPipelineConfig(tail_lag=2)
