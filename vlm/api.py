"""Python API for VLM inference: ``load_vlm(...).generate(images, prompts)`` with stats.

Wraps a LLaVA-1.5 / LLaVA-NeXT model and its own processor (chat template when it has one),
batches any number of (image, prompt) pairs with left padding, optionally applies HiRED
(:func:`mmaccel.vlm.hired.apply_hired`), and reports per sample the visual tokens before / after
dropping, the partitions, time to first token, decode speed and peak memory.

Every input is checked against :class:`mmaccel.runtime.limits.Limits` before any work, as the CLI
and the demo check theirs: prompt characters (and NUL), new tokens, the prompt's tokens against
the model's own context, image pixels, sides (at least the vision patch) and finite values.
Raise a limit explicitly: ``vlm.generate(..., limits=Limits(max_new_tokens=8192))``.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

from mmaccel.runtime.adapters import llava
from mmaccel.runtime.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, check_image_limits, open_image
from mmaccel.runtime.limits import Limits, check_context, check_image_array
from mmaccel.runtime.paths import model_folder_class
from mmaccel.vlm.attention_balance import (
    AttentionBalanceConfig,
    AttentionBalanceHandle,
    apply_attention_balance,
)
from mmaccel.vlm.hired import HiREDConfig, HiREDHandle, apply_hired
from mmaccel.vlm.vista import VISTAConfig, VISTAHandle, apply_vista

__all__ = ["VLM", "VLMOutput", "SampleStats", "StepClock", "load_vlm", "load_image"]

ImageLike = Image.Image | str | Path | np.ndarray


@dataclass(frozen=True)
class SampleStats:
    """Per-sample numbers of one :meth:`VLM.generate` call (timings are the batch's)."""

    visual_tokens_before: int
    visual_tokens_after: int
    partitions: int
    new_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int


@dataclass(frozen=True)
class VLMOutput:
    texts: list[str]
    stats: list[SampleStats]


class StepClock(LogitsProcessor):
    """Timestamps every decoding step; pass it in ``logits_processor`` (the first one closes the prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.device.type == "cuda":
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def load_image(
    image: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE, name: str = "image"
) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, or an (H, W[, C]) uint8 / [0, 1] float array.

    A file's size is read from its header and checked against ``max_pixels`` and ``min_side``
    before it is decoded (:func:`mmaccel.runtime.images.open_image`); arrays must be finite.
    """
    if isinstance(image, Image.Image):
        check_image_limits(*image.size, max_pixels=max_pixels, min_side=min_side, what=name)
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        return open_image(image, max_pixels=max_pixels, min_side=min_side, name=name)
    if isinstance(image, np.ndarray):
        check_image_array(image, name=name, min_side=min_side, max_pixels=max_pixels)
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.floating) or image.min() < 0 or image.max() > 1:
                raise ValueError("non-uint8 image arrays must be floats in [0, 1]")
            image = (image * 255).round().astype(np.uint8)
        return Image.fromarray(
            image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image
        ).convert("RGB")
    raise TypeError(f"images must be PIL images, paths or numpy arrays, got {type(image).__name__}")


class VLM:
    """A loaded vision-language model ready for batched ``generate``; see :func:`load_vlm`."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        hired: HiREDConfig | None = None,
        vista: VISTAConfig | None = None,
        attention_balance: AttentionBalanceConfig | None = None,
    ) -> None:
        if type(model).__name__ not in llava.MODELS:
            raise TypeError(f"VLM supports {', '.join(llava.MODELS)}; got {type(model).__name__}")
        self.model = model.eval()
        self.processor = processor
        self.handle: HiREDHandle | None = apply_hired(model, hired) if hired is not None else None
        # VISTA computes each sample's steering vector at every generate prefill.
        self.vista: VISTAHandle | None = apply_vista(model, vista) if vista is not None else None
        self.balance: AttentionBalanceHandle | None = (
            apply_attention_balance(model, attention_balance) if attention_balance is not None else None
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def format_prompt(self, prompt: str) -> str:
        """The model's chat template around one image + ``prompt``; raw ``prompt`` if it has ``<image>``."""
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in prompt:
            return prompt
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"{image_token}\n{prompt}"

    @torch.inference_mode()
    def generate(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompts: str | Sequence[str],
        max_new_tokens: int = 32,
        *,
        limits: Limits | None = None,
        **generate_kwargs: Any,
    ) -> VLMOutput:
        """Answer ``prompts[i]`` about ``images[i]`` for every i, in one batch (greedy by default).

        ``limits`` (default :class:`~mmaccel.runtime.limits.Limits`): the caps checked before any
        work; the prompt plus ``max_new_tokens`` must also fit the model's context.
        """
        limits = Limits() if limits is None else limits
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a mmaccel.runtime.limits.Limits, got {type(limits).__name__}")
        images = [images] if isinstance(images, (Image.Image, str, Path, np.ndarray)) else list(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(images) != len(prompts):
            raise ValueError(
                f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts"
            )
        if not images:
            raise ValueError("images must not be empty")
        if isinstance(max_new_tokens, float):
            raise TypeError(f"max_new_tokens must be an int, got float {max_new_tokens!r}")
        limits.new_tokens(max_new_tokens, flag="limits=Limits(max_new_tokens=N)")
        for i, prompt in enumerate(prompts):
            limits.prompt(prompt, f"prompts[{i}]" if len(prompts) > 1 else "prompt")
        min_side = max(limits.min_side, self._patch_size())
        pil = [
            load_image(img, limits.max_pixels, min_side, f"images[{i}]" if len(images) > 1 else "image")
            for i, img in enumerate(images)
        ]
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the tokenizer's "longer than the maximum" warning: check_context says it
        try:
            inputs = self.processor(
                images=pil, text=[self.format_prompt(p) for p in prompts], return_tensors="pt", padding=True
            )
        finally:
            tokenizer.padding_side = side
            hf_logging.set_verbosity(verbosity)
        check_context(inputs["input_ids"].shape[1], max_new_tokens, self._context(), name="prompt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        before = (inputs["input_ids"] == self.model.config.image_token_id).sum(1).tolist()

        clock = StepClock()
        processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        processors.append(clock)
        generate_kwargs.setdefault("do_sample", False)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        sequences = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, logits_processor=processors, **generate_kwargs
        )
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else _peak_rss_bytes()
        new = sequences[:, inputs["input_ids"].shape[1] :]
        texts = [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        ttft = clock.times[0] - start
        steps = len(clock.times) - 1
        decode = steps / (clock.times[-1] - clock.times[0]) if steps > 0 else float("nan")
        after, parts = self._visual_counts(before, inputs)
        eos = self.model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        stats = [
            SampleStats(before[i], after[i], parts[i], _count_new(new[i], eos), ttft, decode, int(peak))
            for i in range(len(images))
        ]
        return VLMOutput(texts, stats)

    def _patch_size(self) -> int:
        """The vision encoder's patch side in pixels (an image must hold at least one patch)."""
        vision = getattr(self.model.config, "vision_config", None)
        return int(getattr(vision, "patch_size", 1) or 1)

    def _context(self) -> int | None:
        """The language model's context (``max_position_embeddings``), ``None`` when unknown."""
        text = getattr(self.model.config, "text_config", None)
        value = getattr(text, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    def _visual_counts(self, before: list[int], inputs: Any) -> tuple[list[int], list[int]]:
        if self.handle is not None:
            selections = self.handle.last_selections
            return [s.tokens_after for s in selections], [s.partitions for s in selections]
        if "image_sizes" in inputs and inputs["pixel_values"].ndim == 5:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            cfg = self.model.config
            parts = [
                image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for s in inputs["image_sizes"]
            ]
            return before, parts
        return before, [1] * len(before)

    def remove_hired(self) -> None:
        """Remove HiRED (no-op without it)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def remove_vista(self) -> None:
        """Remove VISTA steering (no-op without it)."""
        if self.vista is not None:
            self.vista.remove()
            self.vista = None

    def remove_attention_balance(self) -> None:
        """Remove attention rebalancing (no-op without it)."""
        if self.balance is not None:
            self.balance.remove()
            self.balance = None


def _count_new(tokens: torch.Tensor, eos: set[int]) -> int:
    """Generated tokens up to and including the first EOS (the rest is batch padding)."""
    for i, t in enumerate(tokens.tolist()):
        if t in eos:
            return i + 1
    return int(tokens.numel())


def _peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _is_local_path(name: str | Path) -> bool:
    """A name meant as a local folder rather than a Hub id (``org/name``): it exists, is a Path,
    is absolute or relative to ``.``/``~``, or has more than two parts."""
    text = str(name)
    return (
        isinstance(name, Path) or Path(text).expanduser().exists()
        or text.startswith(("/", ".", "~")) or len(Path(text).parts) > 2
    )  # fmt: skip


def load_vlm(
    path_or_model: str | Path | torch.nn.Module,
    hired: HiREDConfig | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    processor: Any = None,
    vista: VISTAConfig | None = None,
    attention_balance: AttentionBalanceConfig | None = None,
) -> VLM:
    """Load a LLaVA-1.5 / LLaVA-NeXT folder (or wrap a model instance) as a :class:`VLM`.

    ``path_or_model``: a local folder / Hub id saved with ``save_pretrained`` (model and
    processor), or a model instance together with ``processor``. ``hired``: a
    :class:`~mmaccel.vlm.hired.HiREDConfig` to drop visual tokens, ``None`` for the dense model.
    ``vista``: a :class:`~mmaccel.vlm.vista.VISTAConfig` to steer against hallucination.
    ``attention_balance``: an :class:`~mmaccel.vlm.attention_balance.AttentionBalanceConfig` to
    rebalance the LLM's attention to the image (LLaVA-1.5). The three compose; they are applied
    in that order and each has its own ``remove_*``.
    """
    if isinstance(path_or_model, torch.nn.Module):
        if processor is None:
            raise ValueError("pass processor=... when load_vlm gets a model instance")
        model = path_or_model
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return VLM(model, processor, hired, vista, attention_balance)
    if not isinstance(path_or_model, (str, Path)):
        raise TypeError(
            f"path_or_model must be a folder, a Hub id or a model, got {type(path_or_model).__name__}"
        )
    import transformers
    from transformers import AutoConfig, AutoProcessor

    if _is_local_path(path_or_model):  # checked from its JSON, before anything loads
        folder = Path(path_or_model).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"path_or_model {str(folder)!r} is not a folder")
        found = model_folder_class(folder)
        if found not in llava.MODELS:
            raise TypeError(f"load_vlm supports {', '.join(llava.MODELS)}; {str(folder)!r} holds {found or 'no model'}")
    config = AutoConfig.from_pretrained(path_or_model)
    archs = [a for a in (config.architectures or []) if a in llava.MODELS]
    if not archs:
        raise TypeError(
            f"load_vlm supports {', '.join(llava.MODELS)}; {path_or_model} holds {config.architectures}"
        )
    cls = getattr(transformers, archs[0])
    model = cls.from_pretrained(path_or_model, dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    return VLM(model, processor or AutoProcessor.from_pretrained(path_or_model), hired, vista, attention_balance)
