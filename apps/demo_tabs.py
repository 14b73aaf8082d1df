"""The demo's app functions: one dense-vs-accelerated run per capability, UI-free.

The Gradio app (:mod:`mmaccel.apps.demo`) and the tests call these directly. Each takes plain Python
values, validates them (``ValueError`` / ``TypeError`` with a readable message), runs the dense
and the accelerated path on the same model and inputs, and returns a :class:`TabResult`. Files
(videos, animations) are written only under the ``out_dir`` the caller gives.
"""

from __future__ import annotations

import difflib
import shlex
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmaccel.apps.demo_timing import WARM_REPEATS, gain_words, warm_compare
from mmaccel.runtime.checkpoint_io import check_weight_files
from mmaccel.runtime.images import PIL_MAX_PIXELS, open_image
from mmaccel.runtime.limits import Limits, as_int, check_prompt, check_video_time, estimate_video_time
from mmaccel.runtime.metrics import psnr
from mmaccel.runtime.paths import check_model_folder, model_folder_class

__all__ = [
    "MAX_IMAGE_SIDE",
    "MIN_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "MAX_PROMPT_CHARS",
    "MAX_FRAMES",
    "ARModels",
    "DemoLimits",
    "DemoModels",
    "TabResult",
    "validate_image",
    "run_vlm_tab",
    "run_dit_tab",
    "run_video_tab",
    "run_ar_tab",
    "torchrun_command",
    "check_dit_settings",
    "check_video_settings",
    "word_agreement",
    "DIT_DEFAULTS",
    "VIDEO_DEFAULTS",
    "VLM_DEFAULTS",
]

MAX_IMAGE_SIDE = 4096
MIN_IMAGE_SIDE = 16
MAX_IMAGE_PIXELS = 16_000_000
#: Every file the tabs write starts with this, so pruning a shared output folder touches only ours.
OUTPUT_PREFIX = "mmaccel-"
MAX_FRAMES = 33
MAX_STEPS = 50
MAX_NEW_TOKENS = 64
MAX_PROMPT_CHARS = 2000
#: Each tab's default settings, chosen by measuring the zoo models (docs/demo.md, "Defaults"):
#: accelerated outputs that stay recognisably the dense ones.
VLM_DEFAULTS: dict[str, Any] = {"budget": 0.5, "hired": True, "vista": False, "max_new_tokens": 48}
DIT_DEFAULTS: dict[str, Any] = {"steps": 8, "keep_ratio": 0.5, "dense_from": 0.5}
VIDEO_DEFAULTS: dict[str, Any] = {"frames": 9, "steps": 4, "top_p": 0.9, "dense_steps": 0.5}
#: Classes each ``--*-model`` folder may declare (model_index.json ``_class_name`` / config.json
#: ``architectures``), checked before loading.
VLM_MODELS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
IMAGE_PIPELINES = ("DiTPipeline", "PixArtAlphaPipeline")
VIDEO_PIPELINES = ("WanPipeline",)
MODEL_CLASSES = {"vlm": VLM_MODELS, "dit": IMAGE_PIPELINES, "video": VIDEO_PIPELINES}


@dataclass(frozen=True)
class DemoLimits:
    """What one demo request may cost: upload size (read from the header before decoding) and the
    generated files kept in the output and upload folders (oldest deleted first).

    ``max_pixels``: pixel cap of an uploaded image (``mmaccel demo --max-pixels``);
    ``max_outputs`` / ``max_output_bytes``: files and bytes kept in each of those folders
    (``--max-outputs``, ``--max-output-mb``); ``keep_s``: files younger than this are never
    deleted (a request may still be reading them), and the upload cache drops files older
    than ten times it.
    """

    max_pixels: int = MAX_IMAGE_PIXELS
    max_side: int = MAX_IMAGE_SIDE
    min_side: int = MIN_IMAGE_SIDE
    max_outputs: int = 200
    max_output_bytes: int = 1 << 30
    keep_s: float = 120.0

    def __post_init__(self) -> None:
        as_int("min_side", self.min_side, 1, 65_535)
        as_int("max_pixels", self.max_pixels, self.min_side * self.min_side, PIL_MAX_PIXELS)
        as_int("max_side", self.max_side, self.min_side, 65_535)
        as_int("max_outputs", self.max_outputs, 4, 10**6)  # one request writes up to 2 files
        as_int("max_output_bytes", self.max_output_bytes, 1 << 20, 1 << 50)
        if isinstance(self.keep_s, bool) or not isinstance(self.keep_s, (int, float)):
            raise TypeError(f"keep_s must be a number of seconds >= 0, got {type(self.keep_s).__name__}")
        if not 0 <= self.keep_s < float("inf"):
            raise ValueError(f"keep_s must be a number of seconds >= 0, got {self.keep_s!r}")


@dataclass(frozen=True)
class TabResult:
    """What a tab shows: dense / accelerated outputs, a stats table and extra artefacts."""

    dense: Any
    accelerated: Any
    stats: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        """The stats as a two-column markdown table, then ``extras["notes"]`` (words on the result)."""
        rows = "\n".join(f"| {k} | {v} |" for k, v in self.stats.items())
        table = f"| measure | value |\n|---|---|\n{rows}"
        notes = self.extras.get("notes")
        return f"{table}\n\n{notes}" if notes else table


#: ``DemoModels`` sources: a zoo entry (small trained reference model), a tiny random model, or a folder.
ZOO, TINY = "zoo", "tiny"
_ZOO_NAMES = {"vlm": "shapes-vlm", "dit": "digits-dit", "video": "moving-digits", "ar": "digits-nar"}


@dataclass(frozen=True)
class ARModels:
    """The AR tab's models: one GPT per decoding order, the VQ decoder and the token grid
    (``None``: any grid, for the random tiny GPT; the zoo's GPTs know only their trained grid)."""

    raster: Any
    nar: Any
    vq: Any
    grid: int | None


@dataclass
class DemoModels:
    """Lazily built models for the demo.

    Each of ``vlm``, ``dit``, ``video`` is ``"zoo"`` (default: the zoo's trained shapes VLM, digits
    DiT and moving-digits Wan, see :mod:`mmaccel.apps.zoo`), ``"tiny"`` (random tiny models: timings
    only) or a folder: a LLaVA(-NeXT) folder for :func:`vlm.load_vlm`, a ``DiTPipeline`` /
    ``PixArtAlphaPipeline`` folder, a ``WanPipeline`` folder. ``ar`` is ``"zoo"`` (the digits
    VQ + raster and NAR GPTs) or ``"tiny"``. ``lock`` serialises the runs: patches are per model
    instance.
    """

    vlm: str = ZOO
    dit: str = ZOO
    video: str = ZOO
    ar: str = ZOO
    device: str = "cpu"
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self) -> None:
        for name in ("vlm", "dit", "video", "ar"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be 'zoo', 'tiny' or a folder path, got {value!r}")
        if self.ar not in (ZOO, TINY):
            raise ValueError(f"ar must be 'zoo' or 'tiny', got {self.ar!r}")

    def get(self, name: str) -> Any:
        """The model ``name`` (``vlm``, ``dit``, ``video``, ``ar``), built on first use."""
        builders: dict[str, Callable[[], Any]] = {
            "vlm": self._build_vlm,
            "dit": self._build_dit,
            "video": self._build_video,
            "ar": self._build_ar,
        }
        if name not in builders:
            raise ValueError(f"unknown demo model {name!r}; choose from {sorted(builders)}")
        with self.lock:
            if name not in self._cache:
                self._cache[name] = builders[name]()
            return self._cache[name]

    def _folder(self, name: str) -> str | None:
        """The folder to load for ``name``: the zoo entry's, the user's, or ``None`` for tiny."""
        value = getattr(self, name)
        if value == TINY:
            return None
        if value == ZOO:
            from mmaccel.apps.zoo import zoo_path

            return str(zoo_path(_ZOO_NAMES[name]))
        return _existing(value, f"--{name}-model", MODEL_CLASSES[name])

    def _build_vlm(self) -> Any:
        from mmaccel.vlm import load_vlm

        folder = self._folder("vlm")
        if folder is not None:
            return load_vlm(folder, device=self.device)
        from mmaccel.testing import tiny_llava_next

        model, processor = tiny_llava_next(device=self.device)
        return load_vlm(model, processor=processor)

    def _build_dit(self) -> Any:
        folder = self._folder("dit")
        if folder is not None:
            from diffusers import DiffusionPipeline

            from mmaccel.apps.zoo.digits_dit import int_id2label

            kwargs = int_id2label(folder) if model_folder_class(folder) == "DiTPipeline" else {}
            pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
            if type(pipe).__name__ not in IMAGE_PIPELINES:
                raise TypeError(f"--dit-model must hold one of {IMAGE_PIPELINES}, got {type(pipe).__name__}")
            pipe.set_progress_bar_config(disable=True)
            return pipe.to(self.device)
        from mmaccel.testing import tiny_dit_pipeline

        return tiny_dit_pipeline(device=self.device)

    def _build_video(self) -> Any:
        folder = self._folder("video")
        if folder is not None:
            from diffusers import WanPipeline

            pipe = WanPipeline.from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)
            return pipe.to(self.device)
        from mmaccel.testing import tiny_wan_pipeline

        return tiny_wan_pipeline(device=self.device)

    def _build_ar(self) -> ARModels:
        if self.ar == ZOO:
            from mmaccel.apps.zoo.digits_nar import GRID
            from mmaccel.apps.zoo.digits_nar import load as load_digits_nar

            zoo = load_digits_nar(device=self.device)
            return ARModels(raster=zoo.raster, nar=zoo.nar, vq=zoo.tokenizer, grid=GRID)
        from mmaccel.tokenizers_img.gpt import GPT, GPTConfig
        from mmaccel.tokenizers_img.vq import VQConfig, VQModel

        torch.manual_seed(0)
        gpt = GPT(GPTConfig(vocab_size=64, dim=64, n_layer=2, n_head=4, num_classes=10, multiple_of=32)).eval()
        vq = VQModel(
            VQConfig(codebook_size=64, codebook_embed_dim=4, ch=16, norm_groups=8, encoder_ch_mult=(1, 2),
                     decoder_ch_mult=(1, 2), z_channels=8, num_res_blocks=1)
        ).eval()  # fmt: skip
        return ARModels(raster=gpt, nar=gpt, vq=vq, grid=None)

    def video_shape(self) -> tuple[int, int]:
        """``(height, width)`` the video tab renders: the zoo model's training size, else 64 x 96."""
        if self.video == ZOO:
            from mmaccel.apps.zoo.moving_digits import SIZE

            return SIZE, SIZE
        return 64, 96

    def defaults(self) -> dict[str, Any]:
        """Inputs that suit the chosen models: the VLM question and image, video prompt, DiT class."""
        zoo_vlm = self.vlm == ZOO
        if zoo_vlm:
            from mmaccel.apps.zoo.shapes_data import CAPTION_PROMPT, make_scene

            image = make_scene(np.random.default_rng(7), size=(128, 128), n_objects=4).image
        else:
            from mmaccel.testing import tiny_image

            image = tiny_image(128, 128, seed=5)
        return {
            "vlm_question": CAPTION_PROMPT if zoo_vlm else "What is shown in the image?",
            "vlm_image": image,
            "video_prompt": "digit 3 moving left" if self.video == ZOO else "a red car on a coast road",
            "dit_label": "three" if self.dit == ZOO else None,
        }

    def digit_classifier(self) -> Any | None:
        """The zoo's digit classifier when the DiT tab runs the zoo digits model, else ``None``."""
        if self.dit != ZOO:
            return None
        with self.lock:
            if "classifier" not in self._cache:
                from mmaccel.apps.zoo.digits import load_digit_classifier

                self._cache["classifier"] = load_digit_classifier().eval()
            return self._cache["classifier"]


def _existing(path: str, flag: str, accepted: tuple[str, ...]) -> str:
    """``path`` if it is a folder declaring one of ``accepted`` (read from its JSON, not loaded)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{flag} {path!r} is not a folder saved with save_pretrained")
    check_model_folder(path, flag=flag, accepted=accepted)
    check_weight_files(path, flag=flag)
    return path


def _check_number(name: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} does not exist")
    return out


def validate_image(image: Any, limits: DemoLimits | None = None) -> Image.Image:
    """An RGB PIL image within the demo's size limits, from a PIL image, a uint8 array, or an
    uploaded file (its path, or Gradio's ``{"path": ...}`` payload).

    Files are checked from their header before anything is decoded (:func:`runtime.images.open_image`).
    """
    limits = limits or DemoLimits()
    if image is None:
        raise ValueError("upload an image first")
    if isinstance(image, dict):  # Gradio's FileData payload (the event runs without preprocessing)
        if not image.get("path"):
            raise ValueError("upload an image first")
        image = image["path"]
    if isinstance(image, (str, Path)):
        return open_image(
            image, max_pixels=limits.max_pixels, min_side=limits.min_side, max_side=limits.max_side,
            flag="--max-pixels", name="uploaded image", show_path=False,
        )  # fmt: skip
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"image arrays must be uint8 (H, W[, C]); got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, a uint8 array or a file path, got {type(image).__name__}")
    w, h = image.size
    if min(w, h) < limits.min_side or max(w, h) > limits.max_side or w * h > limits.max_pixels:
        raise ValueError(
            f"image is {w}x{h}; sides must be in [{limits.min_side}, {limits.max_side}] px and at most "
            f"{limits.max_pixels:,} pixels (--max-pixels)"
        )
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------
# VLM: HiRED token budget + VISTA steering
# ------------------------------------------------------------------------------------------


def _kept_overlay(image: Image.Image, keep: torch.Tensor, tokens: int) -> Image.Image:
    """The image with the base partition's dropped patches darkened (kept ones at full colour)."""
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"base partition of {tokens} tokens is not a square grid")
    mask = keep[:tokens].reshape(side, side).float().numpy()
    mask_img = Image.fromarray((mask * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    shade = np.asarray(mask_img, np.float32)[..., None] / 255.0
    arr = np.asarray(image, np.float32) * (0.25 + 0.75 * shade)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def word_agreement(a: str, b: str) -> float:
    """Similarity of two answers in [0, 1]: difflib's ratio over their words (1: same words, same order)."""
    return difflib.SequenceMatcher(None, a.split(), b.split()).ratio()


def run_vlm_tab(
    models: DemoModels,
    image: Any,
    question: str,
    budget: float = VLM_DEFAULTS["budget"],
    hired: bool = VLM_DEFAULTS["hired"],
    vista: bool = VLM_DEFAULTS["vista"],
    max_new_tokens: int = VLM_DEFAULTS["max_new_tokens"],
    limits: DemoLimits | None = None,
) -> TabResult:
    """Answer ``question`` about ``image`` dense and with HiRED (``budget`` of visual tokens) / VISTA.

    ``dense``/``accelerated`` are the full answers (generation stops at the end-of-sequence token or
    at ``max_new_tokens``; the stats say when an answer hit that limit). TTFT is timed warm: prefill
    calls (one new token) of both paths, interleaved (:func:`~mmaccel.apps.demo_timing.warm_compare`).
    ``extras["overlay"]`` shows the kept tokens of the base image (the whole image when HiRED is
    off), ``extras["timing"]`` is the :class:`~mmaccel.apps.demo_timing.WarmTiming`.
    """
    from mmaccel.runtime import TokenBudget
    from mmaccel.vlm import HiREDConfig, VISTAConfig, apply_hired, apply_vista

    if not isinstance(question, str) or not question.strip():
        raise ValueError("type a question")
    check_prompt(question, name="question", max_chars=MAX_PROMPT_CHARS)
    pil = validate_image(image, limits)
    _check_number("budget", budget, 0.01, 1.0)
    _check_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, integer=True)
    if not (hired or vista):
        raise ValueError("turn on HiRED or VISTA (or both) to compare against the dense model")
    vlm = models.get("vlm")
    seen: dict[str, Any] = {}

    @contextmanager
    def accelerated() -> Iterator[None]:
        hired_handle = (
            apply_hired(vlm.model, HiREDConfig(budget=TokenBudget(ratio=float(budget)))) if hired else None
        )
        vista_handle = apply_vista(vlm.model, VISTAConfig()) if vista else None
        vlm.handle = hired_handle  # VLM reads its token counts from the handle
        try:
            yield
            seen["selection"] = hired_handle.last_selections[0] if hired_handle is not None else None
        finally:
            vlm.handle = None
            if vista_handle is not None:
                vista_handle.remove()
            if hired_handle is not None:
                hired_handle.remove()

    def prefill() -> Any:
        return vlm.generate(pil, question, max_new_tokens=1)

    with models.lock:
        dense = vlm.generate(pil, question, max_new_tokens=max_new_tokens)
        with accelerated():
            fast = vlm.generate(pil, question, max_new_tokens=max_new_tokens)
        selection = seen["selection"]
        timing, _, _ = warm_compare(prefill, prefill, patch=accelerated)
    d, f = dense.stats[0], fast.stats[0]
    if selection is not None:
        overlay = _kept_overlay(pil, selection.keep, selection.tokens_per_partition[0])
    else:
        overlay = pil
    cut = [name for name, st in (("dense", d), ("accelerated", f)) if st.new_tokens >= max_new_tokens]
    stats = {
        "visual tokens (dense -> accelerated)": f"{d.visual_tokens_before} -> {f.visual_tokens_after}",
        "partitions": d.partitions,
        **timing.rows("TTFT", "TTFT speed-up"),
        "decode tokens/s dense / accelerated": f"{d.decode_tokens_per_s:.1f} / {f.decode_tokens_per_s:.1f}",
        "answers agree": dense.texts[0] == fast.texts[0],
        "word agreement (1 = same answer)": f"{word_agreement(dense.texts[0], fast.texts[0]):.2f}",
        "answer ends": (
            "at the end-of-sequence token" if not cut else f"at max new tokens ({', '.join(cut)}): raise it"
        ),
        "setting": f"HiRED {'budget ' + format(budget, 'g') if hired else 'off'}, VISTA {'on' if vista else 'off'}",
    }
    notes = gain_words(timing, f"{d.visual_tokens_before} visual tokens")
    return TabResult(dense.texts[0], fast.texts[0], stats, {"overlay": overlay, "selection": selection,
                                                              "timing": timing, "notes": notes})  # fmt: skip


# ------------------------------------------------------------------------------------------
# Image DiT: FlexDiT-style token density
# ------------------------------------------------------------------------------------------


def run_dit_tab(
    models: DemoModels,
    text: str,
    steps: int = DIT_DEFAULTS["steps"],
    keep_ratio: float = DIT_DEFAULTS["keep_ratio"],
    dense_from: float = DIT_DEFAULTS["dense_from"],
    seed: int = 0,
) -> TabResult:
    """Generate ``text`` dense and with token density (``keep_ratio`` until ``dense_from``).

    ``text`` is a class name for a ``DiTPipeline`` and a prompt for a ``PixArtAlphaPipeline``.

    ``dense``/``accelerated`` are ``(H, W, 3)`` float images in [0, 1], from the last of the warm,
    interleaved timing runs (:func:`~mmaccel.apps.demo_timing.warm_compare`). With the zoo digits
    model the zoo digit classifier labels both images (``extras["labels"]``).
    """
    from mmaccel.diffusion.token_density import TokenDensityConfig, apply_token_density
    from mmaccel.runtime.budget import ConstantSchedule, StepSchedule

    check_dit_settings(steps, keep_ratio, dense_from)
    _check_number("seed", seed, 0, 2**31 - 1, integer=True)
    pipe = models.get("dit")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("type a class name or a prompt")
    check_prompt(text, name="prompt", max_chars=MAX_PROMPT_CHARS)
    if hasattr(pipe, "get_label_ids"):  # class-conditional DiT
        labels = getattr(pipe, "labels", None) or {}
        if text not in labels:
            raise ValueError(f"unknown class {text!r}; choose one of {sorted(labels)[:10]}...")
        inputs: dict[str, Any] = {"class_labels": pipe.get_label_ids([text])}
    else:  # PixArt-alpha: text-to-image at the transformer's native size
        if steps < 2:  # diffusers' PixArt takes a 1-step path meant for DMD checkpoints only
            raise ValueError("PixArt needs steps >= 2")
        size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        inputs = dict(prompt=text, height=size, width=size, use_resolution_binning=False, clean_caption=False)

    def run(num_steps: int = steps) -> np.ndarray:
        gen = torch.Generator("cpu").manual_seed(seed)
        image = pipe(**inputs, num_inference_steps=num_steps, generator=gen, output_type="np").images[0]
        return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image  # grey models (zoo digits)

    schedule = (
        StepSchedule(boundaries=(dense_from,), ratios=(keep_ratio, 1.0))
        if dense_from < 1
        else ConstantSchedule(keep_ratio)
    )
    config = TokenDensityConfig(schedule=schedule)
    seen: dict[str, float] = {}

    @contextmanager
    def accelerated() -> Iterator[None]:
        with apply_token_density(pipe.transformer, config) as handle:
            yield
            seen["token_ratio"] = handle.stats.token_ratio

    with models.lock:
        timing, dense, fast = warm_compare(run, run, patch=accelerated)
        classifier = models.digit_classifier()
        labels = _digit_labels(classifier, [dense, fast]) if classifier is not None else None
    tokens = _dit_tokens(pipe)
    stats = {
        **timing.rows(),
        "mean token ratio": f"{seen['token_ratio']:.2f}",
        "PSNR vs dense (dB)": f"{psnr(fast, dense, data_range=1.0):.1f}",
    }
    if labels is not None:
        stats["digit classifier label dense / accelerated"] = f"{labels[0]} / {labels[1]}"
        stats["label unchanged"] = labels[0] == labels[1]
    stats["setting"] = (
        f"keep {keep_ratio:g} of the {tokens} tokens until progress {dense_from:g}, dense after; {steps} steps"
    )
    extras = {"timing": timing, "labels": labels, "notes": gain_words(timing, f"{tokens} image tokens")}
    return TabResult(dense, fast, stats, extras)


def check_dit_settings(steps: int, keep_ratio: float, dense_from: float) -> None:
    """``ValueError`` / ``TypeError`` naming the first token-density setting out of range."""
    _check_number("steps", steps, 1, MAX_STEPS, integer=True)
    _check_number("keep_ratio", keep_ratio, 0.01, 1.0)
    _check_number("dense_from", dense_from, 0.0, 1.0)
    if dense_from == 0.0:
        raise ValueError("dense_from 0 runs every step dense: nothing to accelerate; use > 0")


def _dit_tokens(pipe: Any) -> int:
    """Image tokens per transformer call: (latent side / patch size) squared."""
    cfg = pipe.transformer.config
    return (cfg.sample_size // cfg.patch_size) ** 2


def _digit_labels(classifier: Any, images: list[np.ndarray]) -> list[str]:
    """The zoo digit classifier's label (``"three"``) of each ``(H, W, 3)`` image in [0, 1]."""
    from mmaccel.apps.zoo.digits_dit import ID2LABEL, to_digits

    batch = to_digits(np.stack(images).astype(np.float32))
    with torch.no_grad():
        return [ID2LABEL[int(i)] for i in classifier(batch).argmax(-1)]


# ------------------------------------------------------------------------------------------
# Video: SVG2 semantic sparse attention
# ------------------------------------------------------------------------------------------


def torchrun_command(prompt: str = "a red car on a coast road", frames: int = 129, nproc: int = 2) -> str:
    """The command line that runs the multi-process long-video path (:mod:`mmaccel.apps.cli`)."""
    return (
        f"torchrun --nproc-per-node {nproc} -m mmaccel.apps.cli video --model tiny "
        f"--prompt {shlex.quote(prompt)} --frames {frames} --mode clip --out video.mp4"
    )


def _write_mp4(frames: np.ndarray, path: Path, fps: int = 8) -> Path:
    """Write and read back the MP4 (:func:`mmaccel.apps.video_output.write_video`): an empty or
    short file is a one-line error, never a broken player in the page."""
    from mmaccel.apps.video_output import write_video

    return write_video(np.asarray(frames), path, fps)


def run_video_tab(
    models: DemoModels,
    prompt: str,
    out_dir: str | Path,
    frames: int = VIDEO_DEFAULTS["frames"],
    steps: int = VIDEO_DEFAULTS["steps"],
    top_p: float = VIDEO_DEFAULTS["top_p"],
    dense_steps: float = VIDEO_DEFAULTS["dense_steps"],
    seed: int = 0,
    limits: Limits | None = None,
) -> TabResult:
    """Generate a video dense and with SVG2 sparse attention; both saved as MP4 under ``out_dir``.

    ``frames`` must be ``1 + 4k`` (the Wan VAE) and at most `MAX_FRAMES`. Times are warm and
    interleaved (:func:`~mmaccel.apps.demo_timing.warm_compare`); the videos are the last runs'.
    Before any run, a FLOP lower bound of all of them must fit ``limits.max_minutes``
    (:func:`mmaccel.runtime.limits.check_video_time`; default :class:`~mmaccel.runtime.limits.Limits`).
    """
    from mmaccel.sparse_attn import SVG2Config, apply_svg2

    out = _check_out_dir(out_dir)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("type a prompt")
    check_prompt(prompt, name="prompt", max_chars=MAX_PROMPT_CHARS)
    _check_number("frames", frames, 1, MAX_FRAMES, integer=True)
    if (frames - 1) % 4:
        raise ValueError(f"frames must be 1 + 4k (1, 5, 9, ...) for the Wan VAE, got {frames}")
    check_video_settings(steps, top_p, dense_steps)
    _check_number("seed", seed, 0, 2**31 - 1, integer=True)
    config = SVG2Config(num_q_clusters=8, num_k_clusters=16, top_p=float(top_p), dense_steps=float(dense_steps),
                        dense_layers=0.0)  # fmt: skip
    pipe = models.get("video")
    height, width = models.video_shape()
    runs = 2 * (WARM_REPEATS + 1)  # warm_compare: a warm-up and WARM_REPEATS timed runs, dense and SVG2
    estimate = estimate_video_time(
        as_int("frames", frames, 1, MAX_FRAMES), height, width, dict(pipe.transformer.config),
        steps=as_int("steps", steps, 1, MAX_STEPS) * runs,
        temporal_stride=pipe.vae_scale_factor_temporal, spatial_stride=pipe.vae_scale_factor_spatial,
        text_tokens=32, device=pipe.device, dtype_bytes=pipe.transformer.dtype.itemsize,
    )  # fmt: skip
    check_video_time(estimate, (limits or Limits()).max_minutes, flag="Limits(max_minutes=N)", hint="steps or frames")

    def run(num_steps: int = steps) -> np.ndarray:
        gen = torch.Generator("cpu").manual_seed(seed)
        return pipe(
            prompt=prompt, height=height, width=width, num_frames=frames, num_inference_steps=num_steps,
            guidance_scale=5.0, negative_prompt="", max_sequence_length=32, output_type="np", generator=gen,
        ).frames[0]  # fmt: skip

    seen: dict[str, Any] = {}

    @contextmanager
    def accelerated() -> Iterator[None]:
        with apply_svg2(pipe.transformer, config, lambda: pipe.current_timestep, scheduler=pipe.scheduler) as handle:
            yield
            seen["summary"] = handle.stats.summary()

    with models.lock:
        timing, dense, fast = warm_compare(run, run, patch=accelerated)
    summary = seen["summary"]
    tokens = _video_tokens(pipe, frames, height, width)
    tag = uuid.uuid4().hex[:8]
    dense_mp4 = _write_mp4(dense, out / f"{OUTPUT_PREFIX}dense-{tag}.mp4")
    fast_mp4 = _write_mp4(fast, out / f"{OUTPUT_PREFIX}svg2-{tag}.mp4")
    stats = {
        **timing.rows(),
        "measured attention density (all calls)": f"{summary['density']:.2f}",
        "density of the sparse calls": (
            "-" if summary["sparse_density"] is None else f"{summary['sparse_density']:.2f}"
        ),
        "PSNR vs dense (dB)": f"{psnr(fast, dense, data_range=1.0):.1f}",
        "setting": f"SVG2 top-p {top_p:g}, first {dense_steps:g} of {steps} steps dense; {tokens} video tokens",
    }
    extras = {"dense_frames": dense, "fast_frames": fast, "timing": timing,
              "notes": gain_words(timing, f"{tokens} video tokens")}  # fmt: skip
    return TabResult(dense_mp4, fast_mp4, stats, extras)


def check_video_settings(steps: int, top_p: float, dense_steps: float) -> None:
    """``ValueError`` / ``TypeError`` naming the first SVG2 setting out of range."""
    _check_number("steps", steps, 1, MAX_STEPS, integer=True)
    _check_number("top_p", top_p, 0.01, 1.0)
    _check_number("dense_steps", dense_steps, 0.0, 1.0)


def _video_tokens(pipe: Any, frames: int, height: int, width: int) -> int:
    """Video tokens per attention call: latent frames x latent grid / patch."""
    t, h, w = pipe.transformer.config.patch_size
    latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    side = pipe.vae_scale_factor_spatial
    return (latent_frames // t) * (height // side // h) * (width // side // w)


# ------------------------------------------------------------------------------------------
# AR image: raster vs next-neighbour (NAR) decoding
# ------------------------------------------------------------------------------------------


def _order_animation(groups: torch.Tensor, grid: tuple[int, int], path: Path, cell: int = 16) -> Path:
    """A GIF of the decoding order: frame ``k`` lights the cells decoded by forward pass ``k``."""
    h, w = grid
    g = groups.reshape(h, w).numpy()
    frames = []
    for k in range(int(g.max()) + 1):
        img = np.zeros((h, w, 3), np.uint8)
        img[g < k] = (70, 110, 200)
        img[g == k] = (255, 190, 40)
        frames.append(Image.fromarray(img).resize((w * cell, h * cell), Image.NEAREST))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return path


def run_ar_tab(
    models: DemoModels,
    class_id: int,
    out_dir: str | Path,
    grid: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> TabResult:
    """Sample a ``grid x grid`` token image raster-order and NAR; decode both with the VQ.

    With the zoo model each order uses the GPT trained for it and ``grid`` must be its grid (8).

    ``progress`` shows tqdm bars over the forward passes (the UI binds them to its progress bar).

    ``extras`` holds the forward-pass counts and GIFs of both decoding orders (under ``out_dir``).
    Different orders sample different images: compare cost, not pixels.
    """
    from mmaccel.tokenizers_img.nar import generate_nar
    from mmaccel.tokenizers_img.orders import nar_schedule, raster_schedule
    from mmaccel.tokenizers_img.raster import generate_raster
    from mmaccel.tokenizers_img.sampling import SamplingConfig

    out = _check_out_dir(out_dir)
    _check_number("class_id", class_id, 0, 9, integer=True)
    _check_number("grid", grid, 2, 16, integer=True)
    _check_number("seed", seed, 0, 2**31 - 1, integer=True)
    ar = models.get("ar")
    if ar.grid is not None and grid != ar.grid:
        raise ValueError(f"grid must be {ar.grid} for this model (the token grid it was trained on), got {grid}")
    labels = torch.tensor([class_id])
    sampling = SamplingConfig(temperature=1.0, top_k=16)
    shape = (grid, grid)

    def sample(fn: Callable[..., Any], gpt: Any, size: tuple[int, int] = shape) -> Any:
        gen = torch.Generator().manual_seed(seed)
        return fn(gpt, labels, grid=size, sampling=sampling, generator=gen, progress=progress)

    with models.lock, torch.no_grad():
        timing, raster, nar = warm_compare(
            lambda: sample(generate_raster, ar.raster), lambda: sample(generate_nar, ar.nar)
        )
        decoded = [ar.vq.decode(d.tokens)[0] for d in (raster, nar)]  # [C, H, W] in [-1, 1]; C = 1 or 3
        images = [((x.expand(3, -1, -1).permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy() for x in decoded]
    tag = uuid.uuid4().hex[:8]
    extras = {
        "raster_gif": _order_animation(raster_schedule(*shape).groups, shape, out / f"{OUTPUT_PREFIX}raster-{tag}.gif"),
        "nar_gif": _order_animation(nar_schedule(*shape).groups, shape, out / f"{OUTPUT_PREFIX}nar-{tag}.gif"),
        "raster_forwards": raster.forward_passes,
        "nar_forwards": nar.forward_passes,
    }
    stats = {
        "forward passes raster / NAR": f"{raster.forward_passes} / {nar.forward_passes}",
        **{k.replace("dense / accelerated", "raster / NAR"): v for k, v in timing.rows().items()},
    }
    extras["timing"] = timing
    extras["notes"] = gain_words(timing, f"{grid} x {grid} tokens")
    return TabResult(images[0], images[1], stats, extras)
