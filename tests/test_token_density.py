"""Training-free token density (FlexDiT-style) on tiny DiT / PixArt / Wan / CogVideoX models."""

import math

import pytest
import torch

import mmaccel.diffusion.token_density as td
from mmaccel.diffusion.token_density import TokenDensityConfig, apply_token_density
from mmaccel.diffusion.token_reduce import GridPool
from mmaccel.runtime.budget import ConstantSchedule, LinearSchedule, StepSchedule
from mmaccel.testing import (
    call_kwargs,
    tiny_cogvideox_pipeline,
    tiny_dit_pipeline,
    tiny_pixart_pipeline,
    tiny_wan_pipeline,
)

FULL = ConstantSchedule(1.0)
QUARTER = ConstantSchedule(0.25)


@pytest.fixture(scope="module")
def pipes():
    return {"dit": tiny_dit_pipeline(), "pixart": tiny_pixart_pipeline(), "wan": tiny_wan_pipeline()}


def _inputs(name: str, t: float = 500.0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "dit":
        return dict(hidden_states=torch.randn(2, 4, 32, 32, generator=g), timestep=torch.tensor([t, t]),
                    class_labels=torch.tensor([1, 5]))  # fmt: skip
    if name == "pixart":
        return dict(hidden_states=torch.randn(2, 4, 32, 32, generator=g), timestep=torch.tensor([t, t]),
                    encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})  # fmt: skip
    if name == "wan":
        return dict(hidden_states=torch.randn(2, 16, 3, 8, 12, generator=g), timestep=torch.tensor([t, t]),
                    encoder_hidden_states=torch.randn(2, 8, 32, generator=g))  # fmt: skip
    return dict(hidden_states=torch.randn(1, 3, 4, 8, 12, generator=g), timestep=torch.tensor([int(t)]),
                encoder_hidden_states=torch.randn(1, 32, 32, generator=g))  # fmt: skip


@torch.no_grad()
def _run(model, name, **kw):
    return model(**_inputs(name, **kw)).sample


def _planner(model) -> td._Planner:
    """The planner of token density applied to ``model`` (its forward pre-hook's owner)."""
    return next(h.__self__ for h in model._forward_pre_hooks.values() if isinstance(h.__self__, td._Planner))


# --------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(reducer="drop"), ValueError, "reducer"),
        (dict(sparse_mode="dense"), ValueError, "sparse_mode"),
        (dict(expand="cubic"), ValueError, "expand"),
        (dict(reducer="merge", expand="linear"), ValueError, "expand"),
        (dict(factor=(2,)), TypeError, "factor"),
        (dict(factor=[2, 2]), TypeError, "factor"),
        (dict(factor=(0, 2)), ValueError, "factor"),
        (dict(pooled_blocks=(2, 1)), ValueError, "pooled_blocks"),
        (dict(sparse_blocks=(-1, 3)), ValueError, "sparse_blocks"),
        (dict(sparse_blocks=[1, 3]), TypeError, "sparse_blocks"),
        (dict(pooled_blocks=(0, 3), sparse_blocks=(2, 5)), ValueError, "overlap"),
        (dict(schedule=0.5), TypeError, "schedule"),
        (dict(num_train_timesteps=0), ValueError, "num_train_timesteps"),
        (dict(merge_seed=-1), ValueError, "merge_seed"),
    ],
)
def test_bad_configs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TokenDensityConfig(**kwargs)


def test_ratio_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="ratio"):
        TokenDensityConfig(schedule=ConstantSchedule(1.5))
    with pytest.raises(ValueError, match="ratio"):
        TokenDensityConfig(schedule=ConstantSchedule(0.0))


def test_runtime_errors(pipes):
    model = pipes["dit"].transformer  # 6 blocks, 16x16 token grid
    with pytest.raises(ValueError, match="out of range"):
        apply_token_density(model, TokenDensityConfig(pooled_blocks=(0, 2), sparse_blocks=(2, 7)))
    with pytest.raises(ValueError, match="image model"):
        apply_token_density(model, TokenDensityConfig(factor=(2, 2, 2)))
    handle = apply_token_density(model, TokenDensityConfig(factor=(3, 3), schedule=QUARTER))
    with pytest.raises(ValueError, match="must divide the token grid"):
        _run(model, "dit")
    handle.remove()
    handle = apply_token_density(model, TokenDensityConfig(schedule=lambda p: 1.5))
    with pytest.raises(ValueError, match="keep ratio"):
        _run(model, "dit")
    handle.remove()
    with pytest.raises(ValueError, match="already applied"):
        with apply_token_density(model, TokenDensityConfig()):
            apply_token_density(model, TokenDensityConfig())
    with pytest.raises(NotImplementedError, match="supports"):
        apply_token_density(pipes["dit"].vae, TokenDensityConfig())


def test_auto_layout():
    cfg = TokenDensityConfig()
    assert cfg.layout(28) == (range(0, 2), range(2, 24))
    assert cfg.layout(6) == (range(0, 1), range(1, 5))
    assert TokenDensityConfig(pooled_blocks=None).layout(28) == (range(0), range(0, 24))
    assert TokenDensityConfig(sparse_blocks=(3, 5)).layout(6) == (range(0, 1), range(3, 5))


# --------------------------------------------------------------------------------------------
# Exactness and removal
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dit", "pixart", "wan"])
def test_density_one_is_exact_and_remove_restores(pipes, name):
    model = pipes[name].transformer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _run(model, name)
    with apply_token_density(model, TokenDensityConfig(schedule=FULL)) as handle:
        assert torch.equal(_run(model, name), dense)
        assert handle.stats.steps[-1].token_ratio == 1.0
    with apply_token_density(model, TokenDensityConfig(schedule=QUARTER, reducer="merge")):
        assert not torch.equal(_run(model, name), dense)
        # pooled (0) and sparse (1) blocks: one routed attn1 class, one norm1 pre-hook object
        blocks = getattr(model, "blocks", None) or model.transformer_blocks
        assert type(blocks[0].attn1) is type(blocks[1].attn1) and type(blocks[1].attn1) in td._ROUTED.values()
        hooks = [list(b.norm1._forward_pre_hooks.values()) for b in blocks[:2]]
        assert len(hooks[0]) == 1 and hooks[0] == hooks[1]
    # removed: same forward, same parameters, no hooks, instance forwards or routed classes left behind
    assert torch.equal(_run(model, name), dense)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for module in model.modules():
        assert "_diffusers_hook" not in module.__dict__ and "forward" not in module.__dict__
        assert type(module) not in td._ROUTED.values() and not module._forward_pre_hooks and not module._forward_hooks


@pytest.mark.parametrize("name", ["dit", "pixart", "wan"])
@pytest.mark.parametrize("mode", ["sparse_q", "sparse_kv"])
def test_identity_reducer_reproduces_dense(pipes, name, mode, monkeypatch):
    """With a 1x1 window every routing path (pooled, sparse_q's norm concat, sparse_kv, Wan's
    separate-RoPE attention) must compute exactly the dense function."""
    model = pipes[name].transformer
    dense = _run(model, name)
    monkeypatch.setattr(td._Plan, "dense", property(lambda self: False))
    monkeypatch.setattr(td._Plan, "reducer", lambda self, x: GridPool(self.grid, (1, 1, 1)))
    with apply_token_density(model, TokenDensityConfig(schedule=FULL, sparse_mode=mode)) as handle:
        out = _run(model, name)
        kinds = handle.stats.steps[-1].block_tokens
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    assert len(kinds) == len(getattr(model, "blocks", None) or model.transformer_blocks)


# --------------------------------------------------------------------------------------------
# Token counts, schedules, FLOPs
# --------------------------------------------------------------------------------------------


def test_token_counts_follow_layout_and_schedule(pipes):
    model = pipes["dit"].transformer  # 6 blocks, 256 tokens
    schedule = StepSchedule(boundaries=(0.4, 0.8), ratios=(0.25, 0.5, 1.0))
    cfg = TokenDensityConfig(pooled_blocks=(0, 2), sparse_blocks=(2, 4), schedule=schedule)
    with apply_token_density(model, cfg) as handle:
        for t in (900, 500, 100):  # progress 0.1, 0.5, 0.9
            _run(model, "dit", t=t)
        steps = handle.stats.steps
    assert [s.setting for s in steps] == [(1, 2, 2), (1, 1, 2), (1, 1, 1)]
    assert steps[0].block_tokens == [(64, 64)] * 2 + [(64, 256)] * 2 + [(256, 256)] * 2
    assert steps[1].block_tokens == [(128, 128)] * 2 + [(128, 256)] * 2 + [(256, 256)] * 2
    assert steps[2].block_tokens == [(256, 256)] * 6
    assert steps[0].token_ratio == pytest.approx((4 * 64 + 2 * 256) / (6 * 256))
    assert "| 0 |" in handle.stats.table()
    summary = handle.stats.summary()
    assert summary["forwards"] == 3 and summary["reduced_forwards"] == 2 and summary["gflops"] is None
    assert summary["token_ratio"] == pytest.approx(sum(s.token_ratio for s in steps) / 3)
    handle.stats.reset()
    assert handle.stats.summary()["forwards"] == 0 and handle.stats.summary()["token_ratio"] is None


def test_merge_counts_and_sparse_kv_counts(pipes):
    model = pipes["pixart"].transformer  # 4 blocks, 256 tokens
    cfg = TokenDensityConfig(reducer="merge", schedule=ConstantSchedule(0.1), sparse_mode="sparse_kv")
    with apply_token_density(model, cfg) as handle:
        _run(model, "pixart")
    # merging keeps at least one token per 2x2 cell: 64 of 256
    assert handle.stats.steps[0].block_tokens == [(64, 64), (256, 64), (256, 64), (256, 256)]


def test_timestep_callback_drives_progress(pipes):
    model = pipes["dit"].transformer
    current = {"t": 999.0}
    with apply_token_density(model, TokenDensityConfig(), current_timestep_callback=lambda: current["t"]) as handle:
        _run(model, "dit", t=0)  # the callback wins over the forward's own timestep
        current["t"] = 0.0
        _run(model, "dit", t=999)
    assert [s.setting for s in handle.stats.steps] == [(1, 2, 2), (1, 1, 1)]
    assert handle.stats.steps[0].progress == pytest.approx(0.001)


def test_callback_returns_the_schedulers_timestep(pipes):
    """One convention: the callback returns a timestep, never progress. 0.05 is the end of
    denoising (dense under the default schedule); a value that is no timestep is an error."""
    model = pipes["dit"].transformer
    with apply_token_density(model, current_timestep_callback=lambda: 0.05) as handle:
        _run(model, "dit", t=999)
    assert handle.stats.steps[0].progress == pytest.approx(1 - 0.05 / 1000)
    assert handle.stats.steps[0].setting == (1, 1, 1)
    for bad in (float("nan"), -1, 5000, None, "500"):
        with apply_token_density(model, current_timestep_callback=lambda bad=bad: bad):
            with pytest.raises(ValueError, match="current_timestep_callback"):
                _run(model, "dit")
    with pytest.raises(TypeError, match="current_timestep_callback"):
        apply_token_density(model, current_timestep_callback=0.5)
    with apply_token_density(model):  # without a callback the forward's own timestep is validated
        with pytest.raises(ValueError, match="timestep argument"):
            _run(model, "dit", t=-3.0)


def test_flops_are_counted_and_drop(pipes):
    model = pipes["dit"].transformer
    with apply_token_density(model, TokenDensityConfig(schedule=FULL, count_flops=True)) as handle:
        _run(model, "dit")
    with apply_token_density(model, TokenDensityConfig(schedule=QUARTER, count_flops=True)) as reduced:
        _run(model, "dit")
    _, dense_flops = td.count_flops(lambda: _run(model, "dit"))
    assert handle.stats.total_flops == dense_flops > 0
    assert reduced.stats.total_flops < 0.6 * dense_flops
    with apply_token_density(model, TokenDensityConfig()) as uncounted:
        _run(model, "dit")
    with pytest.raises(ValueError, match="count_flops"):
        _ = uncounted.stats.total_flops


# --------------------------------------------------------------------------------------------
# Video: Wan RoPE, merge with RoPE, CogVideoX, pipelines end to end
# --------------------------------------------------------------------------------------------


def test_wan_video_pooling_over_frames(pipes):
    model = pipes["wan"].transformer  # grid (3, 4, 6) = 72 tokens
    with pytest.raises(ValueError, match="must divide"):
        with apply_token_density(model, TokenDensityConfig(factor=(2, 2, 2), schedule=QUARTER)):
            _run(model, "wan")
    cfg = TokenDensityConfig(factor=(3, 2, 2), schedule=ConstantSchedule(1 / 12), expand="linear")
    with apply_token_density(model, cfg) as handle:
        out = _run(model, "wan")
    assert torch.isfinite(out).all() and out.shape == (2, 16, 3, 8, 12)
    assert handle.stats.steps[0].setting == (3, 2, 2)
    assert handle.stats.steps[0].block_tokens[0] == (6, 6)


@pytest.mark.parametrize("mode", ["sparse_q", "sparse_kv"])
def test_wan_merge_with_rope(pipes, mode):
    model = pipes["wan"].transformer
    dense = _run(model, "wan")
    cfg = TokenDensityConfig(reducer="merge", schedule=ConstantSchedule(0.5), sparse_mode=mode)
    with apply_token_density(model, cfg) as handle:
        out = _run(model, "wan")
    assert torch.isfinite(out).all()
    rel = float((out - dense).norm() / dense.norm())
    assert 0 < rel < 0.5
    q, kv = handle.stats.steps[0].block_tokens[1]
    assert (q, kv) == ((36, 72) if mode == "sparse_q" else (72, 36))


def test_cogvideox_pooled_blocks():
    model = tiny_cogvideox_pipeline().transformer  # grid (3, 4, 6)
    with pytest.raises(NotImplementedError, match="sparse_blocks=None"):
        apply_token_density(model, TokenDensityConfig())
    dense = _run(model, "cog")
    cfg = TokenDensityConfig(pooled_blocks=(0, 3), sparse_blocks=None, factor=(1, 2, 2), schedule=QUARTER)
    with apply_token_density(model, cfg) as handle:
        out = _run(model, "cog")
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert handle.stats.steps[0].block_tokens == [(18, 18)] * 3 + [(72, 72)]
    with apply_token_density(
        model, TokenDensityConfig(pooled_blocks=(0, 3), sparse_blocks=None, schedule=FULL)
    ):
        assert torch.equal(_run(model, "cog"), dense)


@pytest.mark.parametrize("name", ["dit", "pixart", "wan"])
def test_pipelines_end_to_end(pipes, name):
    pipe = pipes[name]
    kwargs = call_kwargs(name)
    callback = (lambda: pipe.current_timestep) if name == "wan" else None
    with apply_token_density(pipe.transformer, TokenDensityConfig(), current_timestep_callback=callback) as handle:
        out = pipe(**kwargs)
    images = out.frames if name == "wan" else out.images
    assert images.shape == {"dit": (2, 64, 64, 3), "pixart": (1, 64, 64, 3), "wan": (1, 9, 64, 96, 3)}[name]
    assert math.isfinite(float(abs(images).sum()))
    forwards = kwargs["num_inference_steps"] * (2 if name == "wan" else 1)  # Wan runs cond and uncond
    assert len(handle.stats.steps) == forwards
    # the default schedule (StepSchedule at progress 0.8) reduces the noisy steps only
    assert handle.stats.steps[0].token_ratio < 1.0
    assert all((s.token_ratio < 1.0) == (s.progress < 0.8) for s in handle.stats.steps)


def test_steady_state_compiles_without_graph_breaks(pipes):
    """The reduced forward traces as one graph (the timestep, schedule and records stay on the
    host, before the first tensor op), reruns without recompiling and equals eager."""
    model = pipes["wan"].transformer
    with apply_token_density(model, TokenDensityConfig(schedule=QUARTER)) as handle:
        torch._dynamo.reset()
        with torch.no_grad():
            explain = torch._dynamo.explain(model)(**_inputs("wan", t=500.0))
        assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
        eager = {t: _run(model, "wan", t=t) for t in (500.0, 300.0)}
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(_run(compiled, "wan", t=500.0), eager[500.0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(_run(compiled, "wan", t=300.0), eager[300.0])
        steps = handle.stats.steps
    assert len(steps) == 5 and [s.progress for s in steps] == [None] * 5  # a constant keep ratio reads no timestep
    assert steps[-1].token_ratio < 1
    torch._dynamo.reset()


@pytest.mark.parametrize("schedule, syncs", [(QUARTER, 0), (FULL, 0), (StepSchedule(boundaries=(0.5,), ratios=(0.25, 1.0)), 1)])
def test_only_a_schedule_that_depends_on_the_timestep_reads_it(pipes, schedule, syncs):
    """Issue 32: a ``ConstantSchedule`` decides without the timestep, so a timestep tensor is not
    read (0 host-device syncs without ``scheduler=``) and its progress is recorded as None; a host
    value (here the callback's number) is still validated and recorded. Another schedule reads
    the tensor: one sync per forward."""
    from mmaccel.testing.hotpath import count_hot_path

    model = pipes["wan"].transformer
    with apply_token_density(model, TokenDensityConfig(schedule=schedule)) as handle:
        _run(model, "wan", t=300.0)  # builds the plan
        count = count_hot_path(lambda: _run(model, "wan", t=300.0))
        expected = schedule(0.7)
        assert [(s.progress, s.keep_ratio) for s in handle.stats.steps] == [
            (None if syncs == 0 else pytest.approx(0.7), expected)
        ] * 2
        assert handle.stats.table().splitlines()[2].startswith("| 0 | - |" if syncs == 0 else "| 0 | 0.700 |")
    assert count.syncs == syncs
    with apply_token_density(model, TokenDensityConfig(schedule=schedule), current_timestep_callback=lambda: 300.0) as handle:
        _run(model, "wan", t=300.0)
        assert handle.stats.steps[0].progress == pytest.approx(0.7)
    with apply_token_density(model, TokenDensityConfig(schedule=schedule), current_timestep_callback=lambda: -1.0):
        with pytest.raises(ValueError, match="current_timestep_callback"):
            _run(model, "wan")


def test_scheduler_timesteps_are_read_on_the_host(pipes):
    """``scheduler=``: the DiT pipeline's timestep tensors are views of ``scheduler.timesteps``,
    found by storage offset (no miss); progress follows the schedule. A copy is a miss, a new
    schedule is re-read."""
    from mmaccel.runtime.timesteps import HostTimesteps, host_timestep_callback

    pipe = pipes["dit"]
    with apply_token_density(pipe.transformer, TokenDensityConfig(), scheduler=pipe.scheduler) as handle:
        pipe(**{**call_kwargs("dit"), "num_inference_steps": 3, "output_type": "latent"})
        host = _planner(handle.model).host
    steps = pipe.scheduler.timesteps.tolist()
    assert host.misses == 0 and [s.progress for s in handle.stats.steps] == [pytest.approx(1 - t / 1000) for t in steps]
    lookup = HostTimesteps(pipe.scheduler)
    assert lookup.lookup(pipe.scheduler.timesteps[1][None].expand(4)) == steps[1]
    assert lookup.lookup(pipe.scheduler.timesteps[1].clone()) is None and lookup.misses == 1
    assert lookup.lookup(250) == 250.0
    pipe.scheduler.set_timesteps(5)
    assert lookup.lookup(pipe.scheduler.timesteps[4]) == pipe.scheduler.timesteps[4].item()
    fake = type("Pipe", (), {"scheduler": pipe.scheduler, "current_timestep": pipe.scheduler.timesteps[2]})()
    assert host_timestep_callback(fake)() == pipe.scheduler.timesteps[2].item()
    with pytest.raises(TypeError, match="scheduler"):
        HostTimesteps(object())


# --------------------------------------------------------------------------------------------
# diffusers' model contracts (issue 32): per-token timesteps, checkpointing, failures, compile
# --------------------------------------------------------------------------------------------


def _per_token(t: torch.Tensor, tokens: int = 72) -> torch.Tensor:
    """Wan 2.2 TI2V's timestep per token: the first of three latent frames at 0 (the clean image)."""
    out = t[:, None].expand(-1, tokens).clone()
    out[:, : tokens // 3] = 0.0
    return out


def test_sparse_q_with_per_token_timesteps(pipes, monkeypatch):
    """Wan 2.2 TI2V's per-token modulation under sparse_q: the dense keys/values keep their own
    rows, the reduced queries take them pooled like their tokens. A per-token timestep equal on
    every token gives the per-sample output; an identity reducer gives dense."""
    model = pipes["wan"].transformer
    inputs = _inputs("wan")
    with torch.no_grad(), apply_token_density(model, TokenDensityConfig(schedule=QUARTER)) as handle:
        per_sample = model(**inputs).sample
        flat = model(**{**inputs, "timestep": inputs["timestep"][:, None].expand(-1, 72)}).sample
        ti2v = model(**{**inputs, "timestep": _per_token(inputs["timestep"])}).sample
    torch.testing.assert_close(flat, per_sample, rtol=1e-5, atol=1e-5)
    assert [s.block_tokens[1] for s in handle.stats.steps] == [(18, 72)] * 3  # sparse_q: 2x2 pooled queries
    assert torch.isfinite(ti2v).all() and (ti2v - per_sample).abs().max() > 1e-3
    with torch.no_grad():
        dense = model(**{**inputs, "timestep": _per_token(inputs["timestep"])}).sample
    monkeypatch.setattr(td._Plan, "dense", property(lambda self: False))
    monkeypatch.setattr(td._Plan, "reducer", lambda self, x: GridPool(self.grid, (1, 1, 1)))
    with torch.no_grad(), apply_token_density(model, TokenDensityConfig(schedule=FULL)):
        identity = model(**{**inputs, "timestep": _per_token(inputs["timestep"])}).sample
    torch.testing.assert_close(identity, dense, rtol=1e-5, atol=1e-5)


def _two_forwards_grads(model, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Gradients of one backward through two forwards: a reduced one (t=900), then a dense one (t=100)."""
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    try:
        outs = [model(**_inputs("dit", t=t, seed=i)).sample for i, t in enumerate((900.0, 100.0))]
        loss = sum(out.pow(2).mean() for out in outs)
        loss.backward()
    finally:
        model.disable_gradient_checkpointing()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_forwards_sharing_one_backward_recompute_with_their_own_plans(pipes):
    """Gradient checkpointing: each block's recompute takes its forward's plan, also when a later
    forward (here dense) set another plan before the backward; gradients equal those without."""
    model = pipes["dit"].transformer
    with apply_token_density(model, TokenDensityConfig()) as handle:
        plain = _two_forwards_grads(model, checkpointing=False)
        checkpointed = _two_forwards_grads(model, checkpointing=True)
        assert [s.reduced for s in handle.stats.steps] == [True, False, True, False]
    model.zero_grad(set_to_none=True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("count", [False, True])
def test_a_forward_that_raises_is_not_recorded_and_leaves_no_plan(pipes, count):
    """The always-called forward hook cleans up after a forward that raised inside the blocks:
    no record, no plan, no FLOP counter left active; the next forward runs as usual."""
    model = pipes["wan"].transformer
    inputs = _inputs("wan")
    with apply_token_density(model, TokenDensityConfig(schedule=QUARTER, count_flops=count)) as handle:
        planner = _planner(model)
        with pytest.raises(RuntimeError), torch.no_grad():
            model(**{**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][..., :-1]})
        assert handle.stats.steps == [] and planner.shared.plan is None
        assert torch._C._len_torch_dispatch_stack() == 0
        _run(model, "wan")
        assert len(handle.stats.steps) == 1 and handle.stats.steps[0].reduced
        assert (handle.stats.steps[0].flops is not None) == count


def test_sparse_blocks_refuse_a_wrapped_attention(pipes):
    """sparse blocks route attn1 through its class: a forward already wrapped on the instance
    (a hook installed before token density) would bypass it, so apply refuses."""
    model = pipes["wan"].transformer
    attn = model.blocks[1].attn1
    attn.forward = attn.forward
    try:
        with pytest.raises(NotImplementedError, match="apply token density first"):
            apply_token_density(model, TokenDensityConfig())
    finally:
        del attn.forward
    with apply_token_density(model, TokenDensityConfig()):
        assert type(attn).__name__ == "WanAttention" and type(attn) in td._ROUTED.values()
    assert type(attn) not in td._ROUTED.values()


def test_regional_compile_recompiles_each_hooked_kind_once_per_plan():
    """``compile_repeated_blocks(fullgraph=True)`` over a two-level run (reduced, then dense) on a
    4-block Wan (pooled 1, sparse_q 2, dense 1): the reduced steps compile one graph per block
    kind (dense, pooled, sparse: 3); the dense steps add one graph that every hooked block shares
    (a dense forward reads nothing kind-specific): 3 + 1 = 4 (it was 5, one per hooked kind)."""
    from diffusers import WanTransformer3DModel
    from torch._dynamo.testing import CompileCounterWithBackend

    from mmaccel.testing import TINY_WAN_TRANSFORMER

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, "num_layers": 4}).eval()
    two_level = StepSchedule(boundaries=(0.5,), ratios=(0.25, 1.0))
    apply_token_density(model, TokenDensityConfig(schedule=two_level))
    inputs = _inputs("wan")
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = [model(**{**inputs, "timestep": torch.full((2,), t)}).sample for t in (900.0, 100.0)]
            model.compile_repeated_blocks(fullgraph=True, backend=counter)
            frames = []
            for t in (900.0, 800.0, 700.0, 300.0, 200.0, 100.0):
                out = model(**{**inputs, "timestep": torch.full((2,), t)}).sample
                frames.append(counter.frame_count)
                if t in (900.0, 100.0):
                    torch.testing.assert_close(out, eager[t == 100.0], rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
    assert frames == [3, 3, 3, 4, 4, 4]


# --------------------------------------------------------------------------------------------
# torch.export under a schedule that reads the timestep (issue 32): the host side, exactly
# --------------------------------------------------------------------------------------------


def _pool_key(schedule, factor=(1, 2, 2)):
    """The plan identity at a progress: the pooling window `_Plan` takes at the schedule's keep ratio."""
    cfg = TokenDensityConfig(factor=factor, schedule=schedule)
    return lambda p: td._setting(cfg, 96, float(schedule(p)))


def _next_below(p: float) -> float:
    return math.nextafter(p, -math.inf)


@pytest.mark.parametrize(
    "schedule, windows",
    [
        (LinearSchedule(0.25, 1.0), [(1, 2, 2), (1, 1, 2), (1, 1, 1)]),
        (LinearSchedule(1.0, 0.25), [(1, 1, 1), (1, 1, 2), (1, 2, 2)]),
        (StepSchedule((0.3, 0.6), (0.25, 1.0, 0.25)), [(1, 2, 2), (1, 1, 1), (1, 2, 2)]),
        (StepSchedule((0.5,), (0.3, 0.25)), [(1, 2, 2)]),  # two ratios, one window: one interval
        (ConstantSchedule(0.5), [(1, 1, 2)]),
    ],
)
def test_plan_intervals_are_exact_to_the_last_double(schedule, windows):
    """`plan_starts` finds where the plan changes by bisection over doubles: the plan at every
    start holds up to the next, the double just below a start has the previous plan, and a dense
    sweep of progress agrees with the interval lookup."""
    import bisect

    from mmaccel.diffusion.token_density_export import plan_starts
    from mmaccel.runtime.budget import monotone_pieces

    key = _pool_key(schedule)
    starts = plan_starts(key, monotone_pieces(schedule))
    assert [key(s) for s in starts] == windows and starts[0] == 0.0
    for prev, s in zip(starts, starts[1:]):
        assert key(_next_below(s)) == key(prev) != key(s)
    for i in range(10001):
        p = i / 10000
        assert key(p) == key(starts[bisect.bisect_right(starts, p) - 1])


def test_plan_intervals_are_capped_and_other_schedules_refused():
    from mmaccel.diffusion.token_density_export import MAX_PLANS, plan_starts
    from mmaccel.runtime.budget import CosineSchedule, monotone_pieces

    merge = TokenDensityConfig(reducer="merge", schedule=LinearSchedule(0.25, 1.0))
    with pytest.raises(NotImplementedError, match=f"more than {MAX_PLANS} different plans"):
        plan_starts(lambda p: td._setting(merge, 96, merge.schedule(p)), (0.0,))
    with pytest.raises(TypeError, match="ConstantSchedule, LinearSchedule or StepSchedule.*CosineSchedule"):
        monotone_pieces(CosineSchedule(0.25, 1.0))

    class Shifted(LinearSchedule):  # a subclass may compute otherwise: not trusted to be monotone
        def __call__(self, progress: float) -> float:
            return super().__call__(1.0 - progress)

    with pytest.raises(TypeError, match="Shifted"):
        monotone_pieces(Shifted())
    with pytest.raises(ValueError, match="pieces must start at progress 0.0"):
        plan_starts(lambda p: 0, (0.5,))


@pytest.mark.parametrize(
    "timestep",
    [torch.tensor([500.0, 300.0]), torch.tensor([137.25]), torch.tensor(999), torch.tensor([[0.0] * 3 + [861.9] * 5]),
     torch.tensor([0, 1000])],
)  # fmt: skip
def test_progress_tensor_is_the_hosts_progress_bit_for_bit(timestep):
    """The traced progress is the host's double: the largest element (the noisiest sample or token)."""
    from mmaccel.diffusion.token_density_export import progress_tensor
    from mmaccel.runtime.timesteps import read_timestep, timestep_progress

    traced = progress_tensor(timestep, 1000, "timestep")
    assert traced.dtype == torch.float64 and traced.ndim == 0
    assert traced.item() == timestep_progress(read_timestep(timestep, 1000), 1000)


def test_progress_tensor_asserts_a_timestep_in_graph():
    from mmaccel.diffusion.token_density_export import progress_tensor

    for bad in (torch.tensor([-1.0, 5.0]), torch.tensor([1000.5]), torch.tensor([float("nan"), 5.0])):
        with pytest.raises(RuntimeError, match=r"not a timestep in \[0, 1000\]"):
            progress_tensor(bad, 1000, "timestep")
    with pytest.raises(NotImplementedError, match="needs timestep to be a tensor input"):
        progress_tensor(500.0, 1000, "timestep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        progress_tensor(torch.tensor([]), 1000, "timestep")


_EXPORTS = {  # (model, config, timesteps spanning its plans)
    "wan-sparse_kv-linear": ("wan", dict(sparse_mode="sparse_kv", schedule=LinearSchedule(0.25, 1.0)), (900, 500, 100)),
    "wan-merge-step": ("wan", dict(reducer="merge", schedule=StepSchedule((0.5,), (0.25, 1.0))), (900, 100)),
    "wan-per_token-linear": ("wan", dict(schedule=LinearSchedule(0.25, 1.0)), (900, 500, 100)),
    "cog-pooled-step3": ("cog", dict(sparse_blocks=None, pooled_blocks=(0, 3), factor=(1, 2, 2),
                                     schedule=StepSchedule((0.3, 0.6), (0.25, 0.5, 1.0))), (900, 500, 100)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_EXPORTS))
def test_export_under_a_timestep_schedule_equals_eager_per_kind_and_reducer(pipes, case):
    """The exported program selects each block's plan from its timestep input (nested ``cond`` for
    three plans), equal to eager at timesteps spanning the plans: sparse_kv, merging (the merge
    positions are constants of the program), Wan 2.2 TI2V's per-token timestep (the noisiest token
    decides, per-token modulation pooled in the branch) and CogVideoX's tuple-output blocks."""
    name, cfg, timesteps = _EXPORTS[case]
    model = tiny_cogvideox_pipeline().transformer if name == "cog" else pipes["wan"].transformer
    layout = {} if name == "cog" else dict(pooled_blocks=(0, 1), sparse_blocks=(1, 2))
    per_token = _per_token if "per_token" in case else (lambda t: t)
    inputs = {**_inputs(name), "return_dict": False}
    inputs["timestep"] = per_token(inputs["timestep"])
    with apply_token_density(model, TokenDensityConfig(**{**layout, **cfg})) as handle:
        exported = torch.export.export(model, args=(), kwargs=inputs).module()
        settings = []
        with torch.no_grad():
            for t in timesteps:
                x = {**inputs, "timestep": per_token(torch.full_like(_inputs(name)["timestep"], t))}
                torch.testing.assert_close(exported(**x)[0], model(**x)[0], rtol=0, atol=0)
                settings.append(handle.stats.steps[-1].setting)
    assert len(set(settings)) == len(timesteps)  # every plan ran
