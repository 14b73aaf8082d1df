"""The static video masks that benchmark SVG2 against its peers (benchmarks/static_masks.py):
each reaches the density asked for and has the structure its rule states, and runs through
flex_attention as the masked dense attention it stands for."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmaccel.benchmarks.static_masks import (
    StaticMask,
    VideoGrid,
    profile_svg1_heads,
    radial_mask,
    run_block_mask,
    sliding_tile_mask,
    svg1_mask,
)

GRID = VideoGrid(16, 8, 16)  # 2048 tokens: 128 blocks of 16 (radial floor (2F - 1) / F^2 = 0.12)
BLOCK = 16


def _token_mask(mask: StaticMask, head: int) -> torch.Tensor:
    """(S, S) bool over raster tokens: the pairs ``mask`` keeps for ``head``."""
    order = mask.order[head]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel())
    return mask.blocks[head][pos[:, None] // mask.block, pos[None, :] // mask.block]


@pytest.mark.parametrize("density", [0.2, 0.25, 0.4])
def test_densities_match_the_target(density):
    masks = [
        sliding_tile_mask(GRID, density, heads=2, tile=(1, 4, 4)),
        radial_mask(GRID, density, heads=2, block=BLOCK),
        svg1_mask(GRID, density, torch.tensor([True, False]), block=BLOCK),
    ]
    for mask in masks:
        assert mask.blocks.shape == (2, GRID.tokens // BLOCK, GRID.tokens // BLOCK)
        assert abs(mask.density - density) <= 0.03, (mask.name, mask.param, mask.density)
        # token pairs kept = block fraction: each block is a whole group of tokens
        assert _token_mask(mask, 0).float().mean().item() == pytest.approx(mask.density)


def test_sliding_tile_windows_are_clamped_inside_the_video():
    mask = sliding_tile_mask(GRID, 0.25, heads=1, tile=(2, 4, 4))
    kt, kh, kw = mask.param
    tiles = (8, 2, 4)  # the tile grid of GRID
    blocks = mask.blocks[0].view(*tiles, *tiles)
    assert (mask.blocks[0].sum(-1) == kt * kh * kw).all()  # every query tile: a whole window
    for query in [(0, 0, 0), (7, 1, 3), (4, 0, 1)]:
        kept = blocks[query].nonzero()
        for axis, (c, k, g) in enumerate(zip(query, mask.param, tiles)):
            start = min(max(c - k // 2, 0), g - k)  # the centre clamped so the window fits
            assert kept[:, axis].min() == start and kept[:, axis].max() == start + k - 1
    # a token's tile holds 2 frames x 4 rows x 4 cols of the raster grid
    first = mask.order[0, : mask.block]
    t, y, x = first // GRID.per_frame, first % GRID.per_frame // GRID.cols, first % GRID.cols
    assert set(t.tolist()) == {0, 1} and set(y.tolist()) == set(range(4)) and set(x.tolist()) == set(range(4))


def test_radial_is_dense_near_the_diagonal_and_decays_with_frame_distance():
    grid = GRID
    mask = radial_mask(grid, 0.3, heads=1, block=BLOCK)
    fb = grid.per_frame // BLOCK
    pairs = mask.blocks[0].view(16, fb, 16, fb).float().mean((1, 3))  # kept fraction per frame pair
    assert (pairs.diagonal() == 1).all() and (pairs[:, 0] == 1).all()  # same frame, sink frame
    dist = (torch.arange(16)[:, None] - torch.arange(16)[None, :]).abs()
    group = torch.floor(torch.log2(dist.clamp(min=1).float())).long() + 1  # bit_length of the distance
    away = (dist > 0) & (torch.arange(16)[None, :] > 0)  # off the diagonal, not the sink frame
    by_group = [pairs[away & (group == g)].mean().item() for g in range(1, 5)]
    assert all(a >= b for a, b in zip(by_group, by_group[1:])) and by_group[0] > by_group[-1]
    sparser = radial_mask(grid, 0.2, heads=1, block=BLOCK)
    assert sparser.param < mask.param and sparser.density < mask.density


def test_svg1_heads_are_frame_or_position_bands():
    mask = svg1_mask(GRID, 0.2, torch.tensor([False, True]), block=BLOCK)
    spatial, temporal = _token_mask(mask, 0), _token_mask(mask, 1)
    frame = torch.arange(GRID.tokens) // GRID.per_frame
    place = torch.arange(GRID.tokens) % GRID.per_frame
    # spatial head: keys within a band of frames around the query's frame, never far frames
    assert spatial[frame[:, None] == frame[None, :]].all()
    assert not spatial[(frame[:, None] - frame[None, :]).abs() > 2].any()
    # temporal head: its own spatial position in every frame, never far positions
    assert temporal[place[:, None] == place[None, :]].all()
    far = (place[:, None] - place[None, :]).abs() > (mask.param + 1) * BLOCK // GRID.frames
    assert not temporal[far].any()


def test_svg1_profiling_picks_the_head_kind_that_fits():
    # head 0 attends within its frame, head 1 to its spatial position across frames
    frame = torch.arange(GRID.tokens) // GRID.per_frame
    place = torch.arange(GRID.tokens) % GRID.per_frame
    dim = 128
    codes = torch.randn(max(GRID.frames, GRID.per_frame), dim, generator=torch.Generator().manual_seed(0))
    q = torch.stack([codes[frame], codes[place]])[None] * 3
    v = torch.randn(1, 2, GRID.tokens, dim, generator=torch.Generator().manual_seed(1))
    assert profile_svg1_heads(q, q, v, GRID, 0.2, block=BLOCK).tolist() == [False, True]


def test_block_masks_run_as_masked_dense_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, GRID.tokens, 16, generator=gen).unbind(0)
    masks = [
        sliding_tile_mask(GRID, 0.25, heads=2, tile=(1, 4, 4)),
        radial_mask(GRID, 0.3, heads=2, block=BLOCK),
        svg1_mask(GRID, 0.2, torch.tensor([True, False]), block=BLOCK),
    ]
    for mask in masks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
            out = run_block_mask(q, k, v, mask, compiled=False)
        for h in range(2):
            ref = F.scaled_dot_product_attention(q[:, h], k[:, h], v[:, h], attn_mask=_token_mask(mask, h))
            torch.testing.assert_close(out[:, h], ref, rtol=1e-5, atol=1e-5, msg=mask.name)
    assert math.isclose(masks[0].density, 0.25)
