"""diffusers' own model contracts, kept with every technique applied (issue #32).

diffusers' model tests (``tests/models/testing_utils``, ``tests/models/transformers``) check that
a transformer takes per-sample timesteps, trains under ``enable_gradient_checkpointing()`` with
the same gradients, compiles with ``torch.compile(fullgraph=True)``, keeps its output across
``fuse_qkv_projections()`` / ``unfuse_qkv_projections()`` and saves the same tensors. These are our
own tests of the same contracts on patched models: every technique (token density, SVG2, FlexDiT,
DyDiT, clip parallelism at world size 1) on every model family it supports (tiny random models of
the real classes), at full budget and while reducing.

Every cell passes (the cells that failed when issue #32 was filed were strict xfails until they
were fixed). The compile cells trace with dynamo
(``fullgraph=True``) and run the graph with the ``eager`` backend, on a warm step (one eager
forward first), and are marked ``slow`` except one per technique.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from mmaccel.benchmarks.contract_budgets import svg2_at_budget, token_density_at_budget
from mmaccel.diffusion.dydit import DyDiTConfig, convert_to_dydit
from mmaccel.diffusion.flexdit import FlexDiTConfig, convert_to_flexdit
from mmaccel.diffusion.token_density import TokenDensityConfig
from mmaccel.parallel_video.clip_parallel import ClipParallelConfig, apply_clip_parallel
from mmaccel.runtime.budget import ConstantSchedule, LinearSchedule
from mmaccel.runtime.distributed import DistContext
from mmaccel.sparse_attn.svg2 import SVG2Config, apply_svg2
from mmaccel.testing import (
    TINY_WAN_TRANSFORMER,
    tiny_cogvideox_pipeline,
    tiny_dit_pipeline,
    tiny_flux_inputs,
    tiny_flux_transformer,
    tiny_hunyuan_video_inputs,
    tiny_hunyuan_video_transformer,
    tiny_pixart_pipeline,
)

torch.set_num_threads(1)

BATCH = 2


# -- model families: a tiny model and inputs of a batch of two for given timesteps -----------------


@dataclass
class Family:
    model: torch.nn.Module
    inputs: Callable[[torch.Tensor], dict[str, Any]]  # timesteps (B,) or (B, N) -> forward kwargs
    t_high: float  # a noisy timestep in the model's units
    t_low: float
    tokens: int  # video/image tokens of one sample (per-token timesteps)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _dit() -> Family:
    model = tiny_dit_pipeline(num_layers=4, sample_size=16).transformer.eval()
    g = torch.Generator().manual_seed(1)
    x, labels = _randn(g, BATCH, 4, 16, 16), torch.tensor([3, 4])
    return Family(model, lambda t: dict(hidden_states=x, timestep=t, class_labels=labels, return_dict=False),
                  900.0, 100.0, 64)  # fmt: skip


def _pixart() -> Family:
    model = tiny_pixart_pipeline(sample_size=16).transformer.eval()
    g = torch.Generator().manual_seed(1)
    x, text = _randn(g, BATCH, 4, 16, 16), _randn(g, BATCH, 8, model.config.caption_channels)
    cond = {"resolution": None, "aspect_ratio": None}
    return Family(model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=t,
                                        added_cond_kwargs=cond, return_dict=False), 900.0, 100.0, 64)  # fmt: skip


def _wan(channels: int = 16) -> Family:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, "in_channels": channels, "out_channels": channels})
    g = torch.Generator().manual_seed(2)
    x, text = _randn(g, BATCH, channels, 3, 8, 12), _randn(g, BATCH, 8, TINY_WAN_TRANSFORMER["text_dim"])
    return Family(model.eval(), lambda t: dict(hidden_states=x, timestep=t, encoder_hidden_states=text,
                                               return_dict=False), 900.0, 100.0, 72)  # fmt: skip


def _wan22_ti2v() -> Family:
    """Wan 2.2 TI2V-5B's shape: 48 latent channels, the timestep given per token."""
    return _wan(48)


def _cogvideox() -> Family:
    model = tiny_cogvideox_pipeline().transformer.eval()
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    x, text = _randn(g, BATCH, 2, cfg.in_channels, 8, 12), _randn(g, BATCH, cfg.max_text_seq_length, cfg.text_embed_dim)
    return Family(model, lambda t: dict(hidden_states=x, encoder_hidden_states=text, timestep=t,
                                        return_dict=False), 900.0, 100.0, 48)  # fmt: skip


def _batched(kwargs: dict[str, Any], seed: int) -> dict[str, Any]:
    """A batch of two from single-sample inputs: the second sample's tensors drawn afresh."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[0] == 1 and v.is_floating_point():
            v = torch.cat([v, torch.randn(v.shape, generator=g)])
        elif isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == 1 and k != "timestep":
            v = v.expand(BATCH, *v.shape[1:])
        out[k] = v
    return out


def _flux() -> Family:
    model = tiny_flux_transformer()
    base = _batched(tiny_flux_inputs(model), 4)
    return Family(model, lambda t: {**base, "timestep": t}, 0.9, 0.1, 96)


def _hunyuan() -> Family:
    model = tiny_hunyuan_video_transformer()
    base = _batched(tiny_hunyuan_video_inputs(model), 5)
    return Family(model, lambda t: {**base, "timestep": t}, 900.0, 100.0, 3 * 4 * 6)


FAMILIES: dict[str, Callable[[], Family]] = {
    "dit": _dit, "pixart": _pixart, "wan": _wan, "wan22_ti2v": _wan22_ti2v, "cogvideox": _cogvideox,
    "flux": _flux, "hunyuan_video": _hunyuan,
}  # fmt: skip


# -- techniques: apply (or convert) at full budget / while reducing --------------------------------


def _svg2(model: torch.nn.Module, reducing: bool) -> tuple[torch.nn.Module, Any]:
    return model, svg2_at_budget(model, reducing)


def _token_density(model: torch.nn.Module, reducing: bool) -> tuple[torch.nn.Module, Any]:
    return model, token_density_at_budget(model, reducing)


def _flexdit(model: torch.nn.Module, reducing: bool) -> tuple[torch.nn.Module, Any]:
    cfg = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 0, 1, 0), top_dense_blocks=1,
                        sparse_grid=(4, 4),
                        schedule=LinearSchedule(0.25, 1.0) if reducing else ConstantSchedule(1.0))  # fmt: skip
    return convert_to_flexdit(model, cfg), None


@torch.no_grad()
def _dydit(model: torch.nn.Module, reducing: bool) -> tuple[torch.nn.Module, Any]:
    out = convert_to_dydit(model, DyDiTConfig(dynamic_tokens=False))
    if reducing:  # routers that drop some head and MLP groups (as in test_dydit.py)
        gen = torch.Generator().manual_seed(0)
        for r in out.routers:
            r.head.bias.copy_(torch.randn(r.head.bias.shape, generator=gen) * 3)
            r.mlp.bias.copy_(torch.randn(r.mlp.bias.shape, generator=gen) * 3)
        out.clear_cache()
    return out.eval(), None


def _clip_parallel(model: torch.nn.Module, reducing: bool) -> tuple[torch.nn.Module, Any]:
    cfg = ClipParallelConfig() if reducing else ClipParallelConfig(local_scope="window", phase_bias=0.0)
    return model, apply_clip_parallel(model, cfg, ctx=DistContext.single(), num_latent_frames=3)


TECHNIQUES: dict[str, Callable[[torch.nn.Module, bool], tuple[torch.nn.Module, Any]]] = {
    "svg2": _svg2, "token_density": _token_density, "flexdit": _flexdit, "dydit": _dydit,
    "clip_parallel": _clip_parallel,
}  # fmt: skip

SUPPORTED = {
    "svg2": ("wan", "wan22_ti2v", "cogvideox", "hunyuan_video"),
    "token_density": ("dit", "pixart", "wan", "wan22_ti2v", "cogvideox", "flux", "hunyuan_video"),
    "flexdit": ("dit", "pixart"),
    "dydit": ("dit", "pixart"),
    "clip_parallel": ("wan",),
}
CELLS = [(tech, fam, budget) for tech, fams in SUPPORTED.items() for fam in fams for budget in ("full", "reducing")]


def _id(cell: tuple[str, str, str]) -> str:
    return "-".join(cell)


def _cells(slow: Callable[[tuple[str, str, str]], bool] = lambda c: False):
    """Every cell, marked ``slow`` where asked."""
    return [pytest.param(*cell, id=_id(cell), marks=[pytest.mark.slow] if slow(cell) else []) for cell in CELLS]


def _build(tech: str, fam: str, budget: str) -> tuple[Family, torch.nn.Module, Any]:
    family = FAMILIES[fam]()
    model, handle = TECHNIQUES[tech](family.model, budget == "reducing")
    return family, model, handle


def _sample(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _timesteps(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- A. per-sample and per-token timesteps ---------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("tech, fam, budget", _cells())
def test_per_sample_timesteps_take_the_noisiest_samples_decision(tech: str, fam: str, budget: str) -> None:
    """A batch at (high, low) timesteps runs; its noisy sample equals the same sample in a batch
    at (high, high): one decision per forward, the noisiest sample's (runtime.timesteps)."""
    family, model, handle = _build(tech, fam, budget)
    with torch.no_grad():
        mixed = _sample(model(**family.inputs(_timesteps(family.t_high, family.t_low))))
    if handle is not None:
        handle.remove()
    family2, model2, handle2 = _build(tech, fam, budget)
    with torch.no_grad():
        noisy = _sample(model2(**family2.inputs(_timesteps(family2.t_high, family2.t_high))))
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[0], noisy[0], rtol=1e-4, atol=1e-5)


def test_svg2_dense_warm_up_follows_the_noisiest_sample() -> None:
    """SVG2's step-counted dense warm-up with a mixed batch: the first step's sample puts the
    whole forward in warm-up, so the other sample (at the last step) gets the dense output too."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = _wan()
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    first, last = (float(t) for t in scheduler.timesteps)
    kwargs = family.inputs(torch.tensor([first, last]))
    with torch.no_grad():
        dense = _sample(family.model(**kwargs))
        cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, dense_steps=0.5, dense_layers=0.0, backend="masked",
                         top_p=0.5)  # fmt: skip
        with apply_svg2(family.model, cfg, scheduler=scheduler) as handle:
            mixed = _sample(family.model(**kwargs))
            assert handle.stats.summary()["sparse_calls"] == 0
            family.model(**family.inputs(torch.tensor([last, last])))
            assert handle.stats.summary()["sparse_calls"] > 0  # the last step alone is sparse
    torch.testing.assert_close(mixed, dense)


_PER_TOKEN = [
    pytest.param("svg2", "full", id="svg2-full"),
    pytest.param("svg2", "reducing", id="svg2-reducing"),
    pytest.param("token_density", "full", id="token_density-full"),
    pytest.param("token_density", "reducing", id="token_density-reducing"),
]


@pytest.mark.parametrize("tech, budget", _PER_TOKEN)
def test_ti2v_per_token_timesteps(tech: str, budget: str) -> None:
    """Wan 2.2 TI2V-5B image-to-video: the timestep per token, the first frame's tokens at 0."""
    family, model, handle = _build(tech, "wan22_ti2v", budget)
    t = torch.full((BATCH, family.tokens), family.t_high)
    t[:, : family.tokens // 3] = 0.0  # the first of three latent frames is the clean image
    with torch.no_grad():
        out = _sample(model(**family.inputs(t)))
    assert out.shape == family.inputs(t)["hidden_states"].shape and torch.isfinite(out).all()


# -- B. gradient checkpointing ---------------------------------------------------------------------


def _grads(tech: str, fam: str, budget: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Parameter gradients of one forward + backward on a freshly patched model (fresh state)."""
    family, model, handle = _build(tech, fam, budget)
    if checkpointing:
        model.enable_gradient_checkpointing()
    out = _sample(model(**family.inputs(_timesteps(family.t_high, family.t_high))))
    out.float().pow(2).mean().backward()
    if handle is not None:
        handle.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tech, fam, budget", _cells())
def test_gradient_checkpointing_gives_the_same_gradients(tech: str, fam: str, budget: str) -> None:
    """``enable_gradient_checkpointing()`` + backward: the recompute takes the forward's decisions,
    so the gradients equal those without checkpointing."""
    plain = _grads(tech, fam, budget, checkpointing=False)
    checkpointed = _grads(tech, fam, budget, checkpointing=True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _training_grads(tech: str, fam: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Gradients of one step of the technique's own training loss (FlexDiT: distillation; DyDiT:
    distillation + FLOPs under Gumbel routers), per-sample random timesteps, fixed seeds."""
    from diffusers import DDPMScheduler

    from mmaccel.diffusion.dydit_train import DyDiTTrainConfig, dydit_loss
    from mmaccel.diffusion.train import distillation_loss

    family, teacher = FAMILIES[fam](), FAMILIES[fam]().model
    student, _ = TECHNIQUES[tech](family.model, True)
    student.train()
    if checkpointing:
        student.enable_gradient_checkpointing()
    kwargs = family.inputs(_timesteps(0.0, 0.0))
    batch = {"latents": kwargs["hidden_states"]}
    batch.update({k: kwargs[k] for k in ("class_labels", "encoder_hidden_states") if k in kwargs})
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # Gumbel noise
    if tech == "flexdit":
        loss, _ = distillation_loss(student, teacher, batch, DDPMScheduler(), gen)
        loss.backward()
    else:  # backward inside: the recompute needs the training routers too (as train_dydit does)
        with student.training_routers(noise=True):
            loss, _ = dydit_loss(student, teacher, batch, DyDiTTrainConfig(), DDPMScheduler(), gen)
            loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tech, fam", [(t, f) for t in ("flexdit", "dydit") for f in ("dit", "pixart")])
def test_training_step_with_gradient_checkpointing_gives_the_same_gradients(tech: str, fam: str) -> None:
    """FlexDiT's and DyDiT's own training step (train mode, the technique's loss) with
    ``enable_gradient_checkpointing()``: the same gradients as without."""
    plain = _training_grads(tech, fam, checkpointing=False)
    checkpointed = _training_grads(tech, fam, checkpointing=True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# -- C. torch.compile(fullgraph=True) of a warm step -----------------------------------------------


#: the compile cells that trace a whole model (seconds each): one per technique in the default run
_FAST_COMPILE = {("svg2", "wan", "reducing"), ("clip_parallel", "wan", "reducing"), ("token_density", "wan", "reducing"),
                 ("flexdit", "dit", "reducing"), ("dydit", "dit", "reducing")}  # fmt: skip


def _slow_compile(cell: tuple[str, str, str]) -> bool:
    return cell not in _FAST_COMPILE


@pytest.mark.parametrize("tech, fam, budget", _cells(_slow_compile))
def test_fullgraph_compile_of_a_warm_step_equals_eager(tech: str, fam: str, budget: str) -> None:
    """One eager forward (the warm-up: plans, caches, k-means centroids), then the next step under
    ``torch.compile(fullgraph=True)`` (dynamo, ``eager`` backend) equals a second eager one; a
    third step at the next timestep does not recompile (as diffusers' own compile test)."""
    family, model, handle = _build(tech, fam, budget)
    kwargs = family.inputs(_timesteps(family.t_high, family.t_high))
    with torch.no_grad():
        model(**kwargs)  # warm step
        torch._dynamo.reset()
        compiled_model = torch.compile(model, fullgraph=True, backend="eager")
        compiled = _sample(compiled_model(**kwargs))
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled_model(**family.inputs(_timesteps(family.t_high * 0.99, family.t_high * 0.99)))
    family2, model2, _ = _build(tech, fam, budget)
    with torch.no_grad():
        model2(**kwargs)
        eager = _sample(model2(**kwargs))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


_COLD = [
    pytest.param("svg2", "wan", id="svg2-wan"),
    pytest.param("clip_parallel", "wan", id="clip_parallel-wan"),
    pytest.param("flexdit", "dit", id="flexdit-dit"),
    pytest.param("dydit", "dit", id="dydit-dit"),
    pytest.param("token_density", "wan", id="token_density-wan"),
]


@pytest.mark.parametrize("tech, fam", _COLD)
def test_fullgraph_compile_of_a_cold_step(tech: str, fam: str) -> None:
    """The first forward after apply under ``torch.compile(fullgraph=True)`` (no eager warm-up),
    while reducing: it traces as one graph and equals an eager first forward."""
    family, model, _ = _build(tech, fam, "reducing")
    kwargs = family.inputs(_timesteps(family.t_high, family.t_high))
    with torch.no_grad():
        compiled = _sample(torch.compile(model, fullgraph=True, backend="eager")(**kwargs))
        _, model2, _ = _build(tech, fam, "reducing")
        eager = _sample(model2(**kwargs))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def _block_kinds(tech: str, model: torch.nn.Module) -> int:
    """Distinct block kinds a regional compile should compile once each: block classes (FlexDiT's
    Poolingformer blocks, SDTMs, dense blocks) or, for token density, pooled / sparse / dense."""
    if tech == "token_density":
        pooled, sparse = TokenDensityConfig().layout(len(model.blocks))
        return len({"pooled" if i in pooled else "sparse" if i in sparse else "dense" for i in range(len(model.blocks))})
    return len(model._repeated_blocks)


_REGIONAL = [
    pytest.param("svg2", "wan", id="svg2-wan"),
    pytest.param("clip_parallel", "wan", id="clip_parallel-wan"),
    pytest.param("flexdit", "dit", id="flexdit-dit"),
    pytest.param("token_density", "wan", id="token_density-wan"),
]


@pytest.mark.parametrize("tech, fam", _REGIONAL)
def test_regional_compile_compiles_one_graph_per_block_kind(tech: str, fam: str) -> None:
    """``compile_repeated_blocks(fullgraph=True)`` while reducing: one graph per block kind over two
    warm steps (no recompile), equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    family, model, _ = _build(tech, fam, "reducing")
    kwargs = family.inputs(_timesteps(family.t_high, family.t_high))
    with torch.no_grad():
        eager = _sample(model(**kwargs))
        counter = CompileCounterWithBackend("eager")
        model.compile_repeated_blocks(fullgraph=True, backend=counter)
        compiled = [_sample(model(**kwargs)) for _ in range(2)]
    assert counter.frame_count == _block_kinds(tech, model)
    if tech != "svg2":  # SVG2's second step warm-starts k-means from the first: another clustering
        torch.testing.assert_close(compiled[0], eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", ["full", "reducing"])
def test_regional_compile_of_a_dense_token_density_forward_shares_one_graph_across_kinds(budget: str) -> None:
    """Token density on Wan at full budget, or reducing at the low-noise timestep (keep 0.925: no
    pooling window): a dense forward reads nothing kind-specific, so the pooled and sparse blocks
    share one graph (the unhooked dense blocks: another) over two steps, equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    family, model, _ = _build("token_density", "wan", budget)
    kwargs = family.inputs(_timesteps(family.t_low, family.t_low))
    pooled, sparse = TokenDensityConfig().layout(len(model.blocks))
    assert pooled and sparse and len(pooled) + len(sparse) < len(model.blocks)
    with torch.no_grad():
        eager = _sample(model(**kwargs))
        counter = CompileCounterWithBackend("eager")
        model.compile_repeated_blocks(fullgraph=True, backend=counter)
        compiled = [_sample(model(**kwargs)) for _ in range(2)]
    assert counter.frame_count == 2  # hooked blocks (both kinds) + dense blocks
    torch.testing.assert_close(compiled[1], eager, rtol=1e-4, atol=1e-5)


# -- D. fused projections --------------------------------------------------------------------------


def _run(model: torch.nn.Module, family: Family) -> torch.Tensor:
    with torch.no_grad():
        return _sample(model(**family.inputs(_timesteps(family.t_high, family.t_high))))


def _stateless(tech: str) -> bool:
    return tech != "svg2"  # SVG2 warm-starts k-means from the previous forward


@pytest.mark.parametrize("tech, fam, budget", _cells())
def test_fuse_and_unfuse_qkv_projections_keep_the_output(tech: str, fam: str, budget: str) -> None:
    """``fuse_qkv_projections()`` after the technique, ``unfuse_qkv_projections()`` again, and the
    technique applied to a fused model: each forward equals the technique on the unfused model."""
    family, model, handle = _build(tech, fam, budget)
    if not hasattr(model, "fuse_qkv_projections"):
        pytest.skip(f"{type(model).__name__} has no fuse_qkv_projections")
    ref = _run(model, family)
    if handle is not None and not _stateless(tech):
        handle.reset_state()
    model.fuse_qkv_projections()
    fused = _run(model, family)
    if handle is not None and not _stateless(tech):
        handle.reset_state()
    model.unfuse_qkv_projections()
    unfused = _run(model, family)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unfused, ref, rtol=1e-4, atol=1e-5)
    if handle is None:  # a conversion: nothing to apply to a fused model
        return
    handle.remove()
    model.fuse_qkv_projections()
    _, handle = TECHNIQUES[tech](model, budget == "reducing")
    applied_fused = _run(model, family)
    handle.remove()
    model.unfuse_qkv_projections()
    torch.testing.assert_close(applied_fused, ref, rtol=1e-4, atol=1e-5)


def test_layer_stage_equals_itself_across_fused_projections() -> None:
    """A DualParal layer stage (cross-block K/V stored and used) on a fused Wan equals it unfused:
    its processor projects through the Wan adapter, fused or not."""
    from mmaccel.parallel_video.layer_pipeline import BlockContext, LayerStage

    family = _wan()
    model, kwargs = family.model, family.inputs(torch.full((1,), family.t_high))
    latents, text = kwargs["hidden_states"][:1], kwargs["encoder_hidden_states"][:1]

    def run() -> list[torch.Tensor]:
        stage, context = LayerStage(model, 0, len(model.blocks)), BlockContext()
        with stage.patch(context), torch.no_grad():
            cond = stage.conditions(torch.tensor([family.t_high]), text)
            rotary, hidden = stage.rotary(latents.shape, 0), stage.embed(latents)
            outs = []
            for block in range(len(model.blocks)):
                context.store, context.store_as, context.use = (0, 24), block, (block - 1 if block else None)
                outs.append(stage(hidden, cond, rotary))
        return outs

    unfused = run()
    model.fuse_qkv_projections()
    fused = run()
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- save / load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tech, fam, budget", _cells())
def test_save_pretrained_round_trips(tech: str, fam: str, budget: str, tmp_path) -> None:
    """``save_pretrained`` of a patched model writes the unpatched model's tensors (a converted
    model: its own), and ``from_pretrained`` of the folder gives the same output."""
    family, model, handle = _build(tech, fam, budget)
    model.save_pretrained(tmp_path / "saved")
    out = _run(model, family)
    if handle is not None:
        handle.remove()
        reloaded = type(model).from_pretrained(tmp_path / "saved").eval()
        assert reloaded.state_dict().keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(reloaded.state_dict()[k], v, rtol=0, atol=0, msg=k)
        reloaded, _ = TECHNIQUES[tech](reloaded, budget == "reducing")
    else:
        reloaded = type(model).from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(_run(reloaded, family), out, rtol=1e-5, atol=1e-6)
