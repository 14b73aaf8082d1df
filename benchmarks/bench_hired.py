"""HiRED benchmark: LLaVA-NeXT-shaped model, 5 partitions per image, budgets 100/40/20/10%.

HiRED only shrinks the language model's work, so the model keeps LLaVA-NeXT-7B's proportion
of a vision tower of ~4-5% of the language model's parameters, scaled down to a shared CPU:
a 12-layer CLIP tower at 336 px / patch 14 (576 tokens per partition) and a Llama-shaped
language model, random weights, built from configs (no download). A 672 x 672 image is the
base image + 2 x 2 crops: 5 x 576 = 2,880 patch tokens + 48 row newlines = 2,928 visual tokens.

Per batch size and budget it reports the stages (vision, scoring, prefill, decode), time to
first token (TTFT), end-to-end generated tokens/s, peak memory, KV-cache bytes, the ideal
TTFT ratio from the measured stages (vision does not shrink), and fidelity against the dense
run (first-token top-1 agreement and KL, generated-token agreement; random weights, so these
only show that pruning changes outputs by this much, not task accuracy). A separate table
measures the [CLS]-row scoring overhead on the real CLIP ViT-L/14-336 tower config.

The fidelity section runs a trained zoo model (``shapes-vlm``, a tiny LLaVA-NeXT, see
:mod:`mmaccel.apps.zoo.shapes_vlm`; ``--zoo`` picks another registered entry of the same recipe,
``--zoo-path`` an unregistered folder of it) on
its held-out scenes at 50/20/10%: QA accuracy, CHAIR_i / CHAIR_s and object recall of greedy
captions, and the visual tokens each image keeps, for HiRED (reference [CLS] selection), HiRED
with ``selection="diverse"`` (DivPrune's max-min diversity inside HiRED's budgets), FastV
(:func:`mmaccel.vlm.apply_fastv`, K = 2) and two baselines with HiRED's per-partition budgets:
random choice (5 seeds) and uniform spatial subsampling. Each rule's QA and recall are read
against the random seeds' range.

    .venv/bin/python -m mmaccel.benchmarks.bench_hired [--quick] [--write] [--threads N] [--repeats N] [--skip-clip-l] [--fidelity-only] [--zoo NAME | --zoo-path DIR]

Timing comes from :func:`mmaccel.benchmarks.harness.compare`: a warm-up call per budget, then
>= 5 interleaved rounds with the order rotated; times are medians with min-max, ratios the median of
the per-round ratios with min-max, flagged ``~noise`` where the time ranges overlap. The thread
count is fixed (``--threads``, default 1: on a CPU shared with other jobs small ops stall on
intra-op thread barriers when the other core is busy) and printed with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from tqdm import tqdm
from transformers import LogitsProcessorList

from mmaccel.apps.zoo import REGISTRY, zoo_module
from mmaccel.benchmarks.harness import MIN_REPEATS, RESULTS_DIR, append_results, compare, measure
from mmaccel.runtime.budget import TokenBudget
from mmaccel.runtime.environment import machine_description
from mmaccel.runtime.tables import markdown_table
from mmaccel.testing import tiny_image, tiny_tokenizer
from mmaccel.vlm import hired_select
from mmaccel.vlm.api import StepClock
from mmaccel.vlm.cls_attention import ClsAttentionRecorder, cls_attention_row
from mmaccel.vlm.fastv import FastVConfig, FastVHandle, apply_fastv
from mmaccel.vlm.hired import HiREDConfig, apply_hired

RESULTS = RESULTS_DIR / "hired.md"
BUDGETS = (1.0, 0.4, 0.2, 0.1)
BASELINE_BUDGETS = (0.5, 0.2, 0.1)
FASTV_K = 2
RANDOM_SEEDS = tuple(range(5))  # random pruning per seed; HiRED is read against their spread
PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
#: the zoo entries of the Shapes VLM recipe (seeds), judged by the fidelity section
SHAPES_ENTRIES = tuple(name for name in REGISTRY if name.startswith("shapes-vlm"))

SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        vision=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=12, num_attention_heads=2),
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12),
        image_size=336, new_tokens=32, batches=(1, 4),
    ),
    "quick": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=1),
        text=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4),
        image_size=112, new_tokens=8, batches=(1, 4),
    ),
}  # fmt: skip

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)  # fmt: skip


def build(size: dict[str, Any]):
    """A random-init LlavaNextForConditionalGeneration + LlavaNextProcessor of the given size."""
    import transformers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )

    tok = tiny_tokenizer("llama")
    tok.model_max_length = 4 * 4096  # 4 x 2,928 visual tokens fit
    b = size["image_size"]
    pinpoints = [[b, 2 * b], [2 * b, b], [2 * b, 2 * b], [3 * b, b], [b, 3 * b]]  # LLaVA-NeXT's
    vision = CLIPVisionConfig(image_size=b, patch_size=14, projection_dim=32, **size["vision"])
    text = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, max_position_embeddings=4 * 4096, **size["text"])  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(b // 14) ** 2, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    image_processor_cls = (
        getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor_cls(size={"shortest_edge": b}, crop_size={"height": b, "width": b},
                                            image_grid_pinpoints=pinpoints),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )  # fmt: skip
    return model, processor


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def kv_bytes(model, batch: int, seq: int) -> int:
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * seq * batch * 4


def scoring_work(model, inputs, config: HiREDConfig, handle, repeats: int) -> float:
    """Median seconds of the work HiRED adds to the vision stage: two [CLS] rows from the
    captured q/k (O(N) each), the (cached) token layout and the batched selection."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    v = cfg.vision_config
    sizes = inputs["image_sizes"]
    parts = sum(image_size_to_num_patches(s, cfg.image_grid_pinpoints, v.image_size) for s in sizes)
    q = torch.randn(parts, v.hidden_size)
    k = torch.randn(parts, (v.image_size // v.patch_size) ** 2 + 1, v.hidden_size)
    heads, scale = v.num_attention_heads, (v.hidden_size // v.num_attention_heads) ** -0.5

    def work() -> None:
        content = cls_attention_row(q, k, heads, scale)[:, 1:]
        select = cls_attention_row(q, k, heads, scale)[:, 1:]
        layout = handle.hired.batch_layout(sizes, len(sizes), parts, content.shape[1])
        hired_select.select_batch(layout, content, select, config.alpha, config.keep_newlines)

    return measure(work, repeats=repeats, warmup=1).median_s


def prefill_call(model, batch: int, seq: int) -> Callable[[], None]:
    """The language model's prefill alone (embeddings in, KV cache + first logits out)."""
    emb = torch.randn(batch, seq, model.config.text_config.hidden_size) * 0.02

    def run() -> None:
        out = model.model.language_model(inputs_embeds=emb, use_cache=True)
        model.lm_head(out.last_hidden_state[:, -1:])

    return run


def first_token_fidelity(dense_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean KL(dense || pruned) of the first generated token."""
    agree = float((dense_logits.argmax(-1) == logits.argmax(-1)).float().mean())
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True,
                                    reduction="batchmean")  # fmt: skip
    return agree, float(kl)


def speedup_spread(base: list[float], values: list[float], baseline: bool) -> str:
    """Per-round speed-up ``base[i] / values[i]``: median (min-max), `` ~noise`` where the two time
    ranges overlap (never on the ``baseline`` itself), as :meth:`harness.Comparison.ratio_text`."""
    ratios = [b / v for b, v in zip(base, values)]
    noise = not baseline and min(values) <= max(base) and min(base) <= max(values)
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" + (
        " ~noise" if noise else ""
    )


class Generation:
    """End-to-end greedy generate of one budget on its own copy of the model (HiRED installed once,
    outside the timed calls; 100% = the unpatched model): TTFT and outputs of every call."""

    def __init__(self, model, inputs, ratio: float, new: int) -> None:
        self.model, self.inputs, self.new = model, inputs, new
        self.config = HiREDConfig(budget=TokenBudget(ratio=ratio)) if ratio < 1.0 else None
        self.handle = apply_hired(model, self.config) if self.config is not None else None
        self.ttfts: list[float] = []
        self.outs: list[Any] = []

    def __call__(self) -> None:
        clock = StepClock()
        start = time.perf_counter()
        self.outs.append(self.model.generate(**self.inputs, max_new_tokens=self.new, min_new_tokens=self.new,
                                             do_sample=False, logits_processor=LogitsProcessorList([clock]),
                                             return_dict_in_generate=True, output_logits=True))  # fmt: skip
        self.ttfts.append(clock.times[0] - start)

    def lengths(self) -> tuple[int, int]:
        """(sequence length, visual tokens per image) the language model saw on the last call."""
        seq = self.inputs["input_ids"].shape[1]
        visual = int((self.inputs["input_ids"][0] == self.model.config.image_token_id).sum())
        if self.handle is None:
            return seq, visual
        sel = self.handle.last_selections[0]
        return seq - (sel.tokens_before - sel.tokens_after), sel.tokens_after


def run_batch(model, inputs, new: int, repeats: int) -> list[dict[str, Any]]:
    """Every budget of `BUDGETS` on one batch. Vision stage: median of ``repeats`` after a warm-up.
    End-to-end generate and LM prefill: :func:`harness.compare` over the budgets (a warm-up per
    budget, ``repeats`` interleaved rounds rotated each round, one untimed call each for peak memory)."""
    pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
    gens = {r: Generation(model if r == 1.0 else copy.deepcopy(model), inputs, r, new) for r in BUDGETS}
    with torch.inference_mode():
        vision = measure(lambda: model.model.get_image_features(pv, sizes), repeats=repeats, warmup=1)
        try:
            e2e = compare({f"{r:.0%}": g for r, g in gens.items()}, repeats=repeats, warmup=1, memory=True)
            lengths = {r: g.lengths() for r, g in gens.items()}
            scoring = {r: scoring_work(g.model, inputs, g.config, g.handle, repeats) if g.handle is not None else 0.0
                       for r, g in gens.items()}  # fmt: skip
        finally:
            for g in gens.values():
                if g.handle is not None:
                    g.handle.remove()
        batch = inputs["input_ids"].shape[0]
        prefill = compare({f"{r:.0%}": prefill_call(model, batch, lengths[r][0]) for r in BUDGETS},
                          repeats=repeats, warmup=1, memory=True)  # fmt: skip
    return [
        dict(ratio=r, vision=vision, scoring=scoring[r], e2e=e2e[f"{r:.0%}"], prefill=prefill[f"{r:.0%}"],
             ttfts=g.ttfts[1 : 1 + repeats], seq=lengths[r][0], visual=lengths[r][1],
             logits=g.outs[repeats].logits[0].float(), tokens=g.outs[repeats].sequences[:, -new:])
        for r, g in gens.items()
    ]  # fmt: skip


def run_model(size_name: str, repeats: int) -> tuple[str, str, list[str]]:
    size = SIZES[size_name]
    model, processor = build(size)
    vision_p, lm_p = n_params(model.model.vision_tower), n_params(model.model.language_model)
    new = size["new_tokens"]
    headers = ["batch", "budget", "visual tok/img", "seq", "vision s", "scoring s (% vision)", "prefill s (min-max)",
               "decode s", "TTFT s (min-max)", "TTFT x (min-max)", "ideal TTFT x", "% of ideal", "tok/s",
               "tok/s x (min-max)", "peak vision MB", "peak prefill MB", "peak e2e MB", "KV MB", "top-1 agree",
               "KL", "token agree"]  # fmt: skip
    rows: list[list[object]] = []
    checks: list[str] = []
    for batch in tqdm(size["batches"], desc="hired bench", unit="batch"):
        images = [tiny_image(2 * size["image_size"], 2 * size["image_size"], seed=i) for i in range(batch)]
        inputs = processor(images=images, text=[PROMPT] * batch, return_tensors="pt", padding=True)
        results = run_batch(model, inputs, new, repeats)
        d = results[0]  # 100% = dense
        for r in results:
            v_s, scoring, ratio = r["vision"].median_s, r["scoring"], r["ratio"]
            ideal = (v_s + d["prefill"].median_s) / (v_s + r["prefill"].median_s)
            ttft = statistics.median(r["ttfts"])
            speed = statistics.median(b / t for b, t in zip(d["ttfts"], r["ttfts"]))  # as speedup_spread
            total = r["e2e"].median_s
            tps, tps_x = batch * new / total, d["e2e"].median_s / total
            agree, kl = first_token_fidelity(d["logits"], r["logits"])
            token_agree = float((r["tokens"] == d["tokens"]).float().mean())
            rows.append([
                batch, f"{ratio:.0%}", r["visual"], r["seq"], v_s, f"{scoring:.3g} ({100 * scoring / v_s:.2g}%)",
                r["prefill"].time_text(), total - ttft, f"{ttft:.3g} ({min(r['ttfts']):.3g}-{max(r['ttfts']):.3g})",
                speedup_spread(d["ttfts"], r["ttfts"], r is d), ideal, f"{100 * speed / ideal:.0f}%", tps,
                r["e2e"].ratio_text(), r["vision"].peak_bytes / 2**20, r["prefill"].peak_bytes / 2**20,
                r["e2e"].peak_bytes / 2**20, kv_bytes(model, batch, r["seq"] + new) / 2**20, agree, kl, token_agree,
            ])  # fmt: skip
            if ratio == 0.2:
                checks.append(f"batch {batch}, 20%: TTFT {speedup_spread(d['ttfts'], r['ttfts'], False)} (target >= 3.5x: "
                              f"{'met' if speed >= 3.5 else 'MISSED'}); {100 * speed / ideal:.0f}% of the ideal {ideal:.2f}x "
                              f"(target >= 90%: {'met' if speed / ideal >= 0.9 else 'MISSED'}); scoring "
                              f"{100 * scoring / v_s:.2g}% of vision (target <= 3%: {'met' if scoring <= 0.03 * v_s else 'MISSED'}); "
                              f"end-to-end throughput {r['e2e'].ratio_text()}" + (f" (target >= 2.5x: {'met' if tps_x >= 2.5 else 'MISSED'})"
                                                                               if batch == 4 else ""))  # fmt: skip
    if size_name == "quick":
        checks.insert(
            0,
            f"quick = smoke sizes (the tower is {100 * vision_p / lm_p:.0f}% of the LM): the targets apply to the full size",
        )
    t, v = model.config.text_config, model.config.vision_config
    desc = (f"`{size_name}` size: CLIP tower {v.num_hidden_layers} layers x {v.hidden_size} wide at {v.image_size} px "
            f"({vision_p / 1e6:.2f} M params), Llama LM {t.num_hidden_layers} layers x {t.hidden_size} wide, "
            f"{t.num_attention_heads} heads ({lm_p / 1e6:.1f} M params); vision = {100 * vision_p / lm_p:.1f}% of the LM. "
            f"Images {2 * v.image_size} px = 5 partitions; {new} new tokens (forced); fp32; "
            f"{torch.get_num_threads()} thread(s). Dense (100%) = the unpatched model; each budget runs on its own "
            f"copy of the model with HiRED installed once. Timing by harness.compare: a warm-up call per budget, then "
            f"{repeats} interleaved rounds (order rotated each round); times are medians with min-max, ratios the "
            f"median of the per-round ratios with min-max, `~noise` where the time ranges overlap. TTFT and tok/s are "
            f"measured inside one generate call (TTFT = first logits); prefill = the language model alone on the "
            f"final length; vision and scoring: medians of {repeats}; ideal TTFT x = (vision + dense prefill) / "
            f"(vision + pruned prefill); peaks are the live tensor storage of one untimed call; KV = the cache after "
            f"the last token.")  # fmt: skip
    return markdown_table(headers, rows), desc, checks


def run_clip_l(repeats: int) -> str:
    """[CLS]-row scoring overhead on the real CLIP ViT-L/14-336 config (random init), one partition.

    The hooks touch only the two scored layers, so their cost is measured on one layer (plain and
    hooked runs by :func:`harness.compare`) and related to a whole tower forward.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336)).eval()
    pixels = torch.randn(1, 3, 336, 336)
    inner = getattr(tower, "vision_model", tower)
    layers = inner.encoder.layers
    recorder = ClsAttentionRecorder([layer.self_attn for layer in layers], [0, 22])
    hooks = recorder.install()

    def layer(active: bool) -> Callable[[], None]:
        def run() -> None:
            recorder.active = active
            layers[22](hidden, None)

        return run

    with torch.inference_mode():
        forward = measure(lambda: tower(pixels), repeats=repeats, warmup=1)
        hidden = inner.pre_layrnorm(inner.embeddings(pixels))
        timed = compare({"layer": layer(False), "layer + hooks": layer(True)}, repeats=repeats, warmup=1)
        recorder.active = False
        q, k = torch.randn(1, 1024), torch.randn(1, 577, 1024)
        rows_only = measure(
            lambda: [cls_attention_row(q, k, 16, 64**-0.5) for _ in range(2)], repeats=20
        ).median_s
    for h in hooks:
        h.remove()
    plain, hooked = timed["layer"], timed["layer + hooks"]
    overhead, fwd = 2 * max(hooked.median_s - plain.median_s, 0.0), forward.median_s
    row = ["CLIP ViT-L/14-336 (24 x 1024, 577 tokens)", f"{fwd:.3g} ({min(forward.times_s):.3g}-{max(forward.times_s):.3g})",
           plain.time_text(), hooked.time_text(), f"{100 * overhead / fwd:.2g}%" + (" ~noise" if hooked.overlaps else ""),
           rows_only, f"{100 * rows_only / fwd:.2g}%"]  # fmt: skip
    headers = ["tower", "forward s (min-max)", "layer s (min-max)", "layer + hooks s (min-max)", "2 hooked layers / forward",
               "2 [CLS] rows s", "rows / forward"]  # fmt: skip
    return markdown_table(headers, [row])


def run_selection_cost(repeats: int) -> tuple[str, str]:
    """HiRED's selection (scores in, keep masks out) at LLaVA-NeXT-7B's layout against the CLIP
    ViT-L/14-336 tower it follows: 672 px images = 5 partitions of 576 tokens (2,928 positions),
    batch 1 and 8, 20% budget; ``cls`` (reference) and ``diverse`` (4,096-wide projected features,
    LLaVA-NeXT-7B's). Tower: one 336 px partition forward, x 5 per image."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model, processor = build(SIZES["full"])  # 336 px / patch 14: the 7B's 576 tokens per partition
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336)).eval()
    pixels = torch.randn(1, 3, 336, 336)
    with torch.inference_mode():
        forward = measure(functools.partial(tower, pixels), repeats=repeats, warmup=1)
    per_image = 5 * forward.median_s
    rows = []
    for batch in (1, 8):
        images = [tiny_image(672, 672, seed=i) for i in range(batch)]
        sizes = processor(images=images, text=[PROMPT] * batch, return_tensors="pt", padding=True)["image_sizes"]
        for selection in ("cls", "diverse"):
            config = HiREDConfig(budget=TokenBudget(ratio=0.2), selection=selection)
            with apply_hired(model, config) as handle:
                layout = handle.hired.batch_layout(sizes, batch, 5 * batch, 576)
                content, select = torch.rand(5 * batch, 576), torch.rand(5 * batch, 576)
                feats = torch.randn(batch, max(layout.lengths), 4096) if selection == "diverse" else None
                with torch.inference_mode():
                    run = functools.partial(hired_select.select_batch, layout, content, select, 0.2, True, feats)
                    t = measure(run, repeats=repeats, warmup=1)
            sel = t.median_s
            rows.append([batch, selection, f"{sel:.3g} ({min(t.times_s):.3g}-{max(t.times_s):.3g})", sel / batch,
                         f"{100 * sel / (batch * per_image):.3g}%"])  # fmt: skip
    headers = ["batch", "selection", "selection s (min-max)", "per image s", "% of the tower (5 partitions/image)"]
    notes = (f"CLIP ViT-L/14-336 forward, one partition: {forward.median_s:.3g} s (median of {repeats}, "
             f"{min(forward.times_s):.3g}-{max(forward.times_s):.3g}); a 672 px image = 5 partitions, so "
             f"{per_image:.3g} s of tower per image. Selection = `hired_select.select_batch` on the cached layout "
             f"(crop ranking, exact budget split, per-partition top-k or greedy max-min, newlines), HiRED 20%, "
             f"{torch.get_num_threads()} thread(s).")  # fmt: skip
    return markdown_table(headers, rows), notes


def run_ttft_peers(repeats: int) -> tuple[str, str]:
    """TTFT (generate one token) at batch 1 on the `full` size: dense, HiRED and FastV (K = 2,
    ``mode="prune"``) at 50% and 20%, each on its own copy of the model, by ``harness.compare``."""
    model, processor = build(SIZES["full"])
    size = SIZES["full"]["image_size"]
    inputs = processor(images=[tiny_image(2 * size, 2 * size, seed=0)], text=[PROMPT], return_tensors="pt")
    variants: dict[str, Callable[[], None]] = {}
    handles = []

    def ttft(m: torch.nn.Module) -> Callable[[], None]:
        return functools.partial(m.generate, **inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)

    variants["dense"] = ttft(model)
    for r in (0.5, 0.2):
        hired, fastv = copy.deepcopy(model), copy.deepcopy(model)
        handles += [apply_hired(hired, HiREDConfig(budget=TokenBudget(ratio=r))),
                    apply_fastv(fastv, FastVConfig(budget=TokenBudget(ratio=r), k=FASTV_K))]  # fmt: skip
        variants[f"HiRED {r:.0%}"], variants[f"FastV K={FASTV_K} {r:.0%}"] = ttft(hired), ttft(fastv)
    try:
        with torch.inference_mode():
            result = compare(variants, repeats=repeats, warmup=1)
    finally:
        for h in handles:
            h.remove()
    rows = [[name, c.time_text(), "1 (baseline)" if name == "dense" else c.ratio_text()] for name, c in result.items()]
    t = model.config.text_config
    notes = (f"`full` size (CLIP 12 x 96 at 336 px, Llama {t.num_hidden_layers} x {t.hidden_size}), one 672 px image "
             f"= 2,928 visual tokens, batch 1, TTFT = generate(max_new_tokens=1), fp32, {torch.get_num_threads()} "
             f"thread(s); {repeats} interleaved rounds by harness.compare (median, min-max, ~noise where the time "
             f"ranges overlap). FastV keeps every token in layers 0..{FASTV_K - 1} of {t.num_hidden_layers} (a 7B has 32) "
             f"and in the vision tower; HiRED drops them before the language model.")  # fmt: skip
    return markdown_table(["variant", "TTFT s (min-max)", "speed-up (min-max)"], rows), notes


@contextlib.contextmanager
def within_partition_baseline(kind: str, seed: int = 0) -> Iterator[None]:
    """While active, HiRED's per-partition budgets stand but the tokens inside each partition are
    chosen at random (``"random"``) or evenly spaced in raster order (``"uniform"``) instead of by
    [CLS] attention. Newline handling is HiRED's. (A host loop: an evaluation baseline only.)"""
    gen = torch.Generator().manual_seed(seed)

    def choose(partition: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(partition, dtype=torch.bool)
        for b in range(partition.shape[0]):
            for p, k in enumerate(kept[b].tolist()):
                idx = (partition[b] == p).nonzero().squeeze(1)
                n = idx.numel()
                if k == 0:
                    continue
                if kind == "random":
                    chosen = torch.randperm(n, generator=gen)[:k]
                else:
                    chosen = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp_max(n - 1)
                keep[b, idx[chosen]] = True
        return keep

    with mock.patch.object(hired_select, "top_in_partition", choose):
        yield


def _verdict(name: str, value: float, seeds: list[float]) -> str:
    low, high = min(seeds), max(seeds)
    where = "above every seed" if value > high else "below every seed" if value < low else "within the seeds"
    return f"{name} {value:.3f} vs random {low:.3f}-{high:.3f}: {where}"


def run_fidelity(quick: bool, zoo_path: str | None = None, zoo: str = "shapes-vlm") -> tuple[str, str, list[str]]:
    """Task quality of a zoo Shapes VLM (entry ``zoo``, or the folder ``zoo_path``) per budget: HiRED
    (reference [CLS] selection), HiRED with ``selection="diverse"``, FastV, and random / uniform
    choices inside HiRED's budgets."""
    from mmaccel.apps.zoo.shapes_vlm import evaluate
    from mmaccel.vlm.api import load_vlm

    if zoo not in SHAPES_ENTRIES:
        raise ValueError(f"zoo must be one of {list(SHAPES_ENTRIES)}, got {zoo!r}")
    n_questions, n_captions = (50, 25) if quick else (200, 100)
    model, processor = zoo_module(zoo).load(zoo_path)
    variants: list[tuple[str, HiREDConfig | None, Any]] = [("dense (no HiRED)", None, None)]
    variants.append(("HiRED 100%", HiREDConfig(budget=TokenBudget(ratio=1.0)), None))
    for r in BASELINE_BUDGETS:
        config = HiREDConfig(budget=TokenBudget(ratio=r))
        fastv = FastVConfig(budget=TokenBudget(ratio=r), k=FASTV_K, mode="mask")  # quality only: prune's outputs
        variants += [
            (f"HiRED {r:.0%}", config, None),
            (f"HiRED diverse {r:.0%}", HiREDConfig(budget=TokenBudget(ratio=r), selection="diverse"), None),
            *((f"random {r:.0%} seed {seed}", config, lambda seed=seed: within_partition_baseline("random", seed))
              for seed in RANDOM_SEEDS),
            (f"uniform spatial {r:.0%}", config, lambda: within_partition_baseline("uniform")),
            (f"FastV K={FASTV_K} {r:.0%}", None, lambda fastv=fastv: apply_fastv(model, fastv)),
        ]  # fmt: skip
    rows, results = [], {}
    for name, config, baseline in tqdm(variants, desc="hired fidelity"):
        vlm = load_vlm(model, processor=processor, hired=config)
        try:
            with baseline() if baseline is not None else contextlib.nullcontext() as active:
                m = evaluate(vlm, n_questions=n_questions, n_captions=n_captions)
                if isinstance(active, FastVHandle):  # positions the layers >= K still see
                    s = active.stats.summary()
                    m["visual tokens / image"] = s["image_tokens_after"] / s["sequences"]
        finally:
            vlm.remove_hired()
        results[name] = m
        rows.append([name, f"{m['visual tokens / image']:.1f}", f"{m['QA accuracy']:.3f}", f"{m['CHAIR_i']:.3f}",
                     f"{m['CHAIR_s']:.3f}", f"{m['object recall']:.3f}", f"{m['caption exact match']:.3f}"])  # fmt: skip
    checks = []
    for r in BASELINE_BUDGETS:  # the seed spread that every rule is read against
        runs = [results[f"random {r:.0%} seed {seed}"] for seed in RANDOM_SEEDS]
        cells = []
        for key in ("QA accuracy", "CHAIR_i", "CHAIR_s", "object recall", "caption exact match"):
            values = [m[key] for m in runs]
            cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        rows.append([f"random {r:.0%}, {len(runs)} seeds: mean (min-max)",
                     f"{statistics.mean(m['visual tokens / image'] for m in runs):.1f}", *cells])  # fmt: skip
        for rule in ("HiRED", "HiRED diverse", f"FastV K={FASTV_K}"):
            m = results[f"{rule} {r:.0%}"]
            checks.append(f"{rule} {r:.0%}: " + "; ".join(
                _verdict(key, m[key], [x[key] for x in runs]) for key in ("QA accuracy", "object recall")))  # fmt: skip
    headers = ["variant", "visual tok/img", "QA accuracy", "CHAIR_i", "CHAIR_s", "object recall", "caption exact"]
    label = zoo_path or zoo
    notes = (f"Zoo model `{label}` (trained LLaVA-NeXT, 2-5 anyres partitions of 64 tokens), held-out scenes: "
             f"{n_questions} questions (count / is-there / colour / shape / total, exact match) and {n_captions} "
             f"greedy captions; CHAIR over the 16 colour+shape categories (count errors are not hallucinations), "
             f"recall = ground-truth categories mentioned. Visual tokens per image are the LLM positions kept, "
             f"row newlines included; HiRED alpha 0.5, crop split as the reference (base image's layer-0 [CLS] "
             f"top tokens counted per strip). HiRED diverse: the same per-partition budgets, tokens picked by "
             f"DivPrune's greedy max-min cosine diversity of the projected features. random / uniform spatial: "
             f"the same budgets, tokens inside a partition chosen at random (seeds {RANDOM_SEEDS[0]}-"
             f"{RANDOM_SEEDS[-1]}; the mean row gives their spread) / evenly spaced in raster order. FastV "
             f"(`apply_fastv`, K={FASTV_K}): the last prompt token's layer-{FASTV_K - 1} attention (0-based, heads "
             f"averaged) ranks all <image> positions (newlines included), the rest are masked (`mode='mask'`, "
             f"the outputs of the default `'prune'`) from layers "
             f"{FASTV_K}..{model.config.text_config.num_hidden_layers - 1}; its tok/img column is what those "
             f"layers see (layers < {FASTV_K} see all).")  # fmt: skip
    return markdown_table(headers, rows), notes, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 1 min")
    parser.add_argument("--write", action="store_true", help=f"append the tables to {RESULTS}")
    parser.add_argument("--skip-clip-l", action="store_true", help="skip the CLIP ViT-L/14-336 overhead run")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)"
    )
    parser.add_argument("--fidelity-only", action="store_true", help="only the zoo-model fidelity section")
    parser.add_argument("--selection-cost", action="store_true", help="only the selection-vs-tower timing")
    parser.add_argument("--ttft-peers", action="store_true", help="only TTFT of dense / HiRED / FastV, batch 1")
    parser.add_argument("--zoo", default="shapes-vlm", choices=SHAPES_ENTRIES, help="the zoo entry to judge")
    parser.add_argument("--zoo-path", default=None, help="an unregistered folder of the shapes-vlm recipe to judge")
    parser.add_argument(
        "--repeats", type=int, default=MIN_REPEATS, help=f"interleaved rounds (>= {MIN_REPEATS})"
    )
    args = parser.parse_args()
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be >= {MIN_REPEATS}, got {args.repeats}")
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    print(f"Machine: {machine_description()}", flush=True)
    for asked, title, run in (
        (args.ttft_peers, "TTFT: dense vs HiRED vs FastV (prune), full size, batch 1", run_ttft_peers),
        (args.selection_cost, "HiRED selection cost vs the CLIP ViT-L/14-336 tower", run_selection_cost),
    ):
        if asked:  # a section run on its own
            table, notes = run(args.repeats)
            print(f"\n{table}\n\n{notes}\n")
            if args.write:
                append_results(title, table, notes=notes, path=RESULTS)
            return
    fidelity, fidelity_notes, verdicts = run_fidelity(args.quick, args.zoo_path, args.zoo)
    label = args.zoo_path or args.zoo
    print(f"\nFidelity on the zoo model {label}\n\n{fidelity}\n\n{fidelity_notes}\n")
    print("\n".join(verdicts))
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        append_results(f"HiRED / diverse / FastV fidelity, zoo {label} ({size})", fidelity,
                       notes=fidelity_notes + "\n\n" + "\n".join(f"- {v}" for v in verdicts), path=RESULTS)  # fmt: skip
    if args.fidelity_only:
        return
    table, desc, checks = run_model(size, args.repeats)
    print(f"\n{desc}\n\n{table}\n")
    print("\n".join(checks))
    clip = None
    if not (args.quick or args.skip_clip_l):
        clip = run_clip_l(args.repeats)
        print(f"\n{clip}\n")
    if args.write:
        append_results(
            f"HiRED ({size})", table, notes=desc + "\n\n" + "\n".join(f"- {c}" for c in checks), path=RESULTS
        )
        if clip is not None:
            append_results("HiRED scoring overhead, CLIP ViT-L/14-336", clip, path=RESULTS)


if __name__ == "__main__":
    main()
