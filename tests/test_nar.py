"""Decoding orders, masks, NAR / raster / PAR-style decoding with and without KV cache, sampling, training."""

from __future__ import annotations

import pytest
import torch

from mmaccel.tokenizers_img.decoding import decode
from mmaccel.tokenizers_img.gpt import GPT, GPTConfig
from mmaccel.tokenizers_img.nar import generate_nar
from mmaccel.tokenizers_img.orders import (
    Schedule,
    group_mask,
    nar_schedule,
    par_schedule,
    proximity_mask,
    raster_schedule,
)
from mmaccel.tokenizers_img.raster import generate_raster
from mmaccel.tokenizers_img.sampling import SamplingConfig, sample_logits
from mmaccel.tokenizers_img.train_ar import TrainConfig, ar_loss, source_indices, teacher_forced_logits, train

TINY = dict(vocab_size=48, dim=32, n_layer=2, n_head=2, num_classes=4, multiple_of=16)
GREEDY = SamplingConfig(greedy=True)
GRIDS = [(1, 1), (1, 5), (4, 1), (3, 5), (5, 3), (6, 6)]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY)).eval()


def _cells(schedule: Schedule, idx: torch.Tensor) -> list[tuple[int, int]]:
    return [divmod(int(r), schedule.width) for r in idx]


# -- orders ------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("make", [raster_schedule, nar_schedule])
def test_order_visits_every_token_once_and_feeds_only_decoded(grid: tuple[int, int], make) -> None:
    schedule = make(*grid)
    h, w = grid
    assert schedule.forward_passes == (h + w - 1 if make is nar_schedule else h * w)
    targets = torch.cat([s.targets for s in schedule.steps])
    assert sorted(targets.tolist()) == list(range(h * w))
    decoded: set[int] = set()
    for step in schedule.steps:
        assert set(step.inputs.tolist()) <= decoded
        decoded |= set(step.targets.tolist())


@pytest.mark.parametrize("grid", GRIDS)
def test_nar_steps_are_diagonals_with_neighbour_heads(grid: tuple[int, int]) -> None:
    schedule = nar_schedule(*grid)
    for c, step in enumerate(schedule.steps):
        targets = _cells(schedule, step.targets)
        assert all(i + j == c for i, j in targets) and len(targets) == len({(i, j) for i, j in targets})
        assert len(targets) == sum(1 for i in range(grid[0]) for j in range(grid[1]) if i + j == c)
        if c == 0:
            assert step.row_src.tolist() == step.col_src.tolist() == [0]  # condition: mean of both heads
            continue
        fed = _cells(schedule, step.inputs)
        for (i, j), r, b in zip(targets, step.row_src.tolist(), step.col_src.tolist()):
            assert (r >= 0) == (j > 0) and (b >= 0) == (i > 0)
            if r >= 0:
                assert fed[r] == (i, j - 1)  # row head of the left neighbour
            if b >= 0:
                assert fed[b] == (i - 1, j)  # column head of the one above


def test_forward_counts_of_the_paper() -> None:
    assert nar_schedule(24, 24).forward_passes == 47
    assert raster_schedule(24, 24).forward_passes == 576
    assert par_schedule(24, 24).forward_passes == 147
    assert nar_schedule(16, 16).forward_passes == 31
    with pytest.raises(ValueError, match="divisible"):
        par_schedule(5, 6)
    with pytest.raises(ValueError, match="height"):
        nar_schedule(0, 4)
    with pytest.raises(TypeError, match="width"):
        raster_schedule(4, 2.0)


def test_proximity_mask_matches_its_definition() -> None:
    h, w, n_cond = 3, 4, 2
    mask = proximity_mask(h, w, n_cond)
    for q in range(n_cond + h * w):
        for k in range(n_cond + h * w):
            if q < n_cond:
                want = k <= q
            elif k < n_cond:
                want = True
            else:
                (qi, qj), (ki, kj) = divmod(q - n_cond, w), divmod(k - n_cond, w)
                want = ki + kj <= qi + qj
            assert bool(mask[q, k]) == want, (q, k)
    assert torch.equal(nar_schedule(h, w).mask(n_cond), mask)
    assert torch.equal(raster_schedule(h, w).mask(n_cond), torch.ones(14, 14, dtype=torch.bool).tril())


@pytest.mark.parametrize("make", [raster_schedule, nar_schedule, lambda h, w: par_schedule(h, w, 2)])
def test_inference_mask_shows_exactly_what_is_in_the_cache(make) -> None:
    """The training mask rows of the fed tokens never show an unwritten cache slot; for raster and
    NAR they select exactly the condition plus every token fed so far (nothing cached is hidden)."""
    schedule = make(4, 6)
    n_cond = 2
    mask = schedule.mask(n_cond)
    written = set(range(n_cond))
    for i, step in enumerate(schedule.steps):
        positions = list(range(n_cond)) if i == 0 else (step.inputs + n_cond).tolist()
        written |= set(positions)
        for p in positions:
            visible = set(torch.nonzero(mask[p]).flatten().tolist())
            if p >= n_cond:
                assert visible <= written, (schedule.name, i, p)
                if not schedule.name.startswith("par"):  # PAR's first block tokens see only earlier blocks
                    assert visible == written, (schedule.name, i, p)
            else:
                assert visible == set(range(p + 1))


def test_group_mask_is_the_training_mask() -> None:
    schedule = nar_schedule(3, 4)
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    assert torch.equal(group_mask((rows + cols).flatten(), 1), schedule.mask(1))


# -- decoding ------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(3, 5), (4, 2)])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_nar_with_cache_equals_without(model: GPT, grid: tuple[int, int], cfg_scale: float) -> None:
    sampling = SamplingConfig(greedy=True, cfg_scale=cfg_scale)
    cond = torch.tensor([0, 3])
    cached = generate_nar(model, cond, grid, sampling)
    plain = generate_nar(model, cond, grid, sampling, use_cache=False)
    assert cached.tokens.shape == (2, *grid)
    assert cached.forward_passes == sum(grid) - 1
    assert torch.equal(cached.tokens, plain.tokens)


def test_raster_with_cache_equals_without(model: GPT) -> None:
    sampling = SamplingConfig(greedy=True, cfg_scale=2.0)
    cond = torch.tensor([1, 2])
    cached = generate_raster(model, cond, (3, 4), sampling)
    assert cached.forward_passes == 12
    assert torch.equal(cached.tokens, generate_raster(model, cond, (3, 4), sampling, use_cache=False).tokens)


def test_par_with_cache_equals_without(model: GPT) -> None:
    cond = torch.tensor([1])
    a = decode(model, cond, par_schedule(4, 6), GREEDY)
    b = decode(model, cond, par_schedule(4, 6), GREEDY, use_cache=False)
    assert a.forward_passes == 4 * 6 // 4 + 3 and torch.equal(a.tokens, b.tokens)


def test_seeded_sampling_with_cache_equals_without(model: GPT) -> None:
    sampling = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95, cfg_scale=1.5)
    cond = torch.tensor([0, 1, 2])
    runs = [
        generate_nar(model, cond, (4, 5), sampling, use_cache=c, generator=torch.Generator().manual_seed(7))
        for c in (True, False, True)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].tokens, runs[2].tokens)
    other = generate_nar(model, cond, (4, 5), sampling, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0].tokens, other.tokens)


@pytest.mark.parametrize("make", [raster_schedule, nar_schedule])
def test_greedy_decode_is_the_argmax_of_training_logits(model: GPT, make) -> None:
    """Training (one teacher-forced pass under the same mask and targets) agrees with decoding."""
    schedule = make(3, 4)
    cond = torch.tensor([2, 0])
    out = decode(model, cond, schedule, GREEDY)
    with torch.no_grad():
        logits = teacher_forced_logits(model, out.tokens, cond, schedule)
    assert torch.equal(logits.argmax(-1), out.tokens.flatten(1))


def test_nar_training_targets() -> None:
    row, col = source_indices(nar_schedule(2, 3))  # sequence index 0 = condition, 1 + r = token r
    assert row.tolist() == [0, 1, 2, -1, 4, 5]
    assert col.tolist() == [0, -1, -1, 1, 2, 3]


def test_decoding_errors(model: GPT) -> None:
    with pytest.raises(ValueError, match="column head"):
        torch.manual_seed(0)
        generate_nar(GPT(GPTConfig(**{**TINY, "column_blocks": 0})), torch.tensor([0]), (2, 2))
    with pytest.raises(ValueError, match="class labels"):
        generate_nar(model, torch.tensor([9]), (2, 2))
    with pytest.raises(ValueError, match="height"):
        generate_nar(model, torch.tensor([0]), (0, 2))
    with pytest.raises(ValueError, match="null class"):
        torch.manual_seed(0)
        no_null = GPT(GPTConfig(**{**TINY, "class_dropout_prob": 0.0}))
        generate_raster(no_null, torch.tensor([0]), (2, 2), SamplingConfig(cfg_scale=2.0))
    with pytest.raises(ValueError, match="tokens must be"):
        teacher_forced_logits(
            model, torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([0]), nar_schedule(3, 3)
        )
    with pytest.raises(ValueError, match="token indices"):
        teacher_forced_logits(model, torch.full((1, 3, 3), 48), torch.tensor([0]), nar_schedule(3, 3))


# -- sampling ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(cfg_scale=0.5), "cfg_scale"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        SamplingConfig(**kwargs)


def test_sampling_filters() -> None:
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sample_logits(logits, SamplingConfig(top_k=1), gen), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, SamplingConfig(top_p=1e-6), gen), logits.argmax(-1))
    top5 = logits.topk(5, dim=-1).indices
    picked = sample_logits(logits, SamplingConfig(top_k=5, temperature=3.0), gen)
    assert (top5 == picked[:, None]).any(-1).all()
    cold = sample_logits(logits * 50, SamplingConfig(temperature=0.01), gen)
    assert torch.equal(cold, logits.argmax(-1))


# -- training ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [nar_schedule, raster_schedule])
def test_training_loss_falls(make) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    tokens = torch.randint(0, 48, (4, 3, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    schedule = make(3, 4)
    with torch.no_grad():
        before = ar_loss(model, tokens, labels, schedule).item()
    losses = train(
        model, tokens, labels, schedule, TrainConfig(steps=40, batch_size=4, lr=1e-2), progress=False
    )
    with torch.no_grad():
        after = ar_loss(model, tokens, labels, schedule).item()
    assert after < 0.5 * before, (before, after, losses[-5:])


def test_nar_tokens_decode_with_the_vq_tokenizer() -> None:
    """End to end: NAR indices on a non-square grid are valid codebook entries for a tiny VQ tokenizer."""
    from mmaccel.tokenizers_img.vq import VQConfig, VQModel

    torch.manual_seed(0)
    vq = VQModel(
        VQConfig(
            codebook_size=32,
            codebook_embed_dim=4,
            ch=16,
            norm_groups=8,
            encoder_ch_mult=(1, 2),
            decoder_ch_mult=(1, 2),
            z_channels=8,
            num_res_blocks=1,
        )
    ).eval()
    gpt = GPT(GPTConfig(**{**TINY, "vocab_size": 32})).eval()
    tokens = generate_nar(gpt, torch.tensor([1, 2]), (3, 5), SamplingConfig(top_k=8)).tokens
    with torch.no_grad():
        images = vq.decode(tokens)
    assert images.shape == (2, 3, 3 * vq.downsample_factor, 5 * vq.downsample_factor)
    assert torch.isfinite(images).all()


def test_text_conditioned_nar_with_cfg_cache_equals_without() -> None:
    torch.manual_seed(0)
    t2i = GPT(GPTConfig(**{**TINY, "model_type": "t2i", "cls_token_num": 3, "caption_dim": 8})).eval()
    captions = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(greedy=True, cfg_scale=2.5)
    cached = generate_nar(t2i, captions, (2, 4), sampling)
    assert torch.equal(cached.tokens, generate_nar(t2i, captions, (2, 4), sampling, use_cache=False).tokens)
