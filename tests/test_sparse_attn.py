"""SVG2 semantic sparse attention: config, k-means, selection, backends, exactness limits."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mmaccel.runtime.budget import top_p_mask
from mmaccel.sparse_attn import (
    PRESETS,
    SparseAttentionState,
    SVG2Config,
    cluster_sparse_attention,
    flex_attention_available,
    kmeans,
    mask_density,
    select_clusters,
    semantic_sparse_attention,
    tile_cluster_counts,
)
from mmaccel.sparse_attn.backends import (
    ClusterLayout,
    TileSide,
    flex_block_sparse,
    flex_kernel_options,
    masked_block_sparse,
    reference_block_sparse,
    tile_selection,
)
from mmaccel.sparse_attn.kmeans import assign, inertia, kmeans_rounds, random_init
from mmaccel.sparse_attn.svg2 import _top_p_on_device


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
        (dict(q_block_size=48), ValueError, "q_block_size"),
        (dict(kv_block_size=8), ValueError, "kv_block_size"),
        (dict(layout="tile"), ValueError, "layout"),
        (dict(flex_kernel="cudnn"), ValueError, "flex_kernel"),
        (dict(flex_kernel="flash", kv_block_size=64), ValueError, "flex_kernel='flash' needs"),
        (dict(kmeans_backend="faiss"), ValueError, "kmeans_backend"),
        (dict(profile=1), TypeError, "profile"),
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


def test_kmeans_runs_its_iterations_without_reading_the_device():
    """Default: no tolerance, every iteration runs, and nothing is read back to the host."""
    from mmaccel.testing.hotpath import count_hot_path

    x = torch.randn(2, 60, 4)
    init = random_init(x, 5, torch.Generator().manual_seed(0))
    res = kmeans(x, 5, init=init, iterations=7)
    assert res.iterations == 7
    assert count_hot_path(lambda: kmeans(x, 5, init=init, iterations=7)).syncs == 0
    assert count_hot_path(lambda: kmeans(x, 5, init=init, iterations=7, tol=1e-6)).sync_counts["item"] >= 1
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 5, backend="sklearn")
    with pytest.raises(RuntimeError, match="flash-kmeans"):  # CPU tensors: refused, never a silent fallback
        kmeans(x, 5, init=init, backend="flash_kmeans")


def test_kmeans_early_stop_and_bad_init():
    x = torch.randn(1, 40, 4)
    converged = kmeans(x, 3, iterations=100, tol=1e-6).centroids
    assert kmeans(x, 3, init=converged, iterations=50, tol=1e-6).iterations == 1
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(x, 3, init=converged[:, :2])
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 41)


def _start_and_run(x, cold, idx, stored, rounds, tol):
    """What a compiled SVG2 call does with a `KMeansStart`'s tensors."""
    init = torch.where(cold, torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])), stored)
    res = kmeans_rounds(x, init, rounds, tol=tol)
    return res.labels, res.centroids, res.counts


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("tol", [None, 1e-6])
def test_kmeans_rounds_is_one_compiled_program_for_cold_and_warm_starts(backend, tol):
    """`kmeans_rounds` takes the round count as data: under ``torch.compile(fullgraph=True)`` a
    cold start (50 rounds from drawn tokens) and a warm one (2 rounds from the stored centroids)
    are one program (no recompile) and equal eager `kmeans` with those host counts; with ``tol``
    the loop stops where eager's stops. Eager `kmeans_rounds` is `kmeans`."""
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(4, 64, 8, generator=g), torch.randn(4, 64, 8, generator=g)
    idx = torch.rand(4, 64, generator=g).argsort(1)[:, :6].contiguous()
    drawn = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, 8))
    cold = kmeans(x, 6, init=drawn, iterations=50, tol=tol)
    warm = kmeans(x2, 6, init=cold.centroids, iterations=2, tol=tol)
    assert cold.iterations < 50 if tol else cold.iterations == 50  # the early stop is exercised
    again = kmeans_rounds(x, drawn, torch.tensor(50), tol=tol)
    assert torch.equal(again.labels, cold.labels) and again.iterations == cold.iterations
    torch._dynamo.reset()
    compiled = torch.compile(_start_and_run, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for got, want in (
            (compiled(x, torch.tensor(True), idx, torch.zeros(4, 6, 8), torch.tensor(50), tol), cold),
            (compiled(x2, torch.tensor(False), idx, cold.centroids, torch.tensor(2), tol), warm),
        ):
            assert torch.equal(got[0], want.labels) and torch.equal(got[2], want.counts)
            torch.testing.assert_close(got[1], want.centroids)
    torch._dynamo.reset()


def test_kmeans_rounds_bad_inputs():
    x = torch.randn(2, 10, 4)
    with pytest.raises(TypeError, match="iterations must be a 0-d integer tensor"):
        kmeans_rounds(x, x[:, :3], 2)
    with pytest.raises(TypeError, match="iterations must be a 0-d integer tensor"):
        kmeans_rounds(x, x[:, :3], torch.tensor(2.0))
    with pytest.raises(TypeError, match="iterations must be a 0-d integer tensor"):
        kmeans_rounds(x, x[:, :3], torch.tensor([2]))
    with pytest.raises(ValueError, match="init"):
        kmeans_rounds(x, x[:1, :3], torch.tensor(2))


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


@pytest.mark.parametrize("seed", range(3))
def test_device_top_p_equals_the_budget_top_p(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 40, generator=g) * 3
    for p, keep in ((0.9, 1), (0.5, 4), (1.0, 1)):
        assert torch.equal(_top_p_on_device(logits, p, keep), top_p_mask(logits, p, min_keep=keep))


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


@pytest.mark.parametrize("padded", [False, True])
def test_tile_side_is_an_exact_permutation(padded):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (3, 50), generator=g)
    labels[1] = labels[1].clamp_max(3)  # some empty clusters
    counts = F.one_hot(labels, 6).sum(1)
    x = torch.randn(3, 50, 4, generator=g)
    side = TileSide(labels, counts, 8, padded)
    slots = side.scatter(x)
    assert torch.equal(side.gather(slots), x)  # inverse is exact
    assert side.length % 8 == 0 and (side.length == 56) != padded
    filled = torch.zeros(3, side.length, dtype=torch.bool).scatter_(1, side.positions, True)
    assert torch.equal(side.valid, filled)
    assert torch.equal(side.tokens.gather(1, side.positions), torch.arange(50).expand(3, -1))  # slot -> token
    assert torch.equal(slots[~filled], x[:, :1].expand(-1, side.length, -1)[~filled])  # empty: token 0's row
    assert torch.equal(side.mask_labels.gather(1, side.positions), labels)  # the mask reads each token's label
    assert (side.mask_labels[~filled] == 6).all()  # empty slots: the tail label, never selected
    assert torch.equal(side.clean, (side.mask_labels < 6).view(3, -1, 8).all(-1))  # no dropped slot in the tile
    tile = side.positions // 8
    for n in range(3):  # clusters in label order; a tile's range holds all its tokens' labels
        assert (side.lo[n][tile[n]] <= labels[n]).all() and (labels[n] <= side.hi[n][tile[n]]).all()
        assert torch.equal(side.lo[n], side.lo[n].sort().values)
        if padded:  # one cluster per tile
            assert torch.equal(side.lo[n], side.hi[n])


@pytest.mark.parametrize("padded", [False, True])
def test_tile_selection_equals_brute_force(padded):
    """A tile is computed iff a token pair in it is allowed, and full iff every pair is."""
    q, k, v, layout, sel = _random_problem(1, sq=100, sk=90, cq=5, ck=7)
    n = 2
    qs = TileSide(layout.q_labels.reshape(n, -1), layout.q_counts.reshape(n, -1), 16, padded, pad_mask=False)
    ks = TileSide(layout.k_labels.reshape(n, -1), layout.k_counts.reshape(n, -1), 8, padded)
    selected = sel.reshape(n, 5, 7)
    partial, full = tile_selection(selected, qs, ks)
    table = F.pad(selected, (0, 1, 0, 1))
    rows = torch.arange(n).view(n, 1, 1)
    allowed = table[rows, qs.mask_labels.unsqueeze(-1), ks.mask_labels.unsqueeze(-2)]  # (n, Lq, Lk)
    blocks = allowed.view(n, qs.length // 16, 16, ks.length // 8, 8)
    any_pair = blocks.any(4).any(2)
    if padded:  # padded query rows attend like their cluster: computed, dropped
        assert torch.equal(partial | full, any_pair)
    else:
        assert torch.equal(partial | full, any_pair)
        assert torch.equal(full, blocks.all(4).all(2))
    assert not (partial & full).any()
    assert (blocks.all(4).all(2) | ~full).all()  # a full tile never needs the mask


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
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("tiles", [(128, 64), (128, 128), (32, 16)])
def test_flex_backend_matches_reference(padded, tiles):
    """Both layouts at the hardware tiles (128 x 64, 128 x 128) and at small tiles (several tiles
    and partial ones on this size): equal to the reference within fp32 rounding, on random
    inputs and random cluster masks (one query cluster selects nothing, one key cluster empty),
    Sq != Sk."""
    for seed in range(2):
        q, k, v, layout, sel = _random_problem(seed, sq=300, sk=260, cq=5, ck=9)
        ref = reference_block_sparse(q, k, v, layout, sel)
        out, computed = flex_block_sparse(q, k, v, layout, sel, *tiles, padded)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert computed.ndim == 0 and computed > 0


@pytest.mark.skipif(not flex_attention_available(), reason="flex_attention not in this torch")
def test_flex_kernel_never_falls_back_to_eager_at_the_recompile_limit(monkeypatch):
    """Eager flex_attention ignores the BlockMask's block selection (the padded layout's cluster
    selection): a process that has compiled the kernel for as many shapes as dynamo allows raises
    instead of returning unselected clusters' attention (it did, past 8 variants)."""
    from mmaccel.sparse_attn import backends

    torch._dynamo.reset()
    monkeypatch.setattr(backends, "FLEX_RECOMPILE_LIMIT", 2)
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            for i, sq in enumerate((300, 280, 260)):
                q, k, v, layout, sel = _random_problem(0, sq=sq, sk=260, cq=5, ck=9)
                if i < 2:  # two variants compile
                    out, _ = flex_block_sparse(q, k, v, layout, sel, 32, 16, True)
                    torch.testing.assert_close(out, reference_block_sparse(q, k, v, layout, sel), atol=1e-5, rtol=1e-5)
                    continue
                with pytest.raises(RuntimeError, match="eager flex_attention would ignore the block selection"):
                    flex_block_sparse(q, k, v, layout, sel, 32, 16, True)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(not flex_attention_available(), reason="flex_attention not in this torch")
@pytest.mark.parametrize("layout", ["unpadded", "padded"])
def test_flex_operator_matches_reference_and_dense(layout):
    q, k, v = _clustered(s=256)
    dense = F.scaled_dot_product_attention(q, k, v)
    base = dict(num_q_clusters=8, num_k_clusters=8, backend="flex", layout=layout, kmeans_init_iters=5)
    full = SVG2Config(top_p=1.0, min_kc_ratio=1.0, **base)
    torch.testing.assert_close(semantic_sparse_attention(q, k, v, full), dense, atol=1e-5, rtol=1e-5)
    sparse = SVG2Config(top_p=0.5, min_kc_ratio=0.0, **base)
    state = SparseAttentionState()
    out = semantic_sparse_attention(q, k, v, sparse, state)
    ref = semantic_sparse_attention(q, k, v, SVG2Config(**{**sparse.__dict__, "backend": "reference"}))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert state.last.backend == "flex" and state.last.block_density >= state.last.density
    assert state.last.kmeans_s is None  # timings only when asked


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


def test_flex_kernel_options_keep_hopper_tiles_and_check_flash():
    """Inductor's Hopper tiles (128 x 64) are kept when they divide the BlockMask's blocks; smaller
    blocks get tiles that divide them (first H200 run, 2026-12-04); off CUDA inductor chooses.
    The FLASH kernel needs CUDA, the flash-attn-4 wheel and 128 x 128 blocks: refused otherwise."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert flex_kernel_options(128, 64, cuda) is None and flex_kernel_options(128, 128, cuda) is None
    for qb, kb in ((16, 16), (32, 32), (64, 64), (128, 32)):
        tiles = flex_kernel_options(qb, kb, cuda)
        assert qb % tiles["BLOCK_M"] == 0 and kb % tiles["BLOCK_N"] == 0 and tiles["BLOCK_N"] <= 64
        assert flex_kernel_options(qb, kb, cpu) is None
    with pytest.raises(RuntimeError, match="flash-attn-4"):
        flex_kernel_options(128, 128, cpu, "flash")
    with pytest.raises(ValueError, match="flex_kernel"):
        flex_kernel_options(128, 128, cpu, "cudnn")


def test_presets_are_the_authors_settings():
    wan14 = SVG2Config.preset("wan2.1-14b-720p")
    assert PRESETS["wan2.1-14b-720p"].tokens == 75_600
    assert (wan14.num_q_clusters, wan14.num_k_clusters, wan14.top_p) == (300, 1000, 0.9)
    assert (wan14.dense_steps, wan14.dense_layers, wan14.min_kc_ratio) == (0.2, 0.03, 0.1)
    assert PRESETS["wan2.1-1.3b-480p"].tokens == 32_760
    hunyuan = SVG2Config.preset("hunyuanvideo-720p", backend="flex")
    assert (hunyuan.num_q_clusters, hunyuan.dense_steps, hunyuan.backend) == (400, 0.1, "flex")
    assert (wan14.q_block_size, wan14.kv_block_size) == (128, 64)
    with pytest.raises(ValueError, match="preset must be one of"):
        SVG2Config.preset("wan2.2")
    # our option: cluster counts sized to the tiles (at most ~25% padding); 14B 720p keeps ~300 query clusters
    assert tile_cluster_counts(32_760, 128, 64) == (128, 260)
    sized = SVG2Config.preset("wan2.1-14b-720p", tile_sized=True)
    assert (sized.num_q_clusters, sized.num_k_clusters, sized.top_p) == (297, 600, 0.9)
    with pytest.raises(ValueError, match="max_padding"):
        tile_cluster_counts(1000, 128, 64, max_padding=0.0)


@pytest.mark.skipif(not flex_attention_available(), reason="flex_attention not in this torch")
@pytest.mark.parametrize("layout", ["unpadded", "padded", "tiles"])
def test_warm_sparse_step_reads_nothing_back(layout, monkeypatch):
    """A warm SVG2 step (k-means, selection, tile layout, BlockMask, kernel, un-permute, density)
    makes 0 host-device syncs by the hot-path counter. The compiled flex kernel itself runs
    outside the counter (a dispatch mode cannot trace a compiled higher-order op); it is one
    fused kernel with no host read."""
    from torch.utils._python_dispatch import _disable_current_modes

    from mmaccel.sparse_attn import backends
    from mmaccel.testing.hotpath import count_hot_path

    kernel = backends.compiled_flex()

    def outside_the_counter(*args, **kwargs):
        with _disable_current_modes():
            return kernel(*args, **kwargs)

    monkeypatch.setattr(backends, "compiled_flex", lambda: outside_the_counter)
    q, k, v = _clustered(s=256)
    config = SVG2Config(num_q_clusters=8, num_k_clusters=16, backend="flex", layout=layout, kmeans_init_iters=3)
    state = SparseAttentionState()
    semantic_sparse_attention(q, k, v, config, state)  # cold start
    semantic_sparse_attention(q, k, v, config, state)  # warm-up of the warm path
    counter = count_hot_path(lambda: semantic_sparse_attention(q + 0.01, k, v, config, state))
    assert counter.syncs == 0, counter.sync_counts
    assert state.last.warm_start
    profiled = count_hot_path(lambda: semantic_sparse_attention(q, k, v, replace(config, profile=True), state))
    assert state.last.kmeans_s is not None and state.last.attention_s is not None
    assert profiled.syncs == 0  # on the CPU profiling only reads the clock (a GPU would synchronise)


def test_tile_sized_preset_computes_at_most_one_and_a_half_times_the_density():
    """At the Wan 1.3B 480p preset (32,760 tokens, one head of the benchmark's video-like Q/K),
    tile-sized clusters in the padded 128 x 64 layout pad each side by at most ~25% and compute at
    most 1.5x the exact mask-weighted density (the benchmark's table covers every preset)."""
    from mmaccel.benchmarks.bench_sparse_attn import local_qkv

    preset = PRESETS["wan2.1-1.3b-480p"]
    config = SVG2Config.preset("wan2.1-1.3b-480p", tile_sized=True)
    q, k, _ = local_qkv(*preset.grid, 1, preset.head_dim, num_objects=64)
    gen = torch.Generator().manual_seed(0)
    kq = kmeans(q[0], config.num_q_clusters, init=random_init(q[0], config.num_q_clusters, gen), iterations=3)
    kk = kmeans(k[0], config.num_k_clusters, init=random_init(k[0], config.num_k_clusters, gen), iterations=3)
    sel = select_clusters(kq.centroids, kk.centroids, kk.counts, config.top_p, config.min_kc_ratio)
    density = mask_density(sel, kq.counts, kk.counts)
    qs = TileSide(kq.labels, kq.counts, 128, True, pad_mask=False)
    ks = TileSide(kk.labels, kk.counts, 64, True)
    for counts, block in ((kq.counts, 128), (kk.counts, 64)):
        assert (-(-counts // block) * block).sum() <= 1.27 * preset.tokens  # padding ~25% at most
    partial, full = tile_selection(sel, qs, ks)
    computed = (partial | full).sum().item() * 128 * 64 / preset.tokens**2
    assert 0.05 < density < computed <= 1.5 * density


def test_cold_start_draw_is_the_seeded_random_tokens_drawn_in_the_call_or_ahead():
    """A cold start's centroids are the seeded random tokens (`random_init` with the generator
    seeded once, the query draw first): drawn in the call (`_initial_centroids`) or ahead from
    the draw's key (`_draw_indices`, what `apply_svg2`'s pre-forward hook puts in a `KMeansStart`)."""
    from mmaccel.sparse_attn.svg2 import _draw_indices, _draw_key, _gather, _initial_centroids

    q, k, _ = _qkv(b=2, h=3, s=40)
    xq, xk = q.reshape(6, 40, -1), k.reshape(6, 40, -1)
    gen = torch.Generator().manual_seed(7)
    want = [random_init(xq, 4, gen), random_init(xk, 5, gen)]
    for got, ref in zip(_initial_centroids([(xq, 4), (xk, 5)], 7), want, strict=True):
        assert torch.equal(got, ref)
    ahead = _draw_indices(_draw_key([(6, 40, 4), (6, 40, 5)], 7, None))
    for x, idx, ref in zip((xq, xk), ahead, want, strict=True):
        assert torch.equal(_gather(x, idx), ref)
    assert not torch.equal(_draw_indices(_draw_key([(6, 40, 4)], 8, None))[0], ahead[0])
    # one rank's share of the heads draws those heads' rows of the one-process draw
    share = _initial_centroids([(xq[1::3].contiguous(), 4)], 7, (1, 1, 3))[0]
    assert torch.equal(share, want[0][1::3])


def test_export_of_a_direct_call_takes_its_cold_start_draw_as_constants():
    """``torch.export`` of a module calling `semantic_sparse_attention` itself (no pre-forward
    hook, a fresh state: a cold start): the draw is made outside the trace, so it enters the
    program as constants and every call equals the eager call; the state is not written."""
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, backend="masked",
                     kmeans_init_iters=5)  # fmt: skip
    state = SparseAttentionState()

    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return semantic_sparse_attention(q, k, v, cfg, state)

    q, k, v = _clustered(s=96)
    program = torch.export.export(Attention(), (q, k, v)).module()
    assert state.q_centroids is None and state.calls == 0
    want = semantic_sparse_attention(q, k, v, cfg, SparseAttentionState())
    for _ in range(2):
        torch.testing.assert_close(program(q, k, v), want)


def test_given_clustering_replaces_kmeans_and_leaves_the_state_alone():
    """``clustering=``: the output of the call that made it, no k-means, the state untouched;
    k-means' decisions carry no gradient (it clusters detached Q and K)."""
    from mmaccel.sparse_attn.svg2 import Clustering

    q, k, v = (x.requires_grad_() for x in _clustered(s=96))
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0, backend="masked")
    state = SparseAttentionState()
    out = semantic_sparse_attention(q, k, v, cfg, state)
    kept = state.clustering()
    assert not any(t.requires_grad for t in (state.q_centroids, state.k_centroids))
    centroids, calls = state.q_centroids, state.calls
    again = semantic_sparse_attention(q, k, v, cfg, state, clustering=kept)
    assert torch.equal(again, out) and state.q_centroids is centroids and state.calls == calls
    with pytest.raises(ValueError, match="clustering must have the shapes"):
        semantic_sparse_attention(q[:, :1], k[:, :1], v[:, :1], cfg, state, clustering=kept)
    with pytest.raises(TypeError, match="clustering must be a Clustering"):
        semantic_sparse_attention(q, k, v, cfg, state, clustering=tuple(kept.__dict__.values()))
    assert isinstance(kept, Clustering) and SparseAttentionState().clustering() is None
