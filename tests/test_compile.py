"""torch.compile of the steady-state forward of FlexDiT, DyDiT, clip parallelism and the DualParal
layer stage: graph breaks counted with ``torch._dynamo.explain``, recompiles across timesteps
counted with a compile counter, compiled (``aot_eager``) == eager; regional compilation
(``compile_repeated_blocks``) on patched models. Token density and SVG2 have theirs in
``test_token_density.py`` / ``test_sparse_attn_wan.py``."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch._dynamo.testing import CompileCounterWithBackend

from mmaccel.diffusion import compile_repeated_blocks
from mmaccel.diffusion.dydit import DyDiTConfig, convert_to_dydit
from mmaccel.diffusion.flexdit import FlexDiTConfig, convert_to_flexdit
from mmaccel.diffusion.token_density import TokenDensityConfig, apply_token_density
from mmaccel.parallel_video.clip_parallel import ClipParallelConfig, apply_clip_parallel
from mmaccel.parallel_video.layer_pipeline import BlockContext, LayerStage
from mmaccel.runtime.budget import ConstantSchedule, LinearSchedule, StepSchedule
from mmaccel.runtime.distributed import DistContext
from mmaccel.sparse_attn.svg2 import SVG2Config, apply_svg2
from mmaccel.testing import tiny_cogvideox_pipeline, tiny_dit_pipeline, tiny_pixart_pipeline
from mmaccel.testing.hotpath import compile_counts, count_hot_path
from mmaccel.testing.models import TINY_WAN_TRANSFORMER

torch.set_num_threads(1)

#: 4 DiT blocks: a Poolingformer block, one SDTM (cross, recovery) and a top dense block.
FLEX = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 0, 1, 0), top_dense_blocks=1,
                     sparse_grid=(4, 4), schedule=LinearSchedule(0.25, 1.0))  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dit(num_layers: int = 4):
    """A tiny DiT on an 8x8 token grid."""
    return tiny_dit_pipeline(num_layers=num_layers, sample_size=16).transformer.eval()


def _dit_inputs(t: float) -> dict:
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 16, 16, generator=gen), timestep=torch.full((2,), t),
                class_labels=torch.tensor([3, 4]), return_dict=False)  # fmt: skip


def _wan(num_layers: int = 2) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, "num_layers": num_layers}).eval()


def _wan_inputs(
    t: float, frames: int = 4, hw: tuple[int, int] = (4, 6)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, frames, *hw, generator=gen)
    return latents, torch.tensor([t]), torch.randn(1, 8, TINY_WAN_TRANSFORMER["text_dim"], generator=gen)


def _breaks(fn, *args, **kwargs) -> torch._dynamo.backends.debugging.ExplainOutput:
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(fn)(*args, **kwargs)
    torch._dynamo.reset()
    return explain


def _assert_one_graph(fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` traces as one graph: no graph break."""
    explain = _breaks(fn, *args, **kwargs)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


def _assert_compiled_equals_eager(model) -> None:
    """One eager and one aot_eager-compiled forward at t=500 agree (each records its stats step)."""
    with torch.no_grad():
        eager = model(**_dit_inputs(500.0))[0]
        compiled = torch.compile(model, backend="aot_eager")(**_dit_inputs(500.0))[0]
    torch.testing.assert_close(compiled, eager)


@torch.no_grad()
def _randomise_dydit(model) -> None:
    """Routers that drop some head groups, MLP groups and tokens (as in test_dydit.py)."""
    gen = torch.Generator().manual_seed(0)
    for r in model.routers:
        r.head.bias.copy_(torch.randn(r.head.bias.shape, generator=gen) * 3)
        r.mlp.bias.copy_(torch.randn(r.mlp.bias.shape, generator=gen) * 3)
        r.token[2].bias.fill_(-0.05)
    model.clear_cache()


def test_flexdit_compiles_without_graph_breaks_and_recompiles_per_sparse_grid():
    """The sparse grid is chosen from the timestep host-side before the first tensor op: one graph,
    no break; a compiled model recompiles once per distinct grid, never per timestep."""
    model = convert_to_flexdit(_dit(), FLEX)
    _assert_one_graph(model, **_dit_inputs(900.0))
    steps = (900.0, 850.0, 100.0)
    grids = {t: model.flex.sparse_grid_at(float(model.progress(torch.tensor(t)))) for t in steps}
    assert len(set(grids.values())) == 2  # the first two timesteps share a grid
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for t in steps:
            torch.testing.assert_close(compiled(**_dit_inputs(t))[0], model(**_dit_inputs(t))[0])
    assert counter.frame_count == len(set(grids.values()))


def test_dydit_width_only_compiles_without_graph_breaks():
    """Pruned execution: widths and sliced weights are planned host-side before the first tensor
    op and the stats recorded after the last; 0 breaks, compiled == eager, same stats."""
    model = convert_to_dydit(_dit(2), DyDiTConfig(dynamic_tokens=False))
    _randomise_dydit(model)
    _assert_one_graph(model, **_dit_inputs(500.0))
    _assert_compiled_equals_eager(model)
    last = model.stats.steps[-2:]
    assert last[0] == last[1] and last[1]["flops"] < last[1]["dense_flops"]


@pytest.mark.slow  # two traces and a compile of the dynamic-shape graph: ~15 s of CPU
def test_dydit_token_skipping_breaks_once_per_gather_unless_dynamic_shapes_are_captured():
    """Spatial token skipping gathers a data-dependent number of tokens (``nonzero``): under the
    default dynamo config every block's gather is a graph break; with
    ``capture_dynamic_output_shape_ops`` it traces (unbacked sizes): 0 breaks, compiled == eager,
    same token counts recorded."""
    model = convert_to_dydit(_dit(2), DyDiTConfig())
    _randomise_dydit(model)
    explain = _breaks(model, **_dit_inputs(500.0))
    reasons = {r.reason.splitlines()[0] for r in explain.break_reasons}
    assert explain.graph_break_count >= len(model.transformer_blocks) and reasons == {
        "Dynamic shape operator"
    }
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        _assert_one_graph(model, **_dit_inputs(500.0))
        _assert_compiled_equals_eager(model)
    last = model.stats.steps[-2:]
    assert last[0]["tokens"] == last[1]["tokens"] and min(last[1]["tokens"]) < 64


@pytest.mark.parametrize("name", ["flexdit", "dydit", "dydit-masked"])
def test_fullgraph_compile_of_a_batch_at_two_densities_equals_eager(name):
    """A batch at t = (900, 100): FlexDiT's two sparse grids and DyDiT's two width plans (pruned:
    one pass each; masked: one pass) are decided by the forward pre-hook, so the forward traces as
    one graph under ``fullgraph=True`` and equals eager, and DyDiT records the same stats."""
    if name == "flexdit":
        model = convert_to_flexdit(_dit(), FLEX)
        assert FLEX.sparse_grid_at(0.1) != FLEX.sparse_grid_at(0.9)
    else:
        model = convert_to_dydit(_dit(2), DyDiTConfig(dynamic_tokens=False))
        _randomise_dydit(model)
        model.set_execution("masked" if name.endswith("masked") else "pruned")
    inputs = {**_dit_inputs(0.0), "timestep": torch.tensor([900.0, 100.0])}
    with torch.no_grad():
        eager = model(**inputs)[0]
        compiled = torch.compile(model, fullgraph=True, backend="eager")(**inputs)[0]
    torch.testing.assert_close(compiled, eager)
    if name != "flexdit":  # one stats entry per pass, each call
        passes = 1 if name.endswith("masked") else 2
        assert len(model.stats.steps) == 2 * passes
        assert model.stats.steps[passes:] == model.stats.steps[:passes]


@pytest.mark.slow  # two inductor compiles: ~70 s of CPU
@pytest.mark.parametrize("name", ["flexdit", "dydit"])
def test_fullgraph_inductor_compile_of_a_cold_step_and_the_next_equals_eager(name):
    """``torch.compile(fullgraph=True)`` with inductor from the first forward after conversion
    (reducing: FlexDiT's linear schedule, DyDiT's random routers), then the next timestep without
    a recompile: both equal eager."""
    if name == "flexdit":
        model = convert_to_flexdit(_dit(), FLEX)
    else:
        model = convert_to_dydit(_dit(2), DyDiTConfig(dynamic_tokens=False))
        _randomise_dydit(model)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.no_grad():
        for t in (900.0, 890.0):
            with torch._dynamo.config.patch(error_on_recompile=t != 900.0):
                out = compiled(**_dit_inputs(t))[0]
            torch.testing.assert_close(out, model(**_dit_inputs(t))[0], rtol=1e-4, atol=1e-5)


def test_clip_parallel_compiles_without_graph_breaks_one_graph_per_phase():
    """World size 1 (no communication): 0 breaks; the timestep, the phase of the bias and the
    counters are handled by the pre-forward hook, so a compiled run recompiles once, when the
    phase bias switches scope, and its stats equal eager's."""
    model = _wan()
    with apply_clip_parallel(
        model, ClipParallelConfig(), ctx=DistContext.single(), num_latent_frames=4
    ) as handle:
        _assert_one_graph(model, *_wan_inputs(500.0))
        steps = (900.0, 880.0, 500.0, 400.0)  # phase_boundary 850: two steps on each side
        with torch.no_grad():
            eager = [model(*_wan_inputs(t)).sample for t in steps]
            handle.stats.reset()
            counter = CompileCounterWithBackend("aot_eager")
            compiled = torch.compile(model, backend=counter)
            for t, ref in zip(steps, eager):
                torch.testing.assert_close(compiled(*_wan_inputs(t)).sample, ref)
        assert counter.frame_count == 2
        assert handle.stats.summary()["calls"] == len(steps) * len(model.blocks)


def test_layer_stage_compiles_without_graph_breaks_one_graph_per_context_use():
    """A DualParal stage (all blocks, cross-block K/V context stored and used): 0 breaks; the
    context K/V moves host-side around the blocks, so frame blocks reuse the compiled graph."""
    model = _wan()
    latents, timestep, text = _wan_inputs(500.0)
    stage = LayerStage(model, 0, len(model.blocks))
    context = BlockContext()
    with stage.patch(context), torch.no_grad():
        cond, rotary, hidden = (
            stage.conditions(timestep, text),
            stage.rotary(latents.shape, 0),
            stage.embed(latents),
        )

        def run(fn) -> tuple[list[torch.Tensor], int]:
            context.evict()
            context.extra_key_tokens = 0
            outs = []
            for block in range(4):
                context.store, context.store_as, context.use = (0, 24), block, (block - 1 if block else None)
                outs.append(fn(hidden, cond, rotary))
            return outs, context.extra_key_tokens

        eager = run(stage)
        _assert_one_graph(stage.__call__, hidden, cond, rotary)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = run(torch.compile(stage.__call__, backend=counter))
    torch.testing.assert_close(compiled[0], eager[0])
    assert compiled[1] == eager[1] == 3 * 24 * len(model.blocks)
    assert counter.frame_count == 2  # without / with a cached context


def _regional(name: str):
    """(model, forward) for a patched model whose repeated blocks compile regionally."""
    if name == "flexdit":
        model = convert_to_flexdit(_dit(), FLEX)
        return model, lambda m: m(**_dit_inputs(500.0))[0]
    model = _wan(4)
    latents, _, text = _wan_inputs(500.0, frames=3, hw=(8, 12))  # token grid (3, 4, 6): pools 2x2

    def forward(m, t: float = 500.0) -> torch.Tensor:
        return m(latents, torch.tensor([t]), text, return_dict=False)[0]

    if name == "token_density":
        apply_token_density(model, TokenDensityConfig(schedule=ConstantSchedule(0.25)))
        return model, forward
    handle = apply_svg2(model, SVG2Config(num_q_clusters=4, num_k_clusters=6, dense_steps=0.0, dense_layers=0.0,
                                          backend="masked"))  # fmt: skip
    with torch.no_grad():
        forward(model, 700.0)  # cold start; every later step warm-starts from these centroids
    saved = [(p.state.q_centroids, p.state.k_centroids) for p in handle.processors]

    def warm_forward(m) -> torch.Tensor:
        for p, (q, k) in zip(handle.processors, saved):
            p.state.q_centroids, p.state.k_centroids = q, k
        return forward(m)

    return model, warm_forward


@pytest.mark.parametrize(
    "name",
    [  # token density and FlexDiT: ~8 s of CPU each
        pytest.param("token_density", marks=pytest.mark.slow),
        "svg2",
        pytest.param("flexdit", marks=pytest.mark.slow),
    ],
)
def test_compile_repeated_blocks_equals_eager(name):
    """diffusers' regional compilation (``compile_repeated_blocks``) of a patched model: the
    repeated blocks (Wan: ``WanTransformerBlock``; FlexDiT: its Poolingformer blocks, SDTMs and
    dense blocks) compile and the output equals eager."""
    model, forward = _regional(name)
    with torch.no_grad():
        eager = forward(model)
        model.compile_repeated_blocks(backend="aot_eager")
        compiled = forward(model)
    torch.testing.assert_close(compiled, eager)


def test_dydit_has_no_repeated_blocks():
    """DyDiT runs its blocks through the model's own pruned/masked methods (per-block plans), not
    the blocks' forward, so there is no region to compile: diffusers refuses it; compile the
    whole model (``test_dydit_width_only_compiles_without_graph_breaks``)."""
    model = convert_to_dydit(_dit(2), DyDiTConfig())
    with pytest.raises(ValueError, match="_repeated_blocks"):
        model.compile_repeated_blocks(backend="aot_eager")


# --------------------------------------------------------------------------------------------
# Hot path: 0 host-device syncs per steady-state forward, <= 2 compiles per 20-step run
# --------------------------------------------------------------------------------------------

#: a 20-step schedule; the forwards below pass views of it, as diffusers pipelines do
SCHEDULER = types.SimpleNamespace(timesteps=torch.linspace(999, 0, 20).round())
TWO_LEVEL = StepSchedule(boundaries=(0.5,), ratios=(0.25, 1.0))


def _dit_step(i: int) -> dict:
    return {**_dit_inputs(0.0), "timestep": SCHEDULER.timesteps[i].expand(2)}


def _hot_model(name: str):
    """(model, inputs of step i) for each fixed-shape reduced path, reading SCHEDULER's timesteps."""
    if name.startswith("token_density"):
        if name.endswith("wan"):
            model = _wan(2)
            latents, _, text = _wan_inputs(0.0, frames=3, hw=(8, 12))
            inputs = lambda i: dict(hidden_states=latents, timestep=SCHEDULER.timesteps[i].expand(1),  # noqa: E731
                                    encoder_hidden_states=text, return_dict=False)  # fmt: skip
            config = TokenDensityConfig(factor=(1, 2, 2), pooled_blocks=(0, 1), sparse_blocks=(1, 2))
        else:
            model, inputs = _dit(), _dit_step
            mode = name.split("-")[1]
            config = TokenDensityConfig(reducer="merge") if mode == "merge" else TokenDensityConfig(sparse_mode=mode)
        apply_token_density(model, config, scheduler=SCHEDULER)
        return model, inputs
    if name == "flexdit":
        model = convert_to_flexdit(_dit(), dataclasses.replace(FLEX, schedule=TWO_LEVEL))
    else:
        model = convert_to_dydit(_dit(), DyDiTConfig())
        _randomise_dydit(model)
        model.set_token_capacity(0.5)
    model.use_scheduler_timesteps(SCHEDULER)
    return model, _dit_step


HOT = ["token_density-sparse_q", "token_density-sparse_kv", "token_density-merge", "token_density-wan",
       "flexdit", "dydit"]  # fmt: skip


@pytest.mark.parametrize("name", HOT)
def test_reduced_forward_has_no_host_device_sync(name):
    """After a warm-up forward, a reduced forward reads no tensor value on the host: the density
    decision comes from the scheduler's timesteps (read once per schedule), pooling is reshape +
    mean, merging and DyDiT's token skipping gather fixed counts (no ``nonzero``)."""
    model, inputs = _hot_model(name)
    with torch.no_grad():
        model(**inputs(3))
    count = count_hot_path(lambda: model(**inputs(3)))
    assert count.syncs == 0, count.sync_counts
    assert count.ops > 50  # the counter saw the forward


def test_reading_the_timestep_tensor_is_counted_as_a_sync():
    """The counter can fail the test above: without the scheduler, the batch's timestep tensor is
    read on the host (one read of its min and max: ``runtime.timesteps.read_timestep``)."""
    model = _dit()
    apply_token_density(model, TokenDensityConfig())
    with torch.no_grad():
        model(**_dit_step(3))
    assert count_hot_path(lambda: model(**_dit_step(3))).syncs >= 1


@pytest.mark.slow  # six 20-step aot_eager runs: ~60 s of CPU
@pytest.mark.parametrize("name", HOT)
def test_twenty_step_run_compiles_at_most_twice(name):
    """A whole 20-step run under ``torch.compile``: no graph break, at most 2 compiles (token
    density and FlexDiT: one per density level of a two-level schedule; DyDiT: one, its kept widths
    are symbolic)."""
    model, inputs = _hot_model(name)
    counts = compile_counts(model, [((), inputs(i)) for i in range(20)])
    assert counts.graph_breaks == 0 and counts.compiles <= 2, counts


def test_dydit_symbolic_widths_compile_once_and_equal_eager():
    """DyDiT with 4 distinct width patterns over 20 timesteps compiles once (aot_eager, dynamic
    widths) and every compiled step equals eager."""
    model, inputs = _hot_model("dydit")
    patterns = {tuple(model._plan(i, float(t), torch.device("cpu"), torch.float32)["pattern"] for i in range(4))
                for t in SCHEDULER.timesteps}  # fmt: skip
    assert len(patterns) > 2
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for i in range(0, 20, 3):
            torch.testing.assert_close(compiled(**inputs(i))[0], model(**inputs(i))[0])
    assert counter.frame_count == 1


def _family(name: str):
    """(transformer, its inputs) of a tiny model of each family token density patches."""
    gen = torch.Generator().manual_seed(4)
    if name == "dit":
        return _dit(), _dit_inputs(500.0)
    if name == "pixart":
        model = tiny_pixart_pipeline(num_layers=3).transformer.eval()
        return model, dict(hidden_states=torch.randn(1, 4, 16, 16, generator=gen), timestep=torch.tensor([500.0]),
                           encoder_hidden_states=torch.randn(1, 8, 32, generator=gen), return_dict=False,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None})  # fmt: skip
    model = tiny_cogvideox_pipeline(num_layers=3).transformer.eval()
    return model, dict(hidden_states=torch.randn(1, 3, 4, 8, 12, generator=gen), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 32, 32, generator=gen), return_dict=False)  # fmt: skip


@pytest.mark.parametrize("name", ["dit", pytest.param("pixart", marks=pytest.mark.slow),
                                  pytest.param("cogvideox", marks=pytest.mark.slow)])  # ~25 s of CPU each
def test_regional_compilation_of_families_without_repeated_blocks(name):
    """DiT, PixArt and CogVideoX list no ``_repeated_blocks``: `compile_repeated_blocks` compiles
    their blocks from the adapter tables, dense and under token density's block hooks, and the
    output equals eager. DyDiT has no region and says so."""
    model, inputs = _family(name)
    cfg = (TokenDensityConfig(pooled_blocks=(0, 2), sparse_blocks=None, factor=(1, 2, 2), schedule=ConstantSchedule(0.25))
           if name == "cogvideox" else TokenDensityConfig(schedule=ConstantSchedule(0.25)))  # fmt: skip
    with torch.no_grad():
        dense = model(**inputs)[0]
        apply_token_density(model, cfg)
        reduced = model(**inputs)[0]
        counter = CompileCounterWithBackend("aot_eager")
        assert compile_repeated_blocks(model, backend=counter) == len(model.transformer_blocks)
        torch.testing.assert_close(model(**inputs)[0], reduced)
    assert counter.frame_count >= 1 and not torch.allclose(reduced, dense)
    with pytest.raises(ValueError, match="whole model"):
        compile_repeated_blocks(convert_to_dydit(_dit(2), DyDiTConfig()))


@pytest.mark.slow  # four inductor compiles: ~1 min of CPU
def test_bench_compile_16k_quick_prints_flops_and_time_ratios():
    """``bench_compile --shape pixart-16k --quick`` (1,024 tokens): a row per model and mode with
    the FLOPs ratio beside the time ratio, a verdict against 85% of it, and 0 syncs per forward."""
    import re

    from mmaccel.benchmarks import bench_compile

    text = bench_compile.main(["--shape", "pixart-16k", "--quick"])
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and " eager" in line
            or line.startswith("| ") and " inductor" in line]  # fmt: skip
    assert len(rows) == 8
    for cells in rows:
        assert re.fullmatch(r"\d+\.\d\dx", cells[4]) and cells[-1].rstrip(" |") == "0", cells
        if not cells[0].endswith("dense"):
            assert float(cells[4][:-1]) > 1.5 and re.match(r"(met|missed) \(\d+%\)", cells[7]), cells
