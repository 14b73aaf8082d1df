"""SVG2's padding-free "tiles" layout: tile groups, tile-level selection, exactness, syncs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mmaccel.sparse_attn import (
    SparseAttentionState,
    SVG2Config,
    cluster_sparse_attention,
    flex_attention_available,
    mask_density,
    select_clusters,
    semantic_sparse_attention,
)
from mmaccel.sparse_attn.tile_select import num_tiles, query_tile_union, tile_groups

needs_flex = pytest.mark.skipif(not flex_attention_available(), reason="flex_attention not in this torch")


def _clustered(b=1, h=2, sq=256, sk=256, d=16, groups=5, seed=0):
    """Q/K = one of ``groups`` means + noise, groups interleaved in token order; V random."""
    g = torch.Generator().manual_seed(seed)
    mu = 3 * torch.randn(b, h, groups, d, generator=g)

    def tokens(s: int) -> torch.Tensor:
        labels = torch.randint(0, groups, (s,), generator=g)
        return mu[:, :, labels] + 0.5 * torch.randn(b, h, s, d, generator=g)

    return tokens(sq), tokens(sk), torch.randn(b, h, sk, d, generator=g)


def _brute_tiles(x: torch.Tensor, labels: torch.Tensor, block: int):
    """Independent transcription: per row, tokens sorted by (cluster, token index), tile j // block;
    also the set of clusters of each tile."""
    n, s, d = x.shape
    t = math.ceil(s / block)
    tiles = torch.empty(n, s, dtype=torch.long)
    counts = torch.zeros(n, t, dtype=torch.long)
    centroids = torch.zeros(n, t, d)
    clusters = [[set() for _ in range(t)] for _ in range(n)]
    for r in range(n):
        order = sorted(range(s), key=lambda i: (int(labels[r, i]), i))
        for j, i in enumerate(order):
            tiles[r, i] = j // block
            clusters[r][j // block].add(int(labels[r, i]))
        for tile in range(t):
            members = [order[j] for j in range(tile * block, min(s, (tile + 1) * block))]
            counts[r, tile] = len(members)
            centroids[r, tile] = x[r, members].mean(0)
    return tiles, counts, centroids, clusters


def _brute_union(selected: torch.Tensor, clusters: list[list[set[int]]]) -> torch.Tensor:
    """Per query tile: OR of the selection rows of the clusters it holds."""
    out = torch.zeros(selected.shape[0], len(clusters[0]), selected.shape[2], dtype=torch.bool)
    for r, row in enumerate(clusters):
        for t, members in enumerate(row):
            for c in members:
                out[r, t] |= selected[r, c]
    return out


def _masked_sdpa(q, k, v, q_tiles, k_tiles, selected):
    """Dense SDPA under the token mask ``selected[tile(query), tile(key)]`` (B*H rows)."""
    b, h = q.shape[:2]
    n = b * h
    rows = torch.arange(n).view(n, 1, 1)
    mask = selected[rows, q_tiles.view(n, -1, 1), k_tiles.view(n, 1, -1)].view(b, h, q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_tile_groups_equal_the_brute_force_tiles():
    g = torch.Generator().manual_seed(1)
    for s, block in ((200, 64), (256, 128), (37, 16)):
        x = torch.randn(3, s, 8, generator=g)
        labels = torch.randint(0, 6, (3, s), generator=g)
        labels[labels == 3] = 4  # cluster 3 is empty, between non-empty ones
        got = tile_groups(x, labels, block)
        tiles, counts, centroids, clusters = _brute_tiles(x, labels, block)
        assert torch.equal(got.labels, tiles) and torch.equal(got.counts, counts)
        torch.testing.assert_close(got.centroids, centroids, atol=1e-5, rtol=1e-5)
        sel = torch.rand(3, 7, 5, generator=g) < 0.3  # empty clusters' rows must not count
        sel[:, 3] = True
        cluster_counts = torch.stack([torch.bincount(row, minlength=7) for row in labels])
        assert torch.equal(query_tile_union(sel, got, cluster_counts), _brute_union(sel, clusters))
        assert tile_groups(x, labels, block, centroids=False).centroids is None
    assert num_tiles(300, 128) == 3 and num_tiles(256, 128) == 2
    with pytest.raises(ValueError, match="block"):
        num_tiles(10, 0)
    with pytest.raises(ValueError, match="cluster_labels"):
        tile_groups(x, labels[:, :5], 16)


def test_config_accepts_the_tiles_layout():
    assert SVG2Config(layout="tiles").layout == "tiles"
    assert SVG2Config().layout == "padded"  # the default stays the authors' cluster rule


@needs_flex
@pytest.mark.parametrize(
    "b, h, sq, sk, blocks",
    [
        (1, 2, 256, 256, (128, 64)),
        (2, 2, 300, 260, (128, 64)),
        (1, 3, 200, 330, (32, 16)),
        (2, 1, 384, 384, (128, 128)),
    ],
)
def test_tiles_equal_masked_sdpa_of_the_tile_selection(b, h, sq, sk, blocks):
    """S divisible by the tiles and not, batch x heads > 1, Sq != Sk: the flex output equals the
    masked SDPA of the tile-level selection (independent transcription of the tiles from the
    k-means labels) and the `reference` backend; the selection is SVG2's rule for query clusters
    against key tiles, united over each query tile's clusters."""
    q, k, v = _clustered(b, h, sq, sk)
    qb, kb = blocks
    cfg = SVG2Config(num_q_clusters=5, num_k_clusters=7, top_p=0.6, min_kc_ratio=0.1, backend="flex", layout="tiles",
                     q_block_size=qb, kv_block_size=kb, kmeans_init_iters=4)  # fmt: skip
    state = SparseAttentionState()
    out = semantic_sparse_attention(q, k, v, cfg, state)
    # the same k-means (same seed and draw; the layout does not change it), as clusters
    clusters = SparseAttentionState()
    semantic_sparse_attention(q, k, v, replace(cfg, layout="unpadded", backend="masked"), clusters)
    n, d = b * h, q.shape[-1]
    qt, nq, _, members = _brute_tiles(q.reshape(n, sq, d), clusters.q_labels, qb)
    kt, nk, ck, _ = _brute_tiles(k.reshape(n, sk, d), clusters.k_labels, kb)
    assert torch.equal(state.q_labels, qt) and torch.equal(state.k_labels, kt)
    assert torch.equal(state.q_counts, nq) and torch.equal(state.k_counts, nk)
    assert torch.equal(state.q_centroids, clusters.q_centroids)  # the warm start keeps the k-means centroids
    by_cluster = select_clusters(clusters.q_centroids, ck, nk, cfg.top_p, cfg.min_kc_ratio)
    assert torch.equal(state.selected, _brute_union(by_cluster, members))
    assert state.last.density == pytest.approx(mask_density(state.selected, nq, nk))  # Sq != Sk too
    assert 0 < state.last.density < 1 and state.selected.shape == (n, num_tiles(sq, qb), num_tiles(sk, kb))
    torch.testing.assert_close(out, _masked_sdpa(q, k, v, qt, kt, state.selected), atol=1e-5, rtol=1e-5)
    ref = semantic_sparse_attention(q, k, v, replace(cfg, backend="reference"))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if sq % qb == 0 and sk % kb == 0:  # no short tile: computed tiles = exact density
        assert state.last.block_density == pytest.approx(state.last.density, abs=1e-12)
    else:
        assert state.last.block_density >= state.last.density


@needs_flex
@pytest.mark.parametrize("s", [256, 300])
def test_full_budget_tiles_equal_dense(s):
    q, k, v = _clustered(2, 2, s, s)
    cfg = SVG2Config(num_q_clusters=5, num_k_clusters=7, top_p=1.0, min_kc_ratio=1.0, backend="flex", layout="tiles",
                     kmeans_init_iters=3)  # fmt: skip
    state = SparseAttentionState()
    out = semantic_sparse_attention(q, k, v, cfg, state)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert state.last.density == pytest.approx(1.0)


def test_given_clusters_and_recompute_with_tiles():
    """`cluster_sparse_attention` with given labels tiles them; a kept clustering of the tiles
    layout replays the call (the checkpoint recompute's shapes are the tiles')."""
    q, k, v = _clustered(1, 2, 200, 200)
    g = torch.Generator().manual_seed(3)
    ql, kl = torch.randint(0, 4, (1, 2, 200), generator=g), torch.randint(0, 6, (1, 2, 200), generator=g)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, backend="masked", layout="tiles",
                     q_block_size=32, kv_block_size=16)  # fmt: skip
    out, info = cluster_sparse_attention(q, k, v, ql, kl, cfg)
    qt, _, _, members = _brute_tiles(q.reshape(2, 200, -1), ql.reshape(2, 200), 32)
    kt, nk, ck, _ = _brute_tiles(k.reshape(2, 200, -1), kl.reshape(2, 200), 16)
    cq = torch.stack([torch.stack([q.reshape(2, 200, -1)[r, ql.reshape(2, 200)[r] == c].mean(0) for c in range(4)])
                      for r in range(2)])  # fmt: skip
    sel = _brute_union(select_clusters(cq, ck, nk, 0.5, 0.0), members)
    torch.testing.assert_close(out, _masked_sdpa(q, k, v, qt, kt, sel), atol=1e-5, rtol=1e-5)
    assert 0 < float(info.density_tensor) < 1
    state = SparseAttentionState()
    first = semantic_sparse_attention(q, k, v, replace(cfg, kmeans_init_iters=3), state)
    again = semantic_sparse_attention(
        q, k, v, replace(cfg, kmeans_init_iters=3), state, clustering=state.clustering()
    )
    assert torch.equal(first, again)


def test_dense_prefix_with_tiles():
    """Joint text + video attention: text rows and columns dense, the video tiles sparse (138 video
    keys: the last video key tile is short, the text group follows it)."""
    q, k, v = _clustered(1, 2, 150, 150)
    n = 12
    dense = F.scaled_dot_product_attention(q, k, v)
    base = dict(num_q_clusters=4, num_k_clusters=6, layout="tiles", q_block_size=32, kv_block_size=16,
                kmeans_init_iters=3)  # fmt: skip
    full = SVG2Config(top_p=1.0, min_kc_ratio=1.0, backend="masked", **base)
    torch.testing.assert_close(
        semantic_sparse_attention(q, k, v, full, dense_prefix=n), dense, atol=1e-5, rtol=1e-5
    )
    state = SparseAttentionState()
    sparse = SVG2Config(top_p=0.4, min_kc_ratio=0.0, backend="reference", **base)
    out = semantic_sparse_attention(q, k, v, sparse, state, dense_prefix=n)
    torch.testing.assert_close(out[:, :, :n], dense[:, :, :n])
    i = n + 7  # a video query: every text key plus the tokens of its selected video key tiles
    keys = torch.cat(
        [torch.ones(n, dtype=torch.bool), state.selected[0, state.q_labels[0, i - n]][state.k_labels[0]]]
    )
    torch.testing.assert_close(out[0, 0, i], F.scaled_dot_product_attention(q[0, 0, i : i + 1], k[0, 0, keys],
                                                                            v[0, 0, keys])[0])  # fmt: skip
    if flex_attention_available():
        flex = semantic_sparse_attention(q, k, v, replace(sparse, backend="flex"), dense_prefix=n)
        torch.testing.assert_close(flex, out, atol=1e-5, rtol=1e-5)


@needs_flex
@pytest.mark.parametrize("s", [256, 200])
def test_one_group_per_tile_kernel_path_equals_the_general_one(s):
    """The tiles' lookup selection (and no partial tiles when the lengths are multiples of the
    blocks) gives the general unpadded path's output and computed fraction on tile labels."""
    from mmaccel.sparse_attn.backends import ClusterLayout, flex_block_sparse

    q, k, v = _clustered(2, 2, s, s)
    g = torch.Generator().manual_seed(5)
    n = 4
    tq = tile_groups(q.reshape(n, s, -1), torch.randint(0, 5, (n, s), generator=g), 32, centroids=False)
    tk = tile_groups(k.reshape(n, s, -1), torch.randint(0, 5, (n, s), generator=g), 16)
    sel = torch.rand(n, tq.counts.shape[1], tk.counts.shape[1], generator=g) < 0.3
    layout = ClusterLayout(*(x.view(2, 2, -1) for x in (tq.labels, tk.labels, tq.counts, tk.counts)))
    sel4 = sel.view(2, 2, *sel.shape[1:])
    general, computed = flex_block_sparse(q, k, v, layout, sel4, 32, 16)
    fast, fast_computed = flex_block_sparse(q, k, v, layout, sel4, 32, 16, one_group_per_tile=True)
    torch.testing.assert_close(fast, general, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast, _masked_sdpa(q, k, v, tq.labels, tk.labels, sel).nan_to_num(0.0))
    assert torch.equal(fast_computed, computed)
    with pytest.raises(ValueError, match="one_group_per_tile"):
        flex_block_sparse(q, k, v, layout, sel4, 32, 16, padded=True, one_group_per_tile=True)
