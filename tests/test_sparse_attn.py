"""SVG2 semantic sparse attention: config, k-means, selection, backends, exactness limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmaccel.sparse_attn import (
    SparseAttentionState,
    SVG2Config,
    cluster_sparse_attention,
    flex_attention_available,
    kmeans,
    mask_density,
    select_clusters,
    semantic_sparse_attention,
)
from mmaccel.sparse_attn.backends import (
    ClusterLayout,
    PaddedLayout,
    flex_block_sparse,
    masked_block_sparse,
    reference_block_sparse,
)
from mmaccel.sparse_attn.kmeans import assign, inertia, random_init


def _qkv(b=1, h=2, s=96, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=dtype) for _ in range(3))


def _clustered(s=128, h=2, d=16, groups=4, seed=0):
    """Q/K with real cluster structure: token = group mean + small noise (groups interleaved)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, groups, (s,), generator=g)
    mu = 3 * torch.randn(h, groups, d, generator=g)
    q = mu[:, labels] + 0.3 * torch.randn(h, s, d, generator=g)
    k = mu[:, labels] + 0.3 * torch.randn(h, s, d, generator=g)
    v = torch.randn(h, s, d, generator=g)
    return q[None], k[None], v[None]


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_p=float("nan")), ValueError, "top_p"),
        (dict(top_p="0.9"), TypeError, "top_p"),
        (dict(min_kc_ratio=-0.1), ValueError, "min_kc_ratio"),
        (dict(num_q_clusters=0), ValueError, "num_q_clusters"),
        (dict(num_k_clusters=2.5), TypeError, "num_k_clusters"),
        (dict(kmeans_iters=0), ValueError, "kmeans_iters"),
        (dict(dense_steps=1.2), ValueError, "dense_steps"),
        (dict(dense_layers=-1), ValueError, "dense_layers"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(block_size=48), ValueError, "block_size"),
        (dict(kmeans_tol=-1.0), ValueError, "kmeans_tol"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        SVG2Config(**kwargs)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        SVG2Config().top_p = 0.5


@pytest.mark.parametrize(
    "mutate, exc, word",
    [
        (lambda q, k, v: (q, k[:, :1], v[:, :1]), ValueError, "shapes"),
        (lambda q, k, v: (q, k[..., :8], v), ValueError, "shapes"),
        (lambda q, k, v: (q, k, v[:, :, :10]), ValueError, "shapes"),
        (lambda q, k, v: (q.double(), k, v), TypeError, "dtype"),
        (lambda q, k, v: (q[0], k[0], v[0]), ValueError, "batch, heads, tokens"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "floating"),
    ],
)
def test_bad_inputs_raise(mutate, exc, word):
    q, k, v = mutate(*_qkv())
    with pytest.raises(exc, match=word):
        semantic_sparse_attention(q, k, v, SVG2Config(num_q_clusters=4, num_k_clusters=4))


def test_more_clusters_than_tokens_raises():
    q, k, v = _qkv(s=16)
    with pytest.raises(ValueError, match="num_k_clusters=32 exceeds the 16 key tokens"):
        semantic_sparse_attention(q, k, v, SVG2Config(num_q_clusters=4, num_k_clusters=32))
    with pytest.raises(ValueError, match="num_q_clusters"):
        semantic_sparse_attention(q, k, v, SVG2Config(num_q_clusters=17, num_k_clusters=4))


# -- k-means -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_warm_kmeans_never_increases_inertia(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 200, 8, generator=g)
    init = random_init(x, 10, g)
    before = inertia(x, assign(x, init), init)
    prev = before
    centroids = init
    for _ in range(4):  # repeated warm starts, one iteration each
        res = kmeans(x, 10, init=centroids, iterations=1, tol=0.0)
        now = inertia(x, res.labels, res.centroids)
        assert (now <= prev * (1 + 1e-6)).all()
        prev, centroids = now, res.centroids
    assert (prev < before).all()


def test_kmeans_counts_labels_and_empty_clusters():
    x = torch.randn(2, 50, 4)
    far = torch.full((2, 1, 4), 1e3)  # a centroid no token is near: stays empty, keeps its place
    init = torch.cat([x[:, :3], far], 1)
    res = kmeans(x, 4, init=init, iterations=3)
    assert torch.equal(res.counts.sum(-1), torch.tensor([50, 50]))
    assert torch.equal(res.counts[:, 3], torch.zeros(2, dtype=torch.long))
    assert torch.equal(res.centroids[:, 3], far[:, 0])
    for c in range(3):  # centroids are the means of the labelled tokens
        m = res.labels[0] == c
        torch.testing.assert_close(res.centroids[0, c], x[0, m].mean(0))


def test_kmeans_early_stop_and_bad_init():
    x = torch.randn(1, 40, 4)
    converged = kmeans(x, 3, iterations=100, tol=1e-6).centroids
    assert kmeans(x, 3, init=converged, iterations=50, tol=1e-6).iterations == 1
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(x, 3, init=converged[:, :2])
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 41)


# -- selection -----------------------------------------------------------------------------


def test_select_clusters_top_p_and_min_keep():
    g = torch.Generator().manual_seed(0)
    cq, ck = torch.randn(2, 5, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    counts = torch.randint(1, 10, (2, 12), generator=g)
    counts[:, 0] = 0  # an empty key cluster carries no mass
    sel = select_clusters(cq, ck, counts, 0.6, 0.0)
    logits = cq @ ck.transpose(1, 2) / math.sqrt(8) + counts.float().log()[:, None]
    probs = logits.softmax(-1)
    kept = (probs * sel).sum(-1)
    assert (kept >= 0.6 - 1e-6).all()
    # minimal: dropping the least probable kept cluster falls below top_p
    least = torch.where(sel, probs, torch.inf).min(-1).values
    assert (kept - least < 0.6).all()
    assert not sel[..., 0].any()
    wide = select_clusters(cq, ck, counts, 0.01, 0.5)
    assert (wide.sum(-1) >= 6).all()


def test_density_is_mask_weighted():
    sel = torch.tensor([[[True, False], [False, False]]])
    assert mask_density(sel, torch.tensor([[3, 1]]), torch.tensor([[2, 6]])) == pytest.approx(6 / 32)


# -- backends ------------------------------------------------------------------------------


def _random_problem(seed, b=1, h=2, sq=128, sk=128, cq=8, ck=8, d=16, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for s in (sq, sk, sk))
    ql = torch.randint(0, cq, (b, h, sq), generator=g)
    kl = torch.randint(0, ck, (b, h, sk), generator=g)
    kl[..., kl[0, 0] == ck - 1] = 0  # key cluster ck-1 is empty
    counts = lambda lab, c: F.one_hot(lab, c).sum(-2)  # noqa: E731
    sel = torch.rand(b, h, cq, ck, generator=g) < 0.4
    if empty_row:
        sel[:, :, 0] = False  # query cluster 0 attends nothing -> zeros
    layout = ClusterLayout(ql, kl, counts(ql, cq), counts(kl, ck))
    return q, k, v, layout, sel


@pytest.mark.parametrize("seed", range(3))
def test_masked_equals_reference_on_random_masks(seed):
    q, k, v, layout, sel = _random_problem(seed)
    ref = reference_block_sparse(q, k, v, layout, sel)
    torch.testing.assert_close(masked_block_sparse(q, k, v, layout, sel), ref)
    assert torch.equal(ref[layout.q_labels == 0], torch.zeros_like(ref[layout.q_labels == 0]))


def test_padded_layout_is_an_exact_permutation():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (3, 50), generator=g)
    labels[1] = labels[1].clamp_max(3)  # some empty clusters
    counts = F.one_hot(labels, 6).sum(1)
    x = torch.randn(3, 50, 4, generator=g)
    pl = PaddedLayout(labels, counts, 8)
    padded = pl.scatter(x)
    assert torch.equal(pl.gather(padded), x)  # inverse is exact
    assert pl.length % 8 == 0 and pl.valid.sum() == 150
    assert torch.equal(padded[~pl.valid], torch.zeros_like(padded[~pl.valid]))
    # every block holds tokens of one cluster only, clusters in label order
    block_of_token = pl.positions // 8
    for n in range(3):
        assert torch.equal(pl.block_cluster[n][block_of_token[n]], labels[n])
        assert torch.equal(pl.block_cluster[n], pl.block_cluster[n].sort().values)


# -- the full operator ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "masked"])
def test_full_budget_equals_dense(backend):
    q, k, v = _qkv(b=2, s=80)
    cfg = SVG2Config(num_q_clusters=6, num_k_clusters=10, top_p=1.0, min_kc_ratio=1.0, backend=backend)
    state = SparseAttentionState()
    out = semantic_sparse_attention(q, k, v, cfg, state)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert state.last.density == 1.0 and state.last.backend == backend


@pytest.mark.skipif(not flex_attention_available(), reason="flex_attention not in this torch")
def test_flex_backend_matches_reference_and_dense():
    """One shape throughout (S=128, 8 + 8 clusters, block 16), so flex compiles once."""
    for seed in range(2):  # random inputs, random cluster masks (one query cluster selects nothing)
        q, k, v, layout, sel = _random_problem(seed)
        ref = reference_block_sparse(q, k, v, layout, sel)
        out, computed = flex_block_sparse(q, k, v, layout, sel, 16)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert computed > 0
    q, k, v = _clustered(s=128)
    dense = F.scaled_dot_product_attention(q, k, v)
    full = SVG2Config(
        num_q_clusters=8, num_k_clusters=8, top_p=1.0, min_kc_ratio=1.0, backend="flex", block_size=16
    )
    torch.testing.assert_close(semantic_sparse_attention(q, k, v, full), dense, atol=1e-5, rtol=1e-5)
    sparse = SVG2Config(
        num_q_clusters=8, num_k_clusters=8, top_p=0.5, min_kc_ratio=0.0, backend="flex", block_size=16
    )
    state = SparseAttentionState()
    out = semantic_sparse_attention(q, k, v, sparse, state)
    ref = semantic_sparse_attention(q, k, v, SVG2Config(**{**sparse.__dict__, "backend": "reference"}))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert state.last.backend == "flex" and state.last.block_density is not None


def test_semantic_beats_positional_on_clustered_inputs():
    q, k, v = _clustered(s=128, groups=4)
    dense = F.scaled_dot_product_attention(q, k, v)
    # more clusters than groups, so a random initialisation cannot merge two groups
    cfg = SVG2Config(num_q_clusters=8, num_k_clusters=8, top_p=0.95, min_kc_ratio=0.0, backend="masked")
    state = SparseAttentionState()
    sem = semantic_sparse_attention(q, k, v, cfg, state)
    pos_labels = (torch.arange(128) * 8 // 128).expand(1, 2, 128)
    pos, info = cluster_sparse_attention(q, k, v, pos_labels, pos_labels, cfg)
    err = lambda o: ((o - dense).norm() / dense.norm()).item()  # noqa: E731
    assert err(sem) < 0.1 and err(sem) < 0.5 * err(pos)  # lower error ...
    assert state.last.density < 0.5 and state.last.density <= info.density  # ... at no more density


def test_warm_start_state():
    q, k, v = _clustered(s=96)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, kmeans_iters=2, backend="masked")
    state = SparseAttentionState()
    semantic_sparse_attention(q, k, v, cfg, state)
    assert not state.last.warm_start
    semantic_sparse_attention(q + 0.01, k, v, cfg, state)
    assert state.last.warm_start and max(state.last.kmeans_iterations) <= 2
    semantic_sparse_attention(q[:, :1], k[:, :1], v[:, :1], cfg, state)  # other shape: cold start
    assert not state.last.warm_start
    state.reset()
    assert state.q_centroids is None and state.calls == 0


def test_bfloat16_inputs_keep_dtype():
    q, k, v = _qkv(s=64, dtype=torch.bfloat16)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=4, top_p=1.0, min_kc_ratio=1.0, backend="masked")
    out = semantic_sparse_attention(q, k, v, cfg)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-2, rtol=2e-2)


def test_dense_prefix_for_joint_text_video_attention():
    q, k, v = _clustered(s=100)
    n = 12  # "text" tokens first
    dense = F.scaled_dot_product_attention(q, k, v)
    full = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=1.0, min_kc_ratio=1.0, backend="masked")
    torch.testing.assert_close(
        semantic_sparse_attention(q, k, v, full, dense_prefix=n), dense, atol=1e-5, rtol=1e-5
    )
    sparse = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.3, min_kc_ratio=0.0, backend="reference")
    state = SparseAttentionState()
    out = semantic_sparse_attention(q, k, v, sparse, state, dense_prefix=n)
    torch.testing.assert_close(out[:, :, :n], dense[:, :, :n])  # text queries: dense
    assert state.k_labels.shape == (2, 100 - n)  # only video tokens are clustered
    # a video query sees every text key plus its selected video clusters
    bh, i = 0, n + 5
    keys = torch.cat(
        [torch.ones(n, dtype=torch.bool), state.selected[bh, state.q_labels[bh, i - n]][state.k_labels[bh]]]
    )
    expect = F.scaled_dot_product_attention(q[0, 0, i : i + 1], k[0, 0, keys], v[0, 0, keys])
    torch.testing.assert_close(out[0, 0, i : i + 1], expect)
    assert (n * 100 * 2 - n * n) / 100**2 < state.last.density < 1
    with pytest.raises(ValueError, match="dense_prefix"):
        semantic_sparse_attention(q, k[:, :, :50], v[:, :, :50], sparse, dense_prefix=n)
    with pytest.raises(ValueError, match="num_k_clusters=6 exceeds the 4 key tokens"):
        semantic_sparse_attention(q, k, v, sparse, dense_prefix=96)


def test_flex_tiles_divide_the_block_on_cuda_and_defer_elsewhere():
    """Inductor's default flex tiles (128 x 64 on Hopper) refuse a 32-token BlockMask; on CUDA the
    tiles follow the block below 128 (first H200 run, 2026-12-04), elsewhere inductor chooses."""
    from mmaccel.sparse_attn.backends import flex_tiles

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for block in (16, 32, 64, 128, 256):
        tiles = flex_tiles(block, cuda)
        if block >= 128:
            assert tiles is None
        else:
            assert block % tiles["BLOCK_M"] == 0 and block % tiles["BLOCK_N"] == 0 and tiles["BLOCK_N"] <= 64
        assert flex_tiles(block, cpu) is None
