"""The GPU run's instruments (benchmarks/gpu/profiling.py, steps.py), checked on the CPU: interleaved
timing, the profile's busy fraction and sync count, random weights built on the device with the
constructed buffers kept, regional compilation, FLOP counting and the report's summary table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

GPU = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu"


def _load(name: str):
    sys.path.insert(0, str(GPU))
    try:
        spec = importlib.util.spec_from_file_location(f"_gpu_{name}", GPU / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(GPU))
    return module


P = _load("profiling")
steps = _load("steps")


def test_time_variants_interleaves_and_rotates() -> None:
    order: list[str] = []
    fns = {n: (lambda n=n: order.append(n)) for n in "abc"}
    out = P.time_variants(fns, "cpu", rounds=10, warmup=1)
    assert order[:3] == ["a", "b", "c"]  # the warm-ups
    rounds = [order[3 + 3 * r : 6 + 3 * r] for r in range(10)]
    assert rounds[0] == ["a", "b", "c"] and rounds[1] == ["b", "c", "a"] and rounds[2] == ["c", "a", "b"]
    assert all(len(out[n]["times_s"]) == 10 and out[n]["min_s"] <= out[n]["median_s"] <= out[n]["max_s"] for n in fns)
    assert out["a"]["ratio"] == out["a"]["ratio_min"] == 1.0


def test_union_of_kernel_intervals() -> None:
    assert P._union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert P._union_us([]) == 0


def test_profile_call_on_cpu_counts_syncs_and_ranks_ops() -> None:
    x = torch.randn(64, 64)

    def fn() -> None:
        y = x @ x
        float(y.sum())  # one sync

    prof = P.profile_call(fn, "cpu")
    assert prof["syncs"]["counted"] == 1 and prof["syncs"]["kinds"] == {"item": 1}
    assert prof["kernels"] and any("mm" in k["name"] for k in prof["kernels"])
    assert prof["wall_ms"] > 0


def test_on_device_builds_on_meta_keeps_buffers_and_inits() -> None:
    from diffusers import WanTransformer3DModel

    from mmaccel.testing import TINY_WAN_TRANSFORMER

    torch.manual_seed(0)
    reference = WanTransformer3DModel(**TINY_WAN_TRANSFORMER)
    model = P.on_device(lambda: WanTransformer3DModel(**TINY_WAN_TRANSFORMER), "cpu", torch.bfloat16)
    for (name, b), (_, ref) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, ref.to(torch.bfloat16), msg=name)  # rotary tables computed, not left empty
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    weights = torch.cat([p.float().flatten() for p in params.values() if p.dim() >= 2])
    assert abs(weights.std().item() - 0.02) < 2e-3
    assert all(bool((p == 0).all()) for n, p in params.items() if n.endswith("bias"))
    assert not model.training


@pytest.mark.parametrize("family", ["dit", "wan"])
def test_regional_compile_equals_eager(family) -> None:
    torch._dynamo.reset()
    if family == "dit":
        from mmaccel.testing import tiny_dit_pipeline

        model = tiny_dit_pipeline(num_layers=2, sample_size=8).transformer.eval()
        inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500]), class_labels=torch.tensor([1]))
        expect = "per block (transformer_blocks)"
    else:
        from diffusers import WanTransformer3DModel

        from mmaccel.testing import TINY_WAN_TRANSFORMER

        model = WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, "num_layers": 2}).eval()
        inputs = dict(hidden_states=torch.randn(1, 16, 2, 4, 6), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.randn(1, 8, TINY_WAN_TRANSFORMER["text_dim"]))  # fmt: skip
        expect = "compile_repeated_blocks"
    with torch.no_grad():
        eager = model(**inputs, return_dict=False)[0]
        assert P.regional_compile(model, backend="eager") == expect
        compiled = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="no repeated blocks"):
        P.regional_compile(torch.nn.Linear(2, 2))


def test_floor_and_flop_count() -> None:
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    assert steps.count_flops(lambda: lin(x)) == 2 * 8 * 64 * 32
    assert steps.attention_flops(1, 2, 100, 100, 16, density=0.5) == 4 * 2 * 100 * 100 * 16 * 0.5
    assert P.floor_s(989e12, 0.0, "H100") == pytest.approx(1.0)
    assert P.floor_s(0.0, 4.8e12, "H200") == pytest.approx(1.0)


def test_report_summary_sets_the_prediction_beside_the_figure(tmp_path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "status.tsv").write_text("svg2\t0\t30\t40\nnar\t124\t40\t40\n")
    (work / "svg2.json").write_text(json.dumps({
        "step": "svg2", "status": "ok", "paper": "SVG2 1.89x", "settings": {"S": 32760}, "headers": ["a"],
        "rows": [[1]], "notes": [], "profiles": {"SVG2 attention": {"wall_ms": 13.0, "busy_fraction": 0.4,
        "kernels": [{"name": "triton_tem_fused", "ms": 5.0, "calls": 1}], "syncs": {"sync_calls": 3}}},
        "figures": {"headline": {"figure": "SVG2 attention", "value": 0.81, "min": 0.8, "max": 0.82, "paper": 1.89,
                                 "expected": 20.5}}}))  # fmt: skip
    readiness = tmp_path / "readiness.json"
    readiness.write_text(json.dumps({"rows": [{"technique": "SVG2", "syncs": 13.0, "ops_ratio": 2.12,
                                               "graph_breaks": 8}]}))  # fmt: skip
    steps.report(work, out, readiness)
    text = (out / "gpu_report.md").read_text()
    assert ("| SVG2 attention (`svg2`) | S 32760 | 0.81x (0.80-0.82) | FLOP/byte floor 20.50x; SVG2: 13 syncs/forward, ops 2.12x dense, "
            "8 breaks | SVG2 1.89x | missed |") in text  # fmt: skip
    assert "| nar | 124 | 40 | 40 | KILLED at its time cap |" in text
    assert "| NAR (`nar`) |  | no figure (missing) | – |" in text
    assert "Profile of **SVG2 attention**, GPU busy 40% of 13.0 ms" in text
    assert json.loads((out / "gpu_figures.json").read_text())["readiness"]["SVG2"]["syncs"] == 13.0


def test_predicted_floors_match_the_papers_flops() -> None:
    predict = _load("predict")
    rows = {r["name"]: r for r in predict.rows()}
    dit = rows["density: DiT-XL/2 dense"]["flops"]
    assert dit == pytest.approx(524.6e9 * 2 * 16, rel=0.03)  # DiT paper: XL/2 at 512 px = 524.6 GMACs per image
    sdpa = rows["svg2: SDPA (dense)"]
    assert sdpa["flops"] == 4 * 12 * 32760**2 * 128 and sdpa["h100_ms"] == pytest.approx(6.67, rel=0.01)
    assert rows["nar: GPT-L 24 x 24, NAR, 47 forwards"]["bytes"] * 147 == pytest.approx(
        rows["nar: GPT-L 24 x 24, PAR-4X, 147 forwards"]["bytes"] * 47)
    assert "| density: DiT-XL/2 dense |" in predict.table(list(rows.values()))


def test_a_step_runs_eager_and_regionally_compiled_on_tiny_shapes(tmp_path) -> None:
    """The compiled half of a step (which the dry run skips for time): PixArt, eager then compiled
    per block (backend ``eager`` in --tiny), every variant timed, profiled and predicted."""
    torch._dynamo.reset()
    steps.main(["pixart", "--work", str(tmp_path), "--tiny", "--budget-s", "300"])
    torch._dynamo.reset()
    d = json.loads((tmp_path / "pixart.json").read_text())
    assert d["status"] == "ok", d["notes"]
    assert [r[0] for r in d["rows"]] == ["dense (eager)", "token density (eager)", "dense (compiled)",
                                         "token density (compiled)"]  # fmt: skip
    assert set(d["settings"]["compile"]) == {"dense", "token density"}
    assert all("first call (compiles)" in v for v in d["settings"]["compile"].values())
    for name in ("dense (compiled)", "token density (compiled)"):
        f = d["figures"][name]
        assert f["rounds"] == 3 and f["flops"]  # 10 on a GPU == d["figures"][name.replace("compiled", "eager")]["flops"] > 0
        assert d["profiles"][name]["kernels"]
    assert d["figures"]["headline"]["figure"] == "token density at 2048 px (eager)"
