"""Patched-only failures of diffusers' own model tests (issue #32), as tests of ours.

`scripts/diffusers_model_tests.sh` runs diffusers' transformer tests with a technique applied to
every model they create (`mmaccel.benchmarks.diffusers_suite`). The contracts below hold for the
unpatched model and fail patched; each is a strict xfail until it is fixed (the cause is in its
reason; `docs/compat.md`, "diffusers' own model tests", lists them). Tiny Wan (token density's Flux and
HunyuanVideo tests: `mmaccel.testing`'s tiny builders), the budgets of
`mmaccel.benchmarks.contract_budgets`; compile with dynamo's ``eager`` backend (diffusers' tests use inductor:
the guards, and so the recompiles, are the same).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import WanTransformer3DModel

from mmaccel.benchmarks.contract_budgets import (
    svg2_at_budget,
    token_density_at_budget,
    token_density_at_every_step,
)
from mmaccel.diffusion.token_density import TokenDensityConfig, apply_token_density
from mmaccel.runtime.budget import CosineSchedule, LinearSchedule
from mmaccel.sparse_attn.svg2 import SVG2Config, apply_svg2
from mmaccel.testing import (
    TINY_WAN_TRANSFORMER,
    tiny_flux_inputs,
    tiny_flux_transformer,
    tiny_hunyuan_video_inputs,
    tiny_hunyuan_video_transformer,
)

torch.set_num_threads(1)

_APPLY = {"svg2": svg2_at_budget, "token_density": token_density_at_budget}

def _wan(tech: str | None, budget: str = "full") -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, "num_layers": 2}).eval()
    if tech is not None:
        _APPLY[tech](model, budget == "reducing")
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500, 300]),
                  encoder_hidden_states=torch.randn(2, 8, TINY_WAN_TRANSFORMER["text_dim"], generator=g))  # fmt: skip
    return model, inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(
    xfail: dict[str | tuple[str, str], pytest.MarkDecorator], techs: tuple[str | None, ...] = (None, *_APPLY)
) -> list[Any]:
    """(technique, budget) cases; ``xfail`` keyed by technique or by (technique, budget)."""
    return [pytest.param(t, b, marks=[xfail[k] for k in (t, (t, b)) if k in xfail]) for t in techs
            for b in ("full", "reducing") if t is not None or b == "full"]  # fmt: skip


@pytest.mark.parametrize("tech, budget", _params({}))
@torch.no_grad()
def test_fullgraph_compile_runs_the_same_call_twice_without_recompiling(
    tech: str | None, budget: str
) -> None:
    """diffusers' ``TorchCompileTesterMixin.test_torch_compile_recompilation_and_graph_break``."""
    model, inputs = _wan(tech, budget)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(**inputs)
        compiled(**inputs)


_BLOCK_KINDS = pytest.mark.xfail(
    strict=True,
    raises=torch._dynamo.exc.FailOnRecompileLimitHit,
    reason="by design: a reducing forward runs token density's pooled and sparse blocks of one "
    "class as two graphs (one per block kind, test_model_contracts.py::"
    "test_regional_compile_compiles_one_graph_per_block_kind); a limit of 1 allows one",
)


@pytest.mark.parametrize("tech, budget", _params({("token_density", "reducing"): _BLOCK_KINDS}))
@torch.no_grad()
def test_repeated_blocks_compile_within_a_recompile_limit_of_one(tech: str | None, budget: str) -> None:
    """diffusers' ``TorchCompileTesterMixin.test_torch_compile_repeated_blocks``."""
    model, inputs = _wan(tech, budget)
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        model(**inputs)
        model(**inputs)


_TOKEN_DENSITY = {
    "full": lambda model: token_density_at_budget(model, False),
    "reducing": lambda model: token_density_at_budget(model, True),
    "every_step": token_density_at_every_step,
}


@pytest.mark.parametrize("setting", ["reducing", pytest.param("every_step", marks=_BLOCK_KINDS)])
@torch.no_grad()
def test_token_density_repeated_blocks_compile_within_a_recompile_limit_of_one_at_diffusers_timestep(
    setting: str,
) -> None:
    """diffusers' ``test_torch_compile_repeated_blocks`` draws t = 44 for Wan: the reducing schedule
    (keep 0.97 there: no pooling window) runs dense, as full budget does, and a dense forward traces
    alike on the pooled and the sparse block: one graph. Keep 0.25 at every step reduces: two kinds."""
    model, inputs = _wan(None)
    _TOKEN_DENSITY[setting](model)
    inputs["timestep"] = torch.tensor([44, 44])
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        model(**inputs)
        model(**inputs)


def _token_density_family(fam: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    if fam == "wan":
        return _wan(None)
    model = tiny_flux_transformer() if fam == "flux" else tiny_hunyuan_video_transformer()
    return model, (tiny_flux_inputs if fam == "flux" else tiny_hunyuan_video_inputs)(model)


@pytest.mark.parametrize("fam, setting", [("wan", "full"), ("wan", "every_step"), ("flux", "full"),
                                          ("hunyuan_video", "full"), ("hunyuan_video", "every_step")])  # fmt: skip
def test_token_density_exports_at_a_constant_keep_ratio(fam: str, setting: str) -> None:
    """diffusers' ``test_compile_works_with_aot`` (its export step) under a ``ConstantSchedule``:
    the decision reads no timestep, so ``torch.export`` traces the forward pre-hook and the
    exported program (its plan fixed) equals eager. An export is no forward: nothing recorded."""
    model, inputs = _token_density_family(fam)
    handle = _TOKEN_DENSITY[setting](model)
    with torch.no_grad():
        eager = model(**inputs)[0]
    exported = torch.export.export(model, args=(), kwargs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(**inputs)[0], eager)
    assert [s.reduced for s in handle.stats.steps] == [setting == "every_step"]  # the eager forward only


def _timestep(inputs: dict[str, Any], *values: float) -> dict[str, Any]:
    """``inputs`` with a timestep of ``values`` (one per sample), in the inputs' timestep dtype."""
    return {**inputs, "timestep": torch.tensor(values, dtype=inputs["timestep"].dtype)}


@pytest.mark.parametrize("fam", ["wan", "hunyuan_video"])
def test_token_density_exports_a_schedule_that_reads_the_timestep(fam: str) -> None:
    """The contract budget while reducing (``LinearSchedule(0.25, 1.0)``; Wan: a pooled and a
    sparse_q block, HunyuanVideo: a pooled block): the exported program takes each call's plan
    from its timestep input, equal to eager at t = 900 (2x2 pooling), 500 (1x2) and 100 (dense),
    and the noisiest sample of a batch decides (Wan: [100, 900] pools 2x2, as eager does)."""
    model, inputs = _token_density_family(fam)
    handle = _TOKEN_DENSITY["reducing"](model)
    exported = torch.export.export(model, args=(), kwargs=inputs).module()
    assert handle.stats.steps == []  # an export runs no forward
    batch = inputs["timestep"].numel()
    cases = [(900.0,) * batch, (500.0,) * batch, (100.0,) * batch] + ([(100.0, 900.0)] if batch == 2 else [])
    settings = []
    with torch.no_grad():
        for t in cases:
            x = _timestep(inputs, *t)
            torch.testing.assert_close(exported(**x)[0], model(**x)[0], rtol=0, atol=0)
            settings.append(handle.stats.steps[-1].setting)
    assert settings[:3] == [(1, 2, 2), (1, 1, 2), (1, 1, 1)] and settings[3:] in ([], [(1, 2, 2)])


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=torch._inductor.exc.InductorError,
    reason="AOTInductor (diffusers' test_compile_works_with_aot packages the exported program) fails in "
    "inductor's cond lowering on torch 2.13: the cond node records a branch's bare tensor output as one output "
    "per batch row; with tuple outputs it compiles but computes wrong values (docs/token_density.md), so the "
    "failure is kept loud; the exported program itself runs (ExportedProgram.module(), the tests above)",
)
def test_token_density_program_exported_under_a_schedule_compiles_with_aot_inductor(tmp_path) -> None:
    """diffusers' ``test_compile_works_with_aot`` on Wan while reducing: export, then
    ``aoti_compile_and_package``; the package equals eager at every plan."""
    model, inputs = _wan(None)
    _TOKEN_DENSITY["reducing"](model)
    with torch.no_grad():
        exported = torch.export.export(model, args=(), kwargs=inputs)
        package = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))
        )
        for t in (900.0, 500.0, 100.0):
            x = _timestep(inputs, t, t)
            torch.testing.assert_close(package(**x)[0], model(**x)[0])


def test_token_density_export_selects_the_plan_exactly_at_its_boundaries() -> None:
    """On either side of each progress where the plan changes (the float32 timesteps next to it),
    the exported program runs the plan eager does: the traced progress is the host's double."""
    from mmaccel.diffusion.token_density_export import plan_starts
    from mmaccel.runtime.budget import monotone_pieces

    model, inputs = _wan(None)
    inputs["timestep"] = inputs["timestep"].float()  # the program takes the timestep's dtype at export
    handle = _TOKEN_DENSITY["reducing"](model)
    exported = torch.export.export(model, args=(), kwargs=inputs).module()
    schedule = LinearSchedule(0.25, 1.0)
    starts = plan_starts(lambda p: _pool_window(schedule(p)), monotone_pieces(schedule))
    assert len(starts) == 3
    with torch.no_grad():
        for start in starts[1:]:
            t = torch.tensor((1.0 - start) * 1000, dtype=torch.float32)
            sides = [torch.nextafter(t, torch.tensor(inf)) for inf in (float("inf"), -float("inf"))]
            settings = []
            for side in sides:
                x = {**inputs, "timestep": side.expand(2).clone()}
                torch.testing.assert_close(exported(**x)[0], model(**x)[0], rtol=0, atol=0)
                settings.append(handle.stats.steps[-1].setting)
            assert settings[0] != settings[1]  # the two timesteps straddle the boundary


def _pool_window(keep: float) -> tuple[int, int, int]:
    from mmaccel.diffusion.token_density import _setting

    return _setting(TokenDensityConfig(), 128, keep)  # type: ignore[return-value]


def test_token_density_export_is_refused_in_one_line_where_it_cannot_select_exactly() -> None:
    """Refused with ``NotImplementedError``: a schedule other than Constant/Linear/Step (its plan
    intervals are not exact), a ``current_timestep_callback`` (its value would be fixed at export),
    and Flux below keep 1 (its token grid is read from img_ids' values)."""
    model, inputs = _wan(None)
    refused = {
        "under a CosineSchedule is not implemented.*ConstantSchedule, LinearSchedule or StepSchedule":
            lambda m: apply_token_density(m, TokenDensityConfig(
                schedule=CosineSchedule(0.25, 1.0), pooled_blocks=(0, 1), sparse_blocks=(1, 2))),
        "a current_timestep_callback's value would be fixed at export": lambda m: apply_token_density(
            m, TokenDensityConfig(schedule=LinearSchedule(0.25, 1.0), pooled_blocks=(0, 1), sparse_blocks=(1, 2)),
            current_timestep_callback=lambda: 500.0),
    }  # fmt: skip
    for match, apply in refused.items():
        handle = apply(model)
        with pytest.raises(NotImplementedError, match=match):
            torch.export.export(model, args=(), kwargs=inputs)
        handle.remove()
    model, inputs = _token_density_family("flux")
    for apply in (token_density_at_every_step, _TOKEN_DENSITY["reducing"]):
        handle = apply(model)
        with pytest.raises(NotImplementedError, match="token grid is read from the values of img_ids"):
            torch.export.export(model, args=(), kwargs=inputs)
        handle.remove()


def test_torch_export_of_the_unpatched_model() -> None:
    """diffusers' ``TorchCompileTesterMixin.test_compile_works_with_aot`` (its export step) on the
    unpatched model: the baseline of the patched cases (token density above, SVG2 below)."""
    model, inputs = _wan(None)
    torch.export.export(model, args=(), kwargs=inputs)


def _svg2_wan(cfg: SVG2Config, **apply: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    model, inputs = _wan(None)
    apply_svg2(model, cfg, **apply)
    return model, inputs


_SVG2_EXPORTS = {  # the contract budgets (no dense warm-up), and a dense first layer
    "full": lambda: _wan("svg2", "full"),
    "reducing": lambda: _wan("svg2", "reducing"),
    "dense-layer": lambda: _svg2_wan(SVG2Config(num_q_clusters=4, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0,
                                                dense_steps=0.0, dense_layers=0.5, backend="masked")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_SVG2_EXPORTS))
def test_torch_export_of_svg2_without_dense_steps_cold_starts_every_call(case: str) -> None:
    """SVG2 with ``dense_steps=0`` decides nothing from the timestep, so the model exports: the
    exported program is a pure function whose every call cold-starts k-means from the seed's draw,
    i.e. equals a freshly patched model's first call, whatever the live model's k-means memory
    was at export time; export reads no timestep and leaves that memory and the stats as they were."""
    model, inputs = _SVG2_EXPORTS[case]()
    procs = [b.attn1.processor for b in model.blocks]
    other = {**inputs, "hidden_states": inputs["hidden_states"].flip(-1)}
    with torch.no_grad():
        model(**other)  # the live model is warm: the exported program must not start from its centroids
    memory = [(p.state.q_centroids, p.state.k_centroids, p.state.calls) for p in procs]
    stats = procs[0].stats.summary()
    exported = torch.export.export(model, args=(), kwargs=inputs).module()
    assert [(p.state.q_centroids, p.state.k_centroids, p.state.calls) for p in procs] == memory
    assert procs[0].stats.summary() == stats
    with torch.no_grad():
        for x in (inputs, other, inputs):
            fresh, _ = _SVG2_EXPORTS[case]()
            torch.testing.assert_close(exported(**x)[0], fresh(**x)[0])


def test_torch_export_of_svg2_with_dense_steps_is_refused_in_one_line() -> None:
    """With ``dense_steps > 0`` the dense-or-sparse step is chosen from the timestep's value on the
    host each forward, which an exported program cannot hold: ``NotImplementedError``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, dense_steps=0.2, dense_layers=0.0, backend="masked")
    model, inputs = _svg2_wan(cfg, scheduler=scheduler)
    with pytest.raises(NotImplementedError, match="torch.export of a model whose technique decides from the timestep"):
        torch.export.export(model, args=(), kwargs=inputs)


@torch.no_grad()
def test_token_density_at_full_budget_takes_any_flux_img_ids() -> None:
    """diffusers' Flux model tests (``img_ids = randn(h * w, 3)``): full budget computes what dense does.
    While reducing, ids that are not a raster grid give no layout to pool: a ``ValueError`` there is the rule."""
    model = tiny_flux_transformer()
    inputs = {
        **tiny_flux_inputs(model),
        "img_ids": torch.randn(8 * 12, 3, generator=torch.Generator().manual_seed(1)),
    }
    dense = model(**inputs)[0]
    handle = token_density_at_budget(model, False)
    torch.testing.assert_close(model(**inputs)[0], dense)
    assert handle.stats.steps[-1].dense_tokens == 8 * 12 and not handle.stats.steps[-1].reduced
    handle.remove()
    token_density_at_every_step(model)
    with pytest.raises(ValueError, match="raster-order img_ids"):
        model(**inputs)
