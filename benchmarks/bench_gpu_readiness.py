"""GPU readiness on the CPU: what each technique's steady-state hot path would cost a GPU.

A GPU runs ahead of the Python host only while the host never waits for a value, launches few
kernels and replays one compiled graph. On tiny models of the real classes (`mmaccel.testing`),
after warm-up, this benchmark counts for each technique (`mmaccel.testing.hotpath`):

- host-device synchronisations per forward (``.item()``/``bool``/``float``, ``nonzero``, boolean
  indexing, data-dependent sizes, ``.cpu()``/``.tolist()``/``.numpy()``, ``synchronize``), and
  the same count for the dense model on the same inputs;
- aten ops per forward (views excluded) relative to the dense forward;
- graph breaks of one forward under ``torch.compile`` (``torch._dynamo.explain``);
- graphs compiled over a whole 20-step sampling run (``aot_eager``: first compiles and
  recompiles alike), beside the graphs ``explain`` counts for one call; ``--quick`` (the default suite's version, ~10 s) skips the two compile
  figures, which cost 7-50 s per technique on a CPU;
- for SVG2, the fraction of (128-token query tile x 64- / 128-token key tile) pairs a tiled
  kernel computes when each cluster's tokens are contiguous (the reference's permutation),
  against the exact cluster-pair density: the tile-level waste.

Targets (issue 26): 0 syncs in steady state, ops <= 1.2x dense, 0 graph breaks, <= 2 compiles
per run. On the CPU every data-dependent op counts, also one on a host-side tensor (e.g. NAR's
schedule masks), which on a GPU would not wait: the kinds column says which kinds were counted.

    .venv/bin/python -m mmaccel.benchmarks.bench_gpu_readiness [--quick] [--write] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mmaccel.benchmarks.harness import RESULTS_DIR, RESULTS_PATH
from mmaccel.runtime.environment import machine_description
from mmaccel.runtime.tables import markdown_table
from mmaccel.testing.hotpath import compile_counts, count_hot_path

RESULTS = RESULTS_DIR / "gpu_readiness.md"
RESULTS_JSON = RESULTS_DIR / "gpu_readiness.json"  # read by benchmarks/gpu/steps.py report (the CPU prediction)
SECTION = "## GPU readiness (`bench_gpu_readiness`)"
STEPS = 20
TARGETS = {"syncs": 0, "ops_ratio": 1.2, "graph_breaks": 0, "compiles": 2}
Calls = list[tuple[tuple[Any, ...], dict[str, Any]]]


@dataclass
class Case:
    """One technique on one tiny model: its forward, the dense forward on the same inputs, and
    the compile target with one ``(args, kwargs)`` per sampling step."""

    name: str
    model: str
    forward: Callable[[], Any]
    dense: Callable[[], Any]
    compile_fn: Callable[..., Any] | None
    compile_calls: Calls
    per_call: int = 1  # forwards per ``forward()`` call (NAR: one decode = many forwards)
    dense_per_call: int = 1
    notes: list[str] = field(default_factory=list)


def _steps(quick: bool) -> list[int]:
    """Indices of the 20 sampling steps compiled: all, or 5 spread over the run (``--quick``)."""
    return [0, 5, 10, 15, 19] if quick else list(range(STEPS))


# ------------------------------------------------------------------------------------ VLMs
def _vlm_case(name: str, quick: bool) -> Case:
    from mmaccel.testing import TINY_CALL_KWARGS, tiny_image, tiny_llava, tiny_llava_next
    from mmaccel.vlm import apply_attention_balance, apply_hired, apply_vista

    which = "llava" if name == "attention rebalancing" else "llava_next"  # rebalancing refuses LLaVA-NeXT
    model, processor = (tiny_llava if which == "llava" else tiny_llava_next)()
    dense_model, _ = (tiny_llava if which == "llava" else tiny_llava_next)()
    h, w = TINY_CALL_KWARGS[which]["image_size"]
    inputs = dict(processor(images=tiny_image(h, w), text=TINY_CALL_KWARGS[which]["text"], return_tensors="pt"))
    apply = {"HiRED": apply_hired, "VISTA": apply_vista, "attention rebalancing": apply_attention_balance}[name]
    apply(model)  # default config: the authors' settings

    def call(m):
        return lambda: m(**inputs, logits_to_keep=1)

    calls: Calls = [((), {**inputs, "logits_to_keep": 1})] * len(_steps(quick))
    return Case(name, f"tiny {type(model).__name__}", call(model), call(dense_model), model.forward, calls,
                notes=["one prefill forward (image + prompt); the run = the same prefill repeated"])  # fmt: skip


# -------------------------------------------------------------------------------- DiT family
def _dit_case(name: str, quick: bool) -> Case:
    from mmaccel.diffusion import (
        DyDiTConfig,
        FlexDiTConfig,
        TokenDensityConfig,
        apply_token_density,
        convert_to_dydit,
        convert_to_flexdit,
    )
    from mmaccel.testing import tiny_dit_pipeline

    pipe = tiny_dit_pipeline(num_layers=4, sample_size=16)  # 8 x 8 tokens
    dense = pipe.transformer.eval()
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([1, 5])

    def kwargs(i: int) -> dict[str, Any]:  # the timestep as diffusers' DiT pipeline passes it: a view of the schedule
        return dict(hidden_states=x, timestep=scheduler.timesteps[i].expand(2), class_labels=labels, return_dict=False)

    # the timestep is read on the host from the scheduler (`scheduler=` / `use_scheduler_timesteps`)
    if name == "token density":
        import copy

        model = copy.deepcopy(dense)
        apply_token_density(model, TokenDensityConfig(), scheduler=scheduler)
    elif name == "FlexDiT":  # 1 Poolingformer, one SDTM, 1 dense block (the paper's layout, 4 blocks)
        model = convert_to_flexdit(dense, FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 0, 1, 0),
                                                        top_dense_blocks=1, sparse_grid=(4, 4)))  # fmt: skip
        model.use_scheduler_timesteps(scheduler)
    else:
        model = convert_to_dydit(dense, DyDiTConfig())
        model.use_scheduler_timesteps(scheduler)
    model.eval()
    mid = STEPS // 2
    calls = [((), kwargs(i)) for i in _steps(quick)]
    notes = [f"one forward at t={float(scheduler.timesteps[mid]):.0f} (a view of the scheduler's timesteps, read on "
             f"the host); the run = {STEPS} DDIM timesteps"]  # fmt: skip
    if name == "DyDiT":
        notes.append("reference token skipping (a data-dependent token count per block); the named option "
                     "`set_token_capacity(0.5)` (fixed-capacity topk gather) has none of these syncs")  # fmt: skip
    return Case(name, f"tiny {type(model).__name__} (4 blocks, 64 tokens, batch 2)",
                lambda: model(**kwargs(mid)), lambda: dense(**kwargs(mid)), model, calls, notes=notes)  # fmt: skip


# -------------------------------------------------------------------------------- Wan family
def _wan(num_layers: int = 2):
    from diffusers import WanTransformer3DModel

    from mmaccel.testing import TINY_WAN_TRANSFORMER

    torch.manual_seed(0)
    return WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER, "num_layers": num_layers}).eval()


def _wan_inputs(frames: int, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    from mmaccel.testing import TINY_WAN_TRANSFORMER

    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, frames, *hw, generator=g), torch.randn(1, 8, TINY_WAN_TRANSFORMER["text_dim"], generator=g)


def _flow_timesteps() -> list[float]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    return [float(t) for t in scheduler.timesteps]


def _svg2_case(quick: bool) -> Case:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmaccel.sparse_attn import SVG2Config, apply_svg2

    dense, model = _wan(), _wan()
    latents, text = _wan_inputs(2, (40, 50))  # 2 x 20 x 25 = 1,000 video tokens
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    timesteps = [float(t) for t in scheduler.timesteps]
    # the reference's tokens per cluster (75,600 / 300 q, / 1000 k) at 1,000 tokens; every step sparse
    config = SVG2Config(num_q_clusters=4, num_k_clusters=13, dense_steps=0.0, dense_layers=0.0)
    apply_svg2(model, config, scheduler=scheduler)
    t = timesteps[-1]

    def kwargs(t: float) -> dict[str, Any]:
        return dict(hidden_states=latents, timestep=torch.tensor([t]), encoder_hidden_states=text, return_dict=False)

    calls = [((), kwargs(timesteps[i])) for i in _steps(quick)]
    return Case("SVG2", "tiny WanTransformer3DModel (2 layers, 1,000 video tokens)", lambda: model(**kwargs(t)),
                lambda: dense(**kwargs(t)), model, calls,
                notes=[f"4 / 13 clusters, backend auto (masked at 1,000 tokens), dense_steps 0; one warm forward at "
                       f"t={t:.0f}; the timestep read from the transformer's argument (one host read)"])  # fmt: skip


def _clip_case(quick: bool) -> Case:
    from mmaccel.parallel_video import ClipParallelConfig, apply_clip_parallel
    from mmaccel.runtime.distributed import DistContext

    dense, model = _wan(), _wan()
    latents, text = _wan_inputs(4, (4, 6))
    apply_clip_parallel(model, ClipParallelConfig(), ctx=DistContext.single(), num_latent_frames=4)
    timesteps = _flow_timesteps()

    def kwargs(t: float) -> dict[str, Any]:
        return dict(hidden_states=latents, timestep=torch.tensor([t]), encoder_hidden_states=text, return_dict=False)

    calls = [((), kwargs(timesteps[i])) for i in _steps(quick)]
    return Case("clip parallelism", "tiny WanTransformer3DModel (2 layers, 4 latent frames), world size 1",
                lambda: model(**kwargs(500.0)), lambda: dense(**kwargs(500.0)), model, calls,
                notes=["one rank (DistContext.single()); the run crosses the 850 phase boundary"])  # fmt: skip


def _stage_case(quick: bool) -> Case:
    from mmaccel.parallel_video import BlockContext, LayerStage

    model = _wan()
    latents, text = _wan_inputs(4, (4, 6))
    stage = LayerStage(model, 0, len(model.blocks))
    context = BlockContext()
    stage.patch(context)
    timesteps = _flow_timesteps()
    hidden, rotary = stage.embed(latents), stage.rotary(latents.shape, 0)
    conds = {i: stage.conditions(torch.tensor([timesteps[i]]), text) for i in _steps(quick)}
    tokens = hidden.shape[1]

    def item(block: int, use_context: bool) -> Callable[[], Any]:
        def run():
            context.store, context.store_as = ((0, tokens), block) if use_context else (None, None)
            context.use = block - 1 if use_context and block else None
            return stage(hidden, conds[_steps(quick)[-1]], rotary)

        return run

    item(0, True)()  # block 0's K/V in the context: block 1 attends to it
    calls: Calls = [((hidden, conds[i], rotary), {}) for i in _steps(quick)]  # a frame block per step
    context.store, context.store_as, context.use = (0, tokens), 1, 0
    return Case("DualParal stage", "LayerStage over a tiny WanTransformer3DModel (2 layers, 96 tokens)",
                item(1, True), item(1, False), stage.__call__, calls,
                notes=["one frame block through all blocks, storing its K/V and attending to the "
                       "previous block's; dense = the same stage without context"])  # fmt: skip


# -------------------------------------------------------------------------------------- NAR
def _nar_case(quick: bool) -> Case:
    from mmaccel.tokenizers_img import GPT, GPTConfig, SamplingConfig, decode, nar_schedule, raster_schedule

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=48, dim=32, n_layer=2, n_head=2, num_classes=4, multiple_of=16)).eval()
    grid, cond, sampling = 6, torch.tensor([1, 2]), SamplingConfig(top_k=16)
    nar, raster = nar_schedule(grid, grid), raster_schedule(grid, grid)

    def run(schedule):
        return lambda: decode(model, cond, schedule, sampling, generator=torch.Generator().manual_seed(0))

    calls: Calls = []
    original = model.hidden

    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    model.hidden = record  # the per-step forwards of one NAR decode, replayed under torch.compile
    try:
        run(nar)()
    finally:
        del model.hidden
    picked = [calls[round(i * (len(calls) - 1) / (STEPS - 1))] for i in _steps(quick)] if len(calls) > STEPS else calls
    return Case("NAR", f"GPT 2 x 32 (LlamaGen class), {grid} x {grid} tokens, batch 2, KV cache", run(nar),
                run(raster), model.hidden, picked, per_call=nar.forward_passes, dense_per_call=raster.forward_passes,
                notes=[f"per forward: one decode / its forwards (NAR {nar.forward_passes}, raster "
                       f"{raster.forward_passes}); dense = raster order; compiled: GPT.hidden, "
                       f"{len(picked)} of the NAR decode's {len(calls)} steps"])  # fmt: skip


BUILDERS: dict[str, Callable[[bool], Case]] = {
    "HiRED": lambda q: _vlm_case("HiRED", q),
    "VISTA": lambda q: _vlm_case("VISTA", q),
    "attention rebalancing": lambda q: _vlm_case("attention rebalancing", q),
    "token density": lambda q: _dit_case("token density", q),
    "FlexDiT": lambda q: _dit_case("FlexDiT", q),
    "DyDiT": lambda q: _dit_case("DyDiT", q),
    "SVG2": _svg2_case,
    "clip parallelism": _clip_case,
    "DualParal stage": _stage_case,
    "NAR": _nar_case,
}


# ----------------------------------------------------------------------------- measurements
def measure(case: Case, compile_: bool = True) -> dict[str, Any]:
    """Warm up, then count one forward of the technique and of dense; compile counts over the run."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(2):
            case.forward()
        case.dense()
    tech, dense = count_hot_path(case.forward), count_hot_path(case.dense)
    row: dict[str, Any] = {
        "technique": case.name, "model": case.model,
        "syncs": tech.syncs / case.per_call,
        "sync_kinds": {k: v / case.per_call for k, v in sorted(tech.sync_counts.items())},
        "sync_sites": {k: v / case.per_call for k, v in tech.sync_sites.most_common()},
        "dense_syncs": dense.syncs / case.dense_per_call,
        "ops": tech.ops / case.per_call, "dense_ops": dense.ops / case.dense_per_call,
        "notes": list(case.notes),
    }  # fmt: skip
    row["ops_ratio"] = row["ops"] / row["dense_ops"]
    row["graph_breaks"] = row["compiles"] = None
    if compile_ and case.compile_fn is not None:
        counts = compile_counts(case.compile_fn, case.compile_calls)
        row.update(graph_breaks=counts.graph_breaks, graphs=counts.graphs, compiles=counts.compiles,
                   compile_steps=len(case.compile_calls), break_reasons=list(counts.break_reasons[:3]))  # fmt: skip
    row["seconds"] = time.perf_counter() - t0
    return row


def tile_density(
    q_labels: torch.Tensor, k_labels: torch.Tensor, selected: torch.Tensor, q_tile: int, k_tile: int
) -> float:
    """Fraction of (query tile, key tile) pairs holding at least one selected cluster pair when the
    tokens of each cluster are contiguous (sorted by label): (N, Sq), (N, Sk), (N, Cq, Ck) -> float."""
    n, sq = q_labels.shape
    sk = k_labels.shape[1]
    qt, kt = math.ceil(sq / q_tile), math.ceil(sk / k_tile)

    def incidence(labels: torch.Tensor, tile: int, tiles: int, clusters: int) -> torch.Tensor:
        order = labels.sort(dim=1, stable=True).values  # the cluster of each position after the permutation
        tile_of = torch.arange(labels.shape[1]) // tile
        inc = torch.zeros(n, tiles, clusters)
        inc[torch.arange(n)[:, None], tile_of[None], order] = 1.0
        return inc

    hit = incidence(q_labels, q_tile, qt, selected.shape[1]) @ selected.float() @ incidence(
        k_labels, k_tile, kt, selected.shape[2]
    ).transpose(1, 2)
    return float((hit > 0).float().mean())


def svg2_tiles(quick: bool) -> list[dict[str, Any]]:
    """Tile-level density of SVG2's selection at the reference's tokens per cluster (~252 per
    query cluster, ~76 per key cluster: 300 / 1,000 clusters at 75,600 tokens), on q/k whose tokens
    fall in semantic groups (as video objects do), top-p 0.9, min_kc_ratio 0.1 (reference) and 0.02."""
    from mmaccel.sparse_attn import SparseAttentionState, SVG2Config, semantic_sparse_attention

    seq = 4096 if quick else 16384
    heads, d, groups = 2, 64, 48
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(heads, groups, d, generator=g)
    label = torch.randint(0, groups, (heads, seq), generator=g)
    base = torch.gather(centers, 1, label[..., None].expand(heads, seq, d)) * 1.5
    q, k = (base + 0.6 * torch.randn(1, heads, seq, d, generator=g) for _ in range(2))
    v = torch.randn(1, heads, seq, d, generator=g)
    qc, kc = round(seq / 252), round(seq / 75.6)
    rows = []
    for min_kc in (0.10, 0.02):  # the reference's floor of kept key clusters, and a lower one
        config = SVG2Config(num_q_clusters=qc, num_k_clusters=kc, top_p=0.9, min_kc_ratio=min_kc,
                            backend="masked" if seq <= 4096 else "auto", kmeans_init_iters=20, dense_steps=0.0,
                            dense_layers=0.0)  # fmt: skip
        state = SparseAttentionState()
        with torch.no_grad():
            semantic_sparse_attention(q, k, v, config, state)
        row = {"S": seq, "clusters": f"{qc} / {kc}", "top_p": 0.9, "min_kc_ratio": min_kc, "exact": float(state.density)}
        for k_tile in (64, 128):
            row[f"tiles_128x{k_tile}"] = tile_density(state.q_labels, state.k_labels, state.selected, 128, k_tile)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ tables
def _met(row: dict[str, Any]) -> str:
    misses = [name for name, bad in (("syncs", row["syncs"] > TARGETS["syncs"]),
                                     ("ops", row["ops_ratio"] > TARGETS["ops_ratio"]),
                                     ("breaks", (row["graph_breaks"] or 0) > TARGETS["graph_breaks"]),
                                     ("recompiles", (row["compiles"] or 0) > TARGETS["compiles"])) if bad]  # fmt: skip
    text = "missed: " + ", ".join(misses) if misses else "all met"
    return text + ("; compile not measured" if row["graph_breaks"] is None else "")


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}"


def _sites(row: dict[str, Any], top: int = 6) -> str:
    """Where the technique's syncs come from (innermost caller outside torch), most frequent first."""
    sites = list(row["sync_sites"].items())
    if not sites:
        return ""
    shown = ", ".join(f"`{site}` {_num(n)}" for site, n in sites[:top])
    return f". Syncs per forward from: {shown}" + (f" and {len(sites) - top} more sites" if len(sites) > top else "")


def readiness_table(rows: list[dict[str, Any]]) -> str:
    headers = ["technique", "tiny model", "syncs / forward (kinds)", "dense syncs", "aten ops vs dense",
               "graph breaks", "graphs compiled / run", "targets"]  # fmt: skip
    body = []
    for r in rows:
        kinds = ", ".join(f"{k} {_num(v)}" for k, v in r["sync_kinds"].items())
        breaks = "–" if r["graph_breaks"] is None else str(r["graph_breaks"])
        if r["graph_breaks"] and r.get("break_reasons"):
            breaks += f" ({r['break_reasons'][0][:80]})"
        compiles = "–" if r["compiles"] is None else (f"{r['compiles']} over {r['compile_steps']} steps "
                                                      f"(one call: {r['graphs']} graphs)")  # fmt: skip
        body.append([r["technique"], r["model"], f"{_num(r['syncs'])}" + (f" ({kinds})" if kinds else ""),
                     _num(r["dense_syncs"]), f"{_num(r['ops'])} / {_num(r['dense_ops'])} = {r['ops_ratio']:.2f}x",
                     breaks, compiles, _met(r)])  # fmt: skip
    return markdown_table(headers, body)


def tiles_table(rows: list[dict[str, Any]]) -> str:
    headers = ["S", "q / k clusters", "top-p", "min_kc_ratio", "exact cluster-pair density",
               "128 x 64 tiles computed", "128 x 128 tiles computed"]  # fmt: skip
    body = [[r["S"], r["clusters"], r["top_p"], r["min_kc_ratio"], f"{r['exact']:.3f}", f"{r['tiles_128x64']:.3f}",
             f"{r['tiles_128x128']:.3f}"] for r in rows]  # fmt: skip
    return markdown_table(headers, body)


def run(quick: bool, only: list[str] | None = None, compile_: bool = True) -> tuple[list[dict], list[dict]]:
    names = only or list(BUILDERS)
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise ValueError(f"only: unknown technique(s) {unknown}; choose from {list(BUILDERS)}")
    rows = []
    for name in names:
        torch._dynamo.reset()
        rows.append(measure(BUILDERS[name](quick), compile_))
        print(f"[readiness] {name}: {rows[-1]['seconds']:.1f} s", flush=True)
    tiles = svg2_tiles(quick) if "SVG2" in names else []
    return rows, tiles


def write_section(text: str, path=RESULTS_PATH) -> None:
    """Replace (or add, before the GPU section) the readiness section of RESULTS.md."""
    old = path.read_text()
    start = old.find(SECTION)
    if start >= 0:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text.rstrip() + "\n" + (old[end:] if end >= 0 else "")
    else:
        gpu = old.find("\n## GPU:")
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n" if gpu < 0 else old[:gpu] + "\n" + text.rstrip() + "\n" + old[gpu:]
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="counts only (no compile figures); smaller SVG2 tile check")
    parser.add_argument("--write", action="store_true", help=f"replace the readiness section of {RESULTS_PATH.name}")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"techniques to measure, of {list(BUILDERS)}")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip graph breaks and compiles")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (counts do not depend on it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    compile_ = args.compile and not args.quick
    rows, tiles = run(args.quick, args.only, compile_)
    mode = f"{STEPS} sampling steps compiled" if compile_ else "quick: compile figures not measured"
    text = (f"{SECTION}\n\nMachine: {machine_description()}; {mode}; {time.perf_counter() - t0:.0f} s. "
            "Counts per steady-state forward after warm-up, tiny models of the real classes; targets: 0 syncs, "
            "ops <= 1.2x dense, 0 graph breaks, <= 2 compiles per run (`aot_eager`).\n\n" + readiness_table(rows))  # fmt: skip
    if tiles:
        text += ("\n\nSVG2 at the reference's tokens per cluster: tile pairs a 128-token-query-tile kernel computes "
                 "(clusters contiguous) vs the exact cluster-pair density.\n\n" + tiles_table(tiles))  # fmt: skip
    notes = "\n".join(f"- {r['technique']}: " + "; ".join(r["notes"]) + _sites(r) for r in rows)
    print(text + "\n\n" + notes)
    if args.write:
        write_section(text + "\n\n" + notes)
        RESULTS.write_text(text + "\n\n" + notes + "\n")
        RESULTS_JSON.write_text(json.dumps({"machine": machine_description(), "mode": mode, "rows": rows,
                                            "svg2_tiles": tiles}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
