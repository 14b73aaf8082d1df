"""The Gradio demo (``mmaccel demo``): one tab per capability, dense vs accelerated side by side.

The handlers are thin wrappers around the UI-free app functions in :mod:`mmaccel.apps.demo_tabs`;
user errors become ``gr.Error`` messages in the page. Videos and animations are written only
under the demo's output folder (a fresh temp folder by default).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import numpy as np

from mmaccel.apps.demo_tabs import (
    MAX_FRAMES,
    MAX_NEW_TOKENS,
    MAX_STEPS,
    DemoModels,
    TabResult,
    run_ar_tab,
    run_dit_tab,
    run_video_tab,
    run_vlm_tab,
    torchrun_command,
    validate_image,
)

#: Largest upload the server accepts (images are further checked by `validate_image`).
MAX_UPLOAD = "25mb"

__all__ = [
    "build_demo",
    "launch",
    "DemoModels",
    "TabResult",
    "run_vlm_tab",
    "run_dit_tab",
    "run_video_tab",
    "run_ar_tab",
    "validate_image",
]


def _import_gradio() -> Any:
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError('the demo needs gradio: pip install "mmaccel[demo]"') from err
    return gr


def _ui(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors (bad values, unreadable files or model folders) into ``gr.Error``."""
    gr = _import_gradio()

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError) as err:
            raise gr.Error(str(err)) from err

    return wrapper


def _enlarge(image: Any, side: int = 256) -> Any:
    """A float [0, 1] ``(H, W, 3)`` array as a PIL image scaled up (nearest) to ``side`` px wide."""
    from PIL import Image

    pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    scale = max(1, side // pil.width)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def build_demo(models: DemoModels | None = None, out_dir: str | Path | None = None) -> Any:
    """The demo as a ``gr.Blocks``; outputs go under ``out_dir`` (a new temp folder by default)."""
    gr = _import_gradio()
    models = models or DemoModels()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="mmaccel-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    track = gr.Progress(track_tqdm=True)

    @_ui
    def vlm(image, question, budget, hired, vista, max_new_tokens, progress=track):  # noqa: ANN001, ARG001
        r = run_vlm_tab(models, image, question, float(budget), bool(hired), bool(vista), int(max_new_tokens))
        return r.dense, r.accelerated, r.extras["overlay"], r.markdown()

    @_ui
    def dit(text, steps, keep_ratio, dense_from, seed, progress=track):  # noqa: ANN001, ARG001
        r = run_dit_tab(models, text, int(steps), float(keep_ratio), float(dense_from), int(seed))
        return _enlarge(r.dense), _enlarge(r.accelerated), r.markdown()

    @_ui
    def video(prompt, frames, steps, top_p, dense_steps, seed, progress=track):  # noqa: ANN001, ARG001
        r = run_video_tab(
            models, prompt, out, int(frames), int(steps), float(top_p), float(dense_steps), int(seed)
        )
        return str(r.dense), str(r.accelerated), r.markdown()

    @_ui
    def ar(class_id, grid, seed, progress=track):  # noqa: ANN001, ARG001
        r = run_ar_tab(models, int(class_id), out, int(grid), int(seed), progress=True)
        return (
            _enlarge(r.dense),
            _enlarge(r.accelerated),
            str(r.extras["raster_gif"]),
            str(r.extras["nar_gif"]),
            r.markdown(),
        )

    defaults = models.defaults()
    with gr.Blocks(title="mmaccel demo") as demo:
        gr.Markdown(
            "# mmaccel: dense vs accelerated\nEach tab runs the same model and inputs twice. "
            "By default the tabs run the zoo's small trained reference models (shapes VLM, digits DiT, "
            "moving-digits Wan, digits VQ + GPTs; `mmaccel zoo list`): real attention structure, toy "
            "scale. `--vlm-model tiny` etc. gives random tiny models; real checkpoints load with "
            "`mmaccel demo --vlm-model PATH ...`."
        )
        with gr.Tab("VLM"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(value=defaults["vlm_image"], type="pil", label="image", image_mode="RGB")
                    question = gr.Textbox(value=defaults["vlm_question"], label="question")
                    budget = gr.Slider(0.05, 1.0, value=0.2, step=0.05, label="HiRED visual-token budget")
                    hired = gr.Checkbox(value=True, label="HiRED (drop visual tokens)")
                    vista = gr.Checkbox(value=False, label="VISTA (steer against hallucination)")
                    new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=16, step=1, label="max new tokens")
                    vlm_btn = gr.Button("Answer", variant="primary")
                with gr.Column():
                    dense_answer = gr.Textbox(label="dense answer")
                    fast_answer = gr.Textbox(label="accelerated answer")
                    overlay = gr.Image(label="kept visual tokens (base image; dropped ones darkened)")
                    vlm_stats = gr.Markdown()
            vlm_btn.click(
                vlm, [image, question, budget, hired, vista, new_tokens],
                [dense_answer, fast_answer, overlay, vlm_stats], api_name="vlm",
            )  # fmt: skip
        with gr.Tab("Image DiT"):
            labels = sorted(getattr(models.get("dit"), "labels", {}) or {})
            with gr.Row():
                with gr.Column():
                    choices = labels or ["a small cat sitting on grass"]
                    label = gr.Dropdown(
                        choices,
                        value=defaults["dit_label"] if defaults["dit_label"] in choices else choices[0],
                        label="class (DiT) or prompt (PixArt)",
                        allow_custom_value=True,
                    )
                    dit_steps = gr.Slider(1, MAX_STEPS, value=8, step=1, label="denoising steps")
                    keep = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="token keep ratio (early steps)")
                    dense_from = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="dense from progress")
                    dit_seed = gr.Number(value=0, precision=0, label="seed")
                    dit_btn = gr.Button("Generate", variant="primary")
                with gr.Column():
                    with gr.Row():
                        dit_dense = gr.Image(label="dense")
                        dit_fast = gr.Image(label="token density")
                    dit_stats = gr.Markdown()
            dit_btn.click(
                dit,
                [label, dit_steps, keep, dense_from, dit_seed],
                [dit_dense, dit_fast, dit_stats],
                api_name="dit",
            )
        with gr.Tab("Video"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(value=defaults["video_prompt"], label="prompt")
                    frames = gr.Slider(1, MAX_FRAMES, value=9, step=4, label="frames (1 + 4k)")
                    v_steps = gr.Slider(1, MAX_STEPS, value=4, step=1, label="denoising steps")
                    top_p = gr.Slider(
                        0.1, 1.0, value=0.9, step=0.05, label="SVG2 top-p (attention mass kept)"
                    )
                    dense_steps = gr.Slider(
                        0.0, 1.0, value=0.25, step=0.05, label="dense first steps (fraction)"
                    )
                    v_seed = gr.Number(value=0, precision=0, label="seed")
                    v_btn = gr.Button("Generate", variant="primary")
                with gr.Column():
                    with gr.Row():
                        v_dense = gr.Video(label="dense")
                        v_fast = gr.Video(label="SVG2")
                    v_stats = gr.Markdown()
            gr.Markdown(
                "Long videos over several processes (clip / layer parallel) are the CLI's job:\n\n"
                f"```\n{torchrun_command()}\n```"
            )
            v_btn.click(
                video, [prompt, frames, v_steps, top_p, dense_steps, v_seed], [v_dense, v_fast, v_stats],
                api_name="video",
            )  # fmt: skip
        with gr.Tab("AR image"):
            with gr.Row():
                with gr.Column():
                    class_id = gr.Slider(0, 9, value=1, step=1, label="class id")
                    ar_grid = models.get("ar").grid
                    grid = gr.Slider(2, 16, value=ar_grid or 8, step=1, label="token grid (H = W)",
                                     interactive=ar_grid is None)  # fmt: skip
                    ar_seed = gr.Number(value=0, precision=0, label="seed")
                    ar_btn = gr.Button("Sample", variant="primary")
                with gr.Column():
                    with gr.Row():
                        ar_raster = gr.Image(label="raster order")
                        ar_nar = gr.Image(label="NAR (next-neighbour)")
                    with gr.Row():
                        raster_gif = gr.Image(label="raster decoding order", type="filepath")
                        nar_gif = gr.Image(label="NAR decoding order", type="filepath")
                    ar_stats = gr.Markdown()
            ar_btn.click(
                ar,
                [class_id, grid, ar_seed],
                [ar_raster, ar_nar, raster_gif, nar_gif, ar_stats],
                api_name="ar",
            )
    demo.mmaccel_out_dir = out  # where launch() allows file serving from
    return demo


def launch(
    models: DemoModels | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    out_dir: str | Path | None = None,
    block: bool = True,
    **launch_kwargs: Any,
) -> Any:
    """Build and serve the demo on ``host:port`` (127.0.0.1 by default); returns the ``gr.Blocks``."""
    demo = build_demo(models, out_dir)
    demo.queue().launch(
        server_name=host,
        server_port=port,
        allowed_paths=[str(demo.mmaccel_out_dir)],
        prevent_thread_lock=not block,
        show_error=True,
        max_file_size=MAX_UPLOAD,
        **launch_kwargs,
    )
    return demo
