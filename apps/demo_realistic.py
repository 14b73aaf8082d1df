"""Speed figures on realistic shapes for the demo's tabs: the tab's settings, random weights.

The zoo models the tabs run by default have 48-336 tokens: too few for most techniques to pay
off. Each function here builds the same kind of model with random weights at a realistic token
count and width (depth reduced so a CPU answers in seconds), applies the tab's settings, and times
dense vs accelerated warm and interleaved (:func:`~mmaccel.apps.demo_timing.warm_compare`). The
outputs are noise: only the time ratio means anything, and it is labelled a "random-weight speed
figure". What was reduced is said in :attr:`RealisticFigure.shape`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmaccel.apps.demo_timing import GAIN_THRESHOLD, WarmTiming, warm_compare

__all__ = [
    "LABEL",
    "RealisticFigure",
    "realistic_ar",
    "realistic_dit",
    "realistic_video",
    "realistic_vlm",
    "step_progress",
]

#: How every figure of this module is labelled in the page.
LABEL = "random-weight speed figure"


@dataclass(frozen=True)
class RealisticFigure:
    """A warm speed ratio measured on a realistic shape with random weights.

    ``timing``: the timed unit (one forward, one attention call, one prefill, one image);
    ``whole_run``: the run-level ratio where the schedule mixes accelerated and dense steps (the
    timed per-step ratio weighted over the schedule's steps), else ``None``.
    """

    shape: str
    timing: WarmTiming
    unit: str
    whole_run: float | None = None
    schedule: str = ""

    @property
    def ratio(self) -> float:
        return self.whole_run if self.whole_run is not None else self.timing.ratio

    def markdown(self, toy_ratio: float | None = None) -> str:
        """The labelled figure, the shape, how it was timed, and words comparing it with the toy run."""
        lines = [f"**{LABEL}: {self.ratio:.2f}x**" + (f" over the whole run ({self.schedule})" if self.whole_run
                                                        is not None else f" per {self.unit}")]  # fmt: skip
        if self.whole_run is not None:
            lines.append(f"- per accelerated {self.unit}: {self.timing.ratio_text()}")
        else:
            lines.append(f"- spread: {self.timing.ratio_text()}")
        lines.append(f"- shape: {self.shape}")
        lines.append(f"- timing: {self.timing.method()}; random weights, the outputs are noise")
        if toy_ratio is not None:
            if toy_ratio < GAIN_THRESHOLD <= self.ratio:
                lines.append(
                    f"- the toy model is too small for a gain ({toy_ratio:.2f}x); at this shape the same "
                    f"settings give {self.ratio:.2f}x"
                )
            elif self.ratio < GAIN_THRESHOLD:
                lines.append(f"- no gain at this shape either on this machine ({self.ratio:.2f}x)")
        elif self.ratio < GAIN_THRESHOLD:
            lines.append(f"- no gain at this shape on this machine ({self.ratio:.2f}x)")
        return "\n".join(lines)


def _mixed_ratio(per_step: float, accelerated_steps: int, steps: int) -> float:
    """Run-level speed-up when ``accelerated_steps`` of ``steps`` run ``per_step`` times faster."""
    return steps / (accelerated_steps / per_step + (steps - accelerated_steps))


def step_progress(scheduler: Any, steps: int) -> list[float]:
    """Denoising progress ``1 - t / num_train_timesteps`` of each of ``steps`` steps of ``scheduler``
    (a copy is set, the pipeline's own is untouched)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    n = sched.config.num_train_timesteps
    return [1.0 - float(t) / n for t in sched.timesteps]


# ------------------------------------------------------------------------------------------
# Image DiT: DiT-XL/2 at 512 px
# ------------------------------------------------------------------------------------------

#: DiT-XL/2 at 512 px: 64x64 latent, patch 2 (1024 tokens), width 1152, 16 heads, 28 blocks.
DIT_XL_512 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, sample_size=64,
                  patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")  # fmt: skip
DIT_XL_BLOCKS = 28


def realistic_dit(
    keep_ratio: float,
    dense_from: float,
    progress: Sequence[float],
    blocks: int = 4,
    device: str = "cpu",
    shape: dict[str, Any] | None = None,
) -> RealisticFigure:
    """Token density at DiT-XL/2 512 px proportions (``blocks`` >= 3 of its 28 blocks, random weights;
    the "auto" layout of pooled, sparse and dense blocks scaled to that depth).

    Times one transformer forward of an early (reduced) step dense vs with token density
    (``keep_ratio`` until ``dense_from``, as the tab), then weighs it over the steps whose
    ``progress`` is below ``dense_from`` (the later steps run dense: ratio 1). ``shape`` overrides
    entries of `DIT_XL_512` (the tests use a small width).
    """
    from diffusers import DiTTransformer2DModel

    from mmaccel.diffusion.token_density import TokenDensityConfig, apply_token_density
    from mmaccel.runtime.budget import ConstantSchedule, StepSchedule

    dims = {**DIT_XL_512, **(shape or {})}
    side, cell = dims["sample_size"], dims["patch_size"]
    width = dims["num_attention_heads"] * dims["attention_head_dim"]
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**dims, num_layers=blocks).to(device).eval()
    x = torch.randn(1, dims["in_channels"], side, side, device=device)
    t = torch.tensor([999], device=device)  # progress ~0: a reduced step
    y = torch.tensor([1], device=device)
    schedule = (
        StepSchedule(boundaries=(dense_from,), ratios=(keep_ratio, 1.0)) if dense_from < 1 else ConstantSchedule(keep_ratio)
    )

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x, timestep=t, class_labels=y).sample

    config = TokenDensityConfig(schedule=schedule)
    pooled, sparse = config.layout(blocks)

    def patch() -> Any:
        return apply_token_density(model, config)

    timing, _, _ = warm_compare(forward, forward, patch=patch)
    reduced = sum(p < dense_from for p in progress)
    tokens = (side // cell) ** 2
    return RealisticFigure(
        shape=f"{'DiT-XL/2 at 512 px' if not shape else 'DiT, a smaller test shape'}: {tokens} tokens, width {width}, {dims['num_attention_heads']} heads; "
        f"{blocks} of its {DIT_XL_BLOCKS} "
        f"blocks (depth reduced so a CPU answers in seconds): {len(pooled)} pooled, {len(sparse)} sparse, "
        f"{blocks - len(pooled) - len(sparse)} dense (all 28: 2 / 22 / 4)",
        timing=timing,
        unit="forward (an early, reduced step)",
        whole_run=_mixed_ratio(timing.ratio, reduced, len(progress)),
        schedule=f"{reduced} of {len(progress)} steps reduced, the rest dense",
    )


# ------------------------------------------------------------------------------------------
# Video: Wan2.1-1.3B attention at ~16K tokens
# ------------------------------------------------------------------------------------------

#: Wan2.1-1.3B: width 1536 = 12 heads x 128, 30 blocks. 16 latent frames of 32x32 tokens = 16,384.
WAN_GRID = (16, 32, 32)
WAN_HEAD_DIM, WAN_HEADS = 128, 12
#: The video shapes of the figures: name -> (label, latent token grid, heads, blocks); head dim 128.
#: Wan2.2-TI2V-5B (24 heads x 128, 30 blocks; VAE 16x spatially, 4x in time, patch 2): 1280x704 px,
#: 41 frames -> 11 latent frames of 22x40 tokens = 9,680.
VIDEO_MODELS: dict[str, tuple[str, tuple[int, int, int], int, int]] = {
    "wan2.1-1.3b": ("Wan2.1-1.3B", WAN_GRID, WAN_HEADS, 30),
    "wan2.2-ti2v-5b": ("Wan2.2-TI2V-5B at 1280x704, 41 frames", (11, 22, 40), 24, 30),
}


def clustered_qkv(
    grid: tuple[int, int, int], heads: int, dim: int, objects: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic video-attention inputs ``(1, heads, S, dim)``: tokens belong to ``objects`` regions
    (nearest of random seed points in (frame, row, col), time scaled down so regions persist);
    each region has a random mean per head, shared by its queries and keys (another for values), and
    every token adds unit noise. Random, but with the
    semantic structure SVG2 clusters on (random weights on noise give none)."""
    gen = torch.Generator().manual_seed(seed)
    f, h, w = grid
    t, yy, xx = torch.meshgrid(torch.arange(f) / f * 0.3, torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    pos = torch.stack([t, yy, xx], -1).reshape(-1, 3)
    seeds = torch.rand(objects, 3, generator=gen) * torch.tensor([0.3, 1.0, 1.0])
    region = torch.cdist(pos, seeds).argmin(-1)
    s = region.numel()
    shared = torch.randn(heads, objects, dim, generator=gen) * 0.9  # queries and keys of a region align
    values = torch.randn(heads, objects, dim, generator=gen)
    q, k, v = ((m[:, region] + torch.randn(heads, s, dim, generator=gen))[None] for m in (shared, shared, values))
    return q, k, v


def realistic_video(
    top_p: float,
    dense_steps: float,
    steps: int,
    heads: int = 1,
    grid: tuple[int, int, int] | None = None,
    model: str = "wan2.1-1.3b",
) -> RealisticFigure:
    """SVG2 vs dense attention at a Wan model's head size and token count (`VIDEO_MODELS`: Wan2.1-1.3B,
    16K video tokens; Wan2.2-TI2V-5B at 720p, 9.7K), attention alone; ``grid`` overrides the model's.

    ``heads`` of the model's (1 on CPU: seconds per call); clusters 64 / 128 (the reference's 300 /
    1000 at ~76K tokens, scaled to the length); k-means warm-started from the previous call, as
    between denoising steps. The per-call ratio is weighed over the tab's schedule (the first
    ``dense_steps`` of the steps dense).
    """
    from mmaccel.sparse_attn import SVG2Config
    from mmaccel.sparse_attn.svg2 import SparseAttentionState, dense_step_count, semantic_sparse_attention

    if model not in VIDEO_MODELS:
        raise ValueError(f"model must be one of {tuple(VIDEO_MODELS)}, got {model!r}")
    name, model_grid, model_heads, blocks = VIDEO_MODELS[model]
    grid = model_grid if grid is None else grid
    q, k, v = clustered_qkv(grid, heads, WAN_HEAD_DIM)
    config = SVG2Config(num_q_clusters=64, num_k_clusters=128, top_p=float(top_p))
    state = SparseAttentionState()

    def dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def sparse() -> torch.Tensor:
        return semantic_sparse_attention(q, k, v, config, state)

    timing, _, _ = warm_compare(dense, sparse)
    dense_count = dense_step_count(float(dense_steps), steps)
    s = math.prod(grid)
    density = getattr(state.last, "density", None)
    return RealisticFigure(
        shape=f"{name} attention: {s:,} video tokens ({grid[0]} latent frames of {grid[1]}x{grid[2]}), "
        f"head dim {WAN_HEAD_DIM}; attention alone, {heads} of its {model_heads} heads (x {blocks} blocks in the model), "
        f"synthetic clustered Q/K/V; SVG2 64/128 clusters"
        + (f", measured density {density:.2f}" if density is not None else ""),
        timing=timing,
        unit="attention call (k-means included)",
        whole_run=_mixed_ratio(timing.ratio, steps - dense_count, steps),
        schedule=f"attention only: {steps - dense_count} of {steps} steps sparse",
    )


# ------------------------------------------------------------------------------------------
# VLM: LLaVA-NeXT-7B proportions
# ------------------------------------------------------------------------------------------


def _llava_next_like(layers: int, vision_layers: int, width_scale: float, device: str) -> Any:
    """A random LLaVA-NeXT with 7B's token counts (336 px CLIP tower, patch 14: 576 tokens per
    partition; anyres 672x672: 1 + 4 partitions) and its widths scaled by ``width_scale``."""
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from mmaccel.testing import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, tiny_tokenizer
    from mmaccel.vlm import load_vlm

    tok = tiny_tokenizer("llama")
    tok.model_max_length = 8192  # a 672 px image is ~2,900 tokens
    grow = lambda n: max(64, int(round(n * width_scale / 64)) * 64)  # noqa: E731
    vision = CLIPVisionConfig(hidden_size=grow(1024), intermediate_size=grow(4096), num_hidden_layers=vision_layers,
                              num_attention_heads=max(1, grow(1024) // 64), image_size=336, patch_size=14)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tok), hidden_size=grow(4096), intermediate_size=grow(11008),
                       num_hidden_layers=layers, num_attention_heads=max(1, grow(4096) // 128), max_position_embeddings=4096,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    pinpoints = [[336, 672], [672, 336], [672, 672]]
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints, image_seq_length=576,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, attr, getattr(tok, attr))
    processor_cls = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    image_processor = processor_cls(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
    )  # fmt: skip
    return load_vlm(model.to(device), processor=processor)


def realistic_vlm(
    budget: float, hired: bool, vista: bool, layers: int = 1, vision_layers: int = 2, width_scale: float = 0.25,
    device: str = "cpu",
) -> RealisticFigure:
    """TTFT (a prefill, one new token) dense vs HiRED / VISTA at LLaVA-NeXT-7B token counts
    (2,880 visual tokens of a 672x672 image: 5 partitions of 576) with random weights; the depth
    (``layers`` of 32 LLM layers, ``vision_layers`` of CLIP's 24) and, on CPU, the widths
    (``width_scale`` of 4096 / 1024) reduced so a CPU answers in seconds."""
    from mmaccel.runtime import TokenBudget
    from mmaccel.vlm import HiREDConfig, VISTAConfig, apply_hired, apply_vista

    vlm = _llava_next_like(layers, vision_layers, width_scale, device)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (672, 672, 3), dtype=np.uint8))
    seen: dict[str, int] = {}

    @contextmanager
    def accelerated() -> Iterator[None]:
        handles = []
        if hired:
            handles.append(apply_hired(vlm.model, HiREDConfig(budget=TokenBudget(ratio=float(budget)))))
        if vista:
            handles.append(apply_vista(vlm.model, VISTAConfig()))
        try:
            yield
            if hired:
                seen["after"] = handles[0].last_selections[0].tokens_after
        finally:
            for handle in reversed(handles):
                handle.remove()

    def prefill() -> Any:
        return vlm.generate(image, "What is shown in the image?", max_new_tokens=1)

    timing, dense, _ = warm_compare(prefill, prefill, patch=accelerated)
    before = dense.stats[0].visual_tokens_before
    after = seen.get("after", before)
    cfg = vlm.model.config
    return RealisticFigure(
        shape=f"LLaVA-NeXT-7B token counts: {before:,} -> {after:,} visual tokens ({dense.stats[0].partitions} "
        f"partitions, 672x672 image); LLM {layers} of 32 layers at width {cfg.text_config.hidden_size} "
        f"(7B: 4096), CLIP tower {vision_layers} of 24 layers at width {cfg.vision_config.hidden_size} (1024): "
        "depth and width reduced so a CPU answers in seconds",
        timing=timing,
        unit="prefill (TTFT)",
    )


# ------------------------------------------------------------------------------------------
# AR image: LlamaGen GPT-B at 256 px (16x16 tokens)
# ------------------------------------------------------------------------------------------


def realistic_ar(grid: int = 16, layers: int = 2, seed: int = 0) -> RealisticFigure:
    """Raster vs NAR decoding of a ``grid x grid`` token image with a LlamaGen GPT-B-shaped GPT
    (width 768, 12 heads, 16,384 codes; ``layers`` of its 12 layers), random weights."""
    from mmaccel.tokenizers_img.gpt import GPT, GPTConfig
    from mmaccel.tokenizers_img.nar import generate_nar
    from mmaccel.tokenizers_img.raster import generate_raster
    from mmaccel.tokenizers_img.sampling import SamplingConfig

    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=layers, num_classes=10)).eval()
    labels = torch.tensor([1])
    sampling = SamplingConfig(temperature=1.0, top_k=16)

    def sample(fn: Any) -> Any:
        with torch.no_grad():
            return fn(gpt, labels, grid=(grid, grid), sampling=sampling, generator=torch.Generator().manual_seed(seed))

    timing, raster, nar = warm_compare(lambda: sample(generate_raster), lambda: sample(generate_nar))
    return RealisticFigure(
        shape=f"LlamaGen GPT-B: {grid}x{grid} tokens ({grid * 16} px), width 768, 12 heads, 16,384 codes; "
        f"{layers} of its 12 layers; forward passes {raster.forward_passes} raster / {nar.forward_passes} NAR",
        timing=timing,
        unit="image",
    )
