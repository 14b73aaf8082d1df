"""Token reducers: pooling/expansion on 2-D and video grids, ToMe merging, rotary reduction."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmaccel.diffusion.token_reduce import BipartiteMerge, GridPool, check_divides, pool_factors_at_most


@pytest.mark.parametrize(
    "grid,factor",
    [((1, 8, 12), (1, 2, 2)), ((1, 8, 12), (1, 4, 3)), ((4, 6, 8), (2, 2, 2)), ((3, 4, 6), (1, 2, 3))],
)
def test_pool_matches_avg_pool_and_shapes(grid, factor):
    torch.manual_seed(0)
    x = torch.randn(2, math.prod(grid), 5)
    pool = GridPool(grid, factor)
    y = pool.reduce(x)
    assert y.shape == (2, math.prod(grid) // math.prod(factor), 5) == (2, pool.num_tokens, 5)
    ref = F.avg_pool3d(x.transpose(1, 2).reshape(2, 5, *grid), factor).flatten(2).transpose(1, 2)
    torch.testing.assert_close(y, ref)
    for mode in ("nearest", "linear"):
        up = GridPool(grid, factor, mode).expand(y)
        assert up.shape == x.shape
        torch.testing.assert_close(GridPool(grid, factor, mode).add_expanded(x, y), x + up)
    # nearest expansion repeats each pooled token over its window, so pooling it again is the identity
    torch.testing.assert_close(pool.reduce(pool.expand(y)), y)
    # linear expansion of a constant field is that constant
    const = torch.ones(1, pool.num_tokens, 3) * 2.5
    torch.testing.assert_close(
        GridPool(grid, factor, "linear").expand(const), torch.full((1, x.shape[1], 3), 2.5)
    )


def test_pool_validation():
    with pytest.raises(ValueError, match="factor .* must divide the token grid"):
        GridPool((1, 8, 12), (1, 3, 3))
    with pytest.raises(ValueError, match="expand_mode"):
        GridPool((1, 8, 8), (1, 2, 2), "cubic")
    check_divides((1, 2, 2), (1, 4, 4))
    assert pool_factors_at_most((1, 2, 2)) == [(1, 1, 1), (1, 1, 2), (1, 2, 1), (1, 2, 2)]


def test_rotary_pooling_is_rope_at_window_centres():
    """Pooled (cos, sin) equal RoPE evaluated at the window's centre position."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    dim, theta = 16, 10000.0
    grid, factor = (1, 12, 12), (1, 3, 2)
    cos_h, sin_h = get_1d_rotary_pos_embed(dim, 12, theta, use_real=True, repeat_interleave_real=True)
    # a 2-D table: first half of the channels follow the row, second half the column
    rows = torch.arange(12).repeat_interleave(12)
    cols = torch.arange(12).repeat(12)
    cos = torch.cat([cos_h[rows], cos_h[cols]], -1)[None]  # (1, N, 2 * dim)
    sin = torch.cat([sin_h[rows], sin_h[cols]], -1)[None]
    pc, ps = GridPool(grid, factor).reduce_rotary(cos, sin)
    centres_r = np.arange(4) * 3 + 1.0  # windows of 3 rows
    centres_c = np.arange(6) * 2 + 0.5  # windows of 2 columns
    ec_r, es_r = get_1d_rotary_pos_embed(dim, centres_r, theta, use_real=True, repeat_interleave_real=True)
    ec_c, es_c = get_1d_rotary_pos_embed(dim, centres_c, theta, use_real=True, repeat_interleave_real=True)
    r, c = torch.arange(4).repeat_interleave(6), torch.arange(6).repeat(4)
    torch.testing.assert_close(pc[0], torch.cat([ec_r[r], ec_c[c]], -1).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ps[0], torch.cat([es_r[r], es_c[c]], -1).float(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rotary"):
        GridPool((1, 14, 14), (1, 7, 7)).reduce_rotary(torch.ones(1, 196, 4), torch.zeros(1, 196, 4))


def test_merge_counts_means_and_unmerge():
    torch.manual_seed(0)
    grid, cell = (2, 4, 6), (1, 2, 2)
    x = torch.randn(3, math.prod(grid), 8)
    merge = BipartiteMerge(x, grid, cell, num_merge=20, generator=torch.Generator().manual_seed(1))
    y = merge.reduce(x)
    assert y.shape == (3, 48 - 20, 8) and merge.num_tokens == 28
    up = merge.expand(y)
    assert up.shape == x.shape
    # every original token maps to the reduced token it was merged into; the mean is preserved per group
    for b in range(3):
        groups = {}
        for i in range(48):
            key = tuple(up[b, i].tolist())
            groups.setdefault(key, []).append(i)
        assert len(groups) == 28
        for key, members in groups.items():
            torch.testing.assert_close(x[b, members].mean(0), torch.tensor(key))
    # nothing merged: identity
    ident = BipartiteMerge(x, grid, cell, 0)
    torch.testing.assert_close(ident.expand(ident.reduce(x)), x)
    # kept positions are the positions of the unmerged tokens
    assert merge.kept_positions.shape == (3, 28)
    with pytest.raises(ValueError, match="num_merge"):
        BipartiteMerge(x, grid, cell, 48 - 12 + 1)


def test_merge_merges_duplicates_first():
    """Exact duplicates of a destination are merged before dissimilar tokens."""
    torch.manual_seed(0)
    grid, cell = (1, 4, 4), (1, 2, 2)
    x = torch.randn(1, 16, 32)
    merge = BipartiteMerge(x, grid, cell, 0)  # destinations = first token of each cell
    dst = merge.kept_positions[0, -4:]
    x2 = x.clone()
    x2[0, dst[0] + 1] = x2[0, dst[0]]  # a source equal to its cell's destination
    merged = BipartiteMerge(x2, grid, cell, 1)
    assert int(dst[0] + 1) not in merged.kept_positions[0].tolist()


def _tomesd_bipartite_random2d(metric, w, h, sx, sy, r, generator=None):
    """Independent transcription of tomesd's ``bipartite_soft_matching_random2d`` rule (dbolya/tomesd,
    merge.py) for grids that ``(sy, sx)`` divide: one destination per ``sy x sx`` cell (random, or the
    top-left token without a generator), cosine similarity of every source to every destination, the
    ``r`` sources with the highest best-match score merged (mean) into their best destination.
    Returns ``(merge, unmerge, kept_positions)``."""
    b, n, _ = metric.shape
    hsy, wsx = h // sy, w // sx
    if generator is None:
        choice = torch.zeros(hsy, wsx, 1, dtype=torch.int64)
    else:
        choice = torch.randint(sy * sx, size=(hsy, wsx, 1), generator=generator)
    buf = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64)
    buf.scatter_(2, choice, -torch.ones_like(choice))  # -1 marks the destination of each cell
    buf = buf.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(h * w)
    order = buf.argsort(stable=True)  # destinations first, then sources
    num_dst = hsy * wsx
    src_pos, dst_pos = order[num_dst:], order[:num_dst]
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, src_pos] @ m[:, dst_pos].transpose(1, 2)
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True)
    unm, merged = edge[:, r:], edge[:, :r]
    dst_of = node_idx.gather(1, merged)

    def merge(x):
        c = x.shape[-1]
        src, dst = x[:, src_pos], x[:, dst_pos]
        keep = src.gather(1, unm[..., None].expand(-1, -1, c))
        gone = src.gather(1, merged[..., None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, dst_of[..., None].expand(-1, -1, c), gone, reduce="mean")
        return torch.cat([keep, dst], dim=1)

    def unmerge(y):
        c = y.shape[-1]
        keep, dst = y[:, : unm.shape[1]], y[:, unm.shape[1] :]
        out = torch.zeros(b, n, c, dtype=y.dtype)
        out[:, dst_pos] = dst
        for i in range(b):
            out[i, src_pos[unm[i]]] = keep[i]
            out[i, src_pos[merged[i]]] = dst[i, dst_of[i]]
        return out

    kept = torch.cat([src_pos[unm], dst_pos.expand(b, -1)], dim=1)
    return merge, unmerge, kept


@pytest.mark.parametrize("seeded", [True, False])
@pytest.mark.parametrize("h,w,r", [(8, 8, 20), (6, 10, 7), (4, 4, 12)])
def test_merge_equals_tomesd_bipartite_soft_matching(seeded, h, w, r):
    """BipartiteMerge with a (1, 2, 2) cell is tomesd's bipartite_soft_matching_random2d with
    sx = sy = 2: same destinations from the same generator draws, same merged set, same means."""
    torch.manual_seed(0)
    x = torch.randn(2, h * w, 16)
    gen = (lambda: torch.Generator().manual_seed(3)) if seeded else (lambda: None)
    ours = BipartiteMerge(x, (1, h, w), (1, 2, 2), r, gen())
    merge, unmerge, kept = _tomesd_bipartite_random2d(x, w, h, 2, 2, r, gen())
    y_ours, y_ref = ours.reduce(x), merge(x)
    assert y_ours.shape == y_ref.shape == (2, h * w - r, 16)
    # same tokens survive; outputs are equal once both are put in grid-position order
    for i in range(2):
        a, b = ours.kept_positions[i].argsort(), kept[i].argsort()
        torch.testing.assert_close(ours.kept_positions[i][a], kept[i][b])
        torch.testing.assert_close(y_ours[i][a], y_ref[i][b])
    torch.testing.assert_close(ours.expand(y_ours), unmerge(y_ref))
