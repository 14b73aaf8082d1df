"""The Gradio demo (``mmaccel demo``): one tab per capability, dense vs accelerated side by side.

The handlers are thin wrappers around the UI-free app functions in :mod:`mmaccel.apps.demo_tabs`;
user errors become ``gr.Error`` messages in the page and one log line on the server (logger
``mmaccel.demo``, no traceback). Videos and animations are written only under the demo's output
folder (a fresh temp folder by default, deleted at exit); that folder and the upload folder are
pruned to :class:`~mmaccel.apps.demo_tabs.DemoLimits` after every request. Uploaded images are
checked from their header before they are decoded. See docs/errors.md.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import numpy as np

from mmaccel.apps.demo_realistic import (
    LABEL,
    VIDEO_MODELS,
    realistic_ar,
    realistic_dit,
    realistic_video,
    realistic_vlm,
    step_progress,
)
from mmaccel.apps.demo_tabs import (
    DIT_DEFAULTS,
    MAX_FRAMES,
    MAX_NEW_TOKENS,
    MAX_STEPS,
    OUTPUT_PREFIX,
    VIDEO_DEFAULTS,
    VLM_DEFAULTS,
    DemoLimits,
    DemoModels,
    TabResult,
    check_dit_settings,
    check_video_settings,
    run_ar_tab,
    run_dit_tab,
    run_video_tab,
    run_vlm_tab,
    torchrun_command,
    validate_image,
)
from mmaccel.runtime.limits import as_int
from mmaccel.runtime.paths import prune_folder

#: Largest upload the server accepts (images are further checked by `validate_image`).
MAX_UPLOAD = "25mb"

log = logging.getLogger("mmaccel.demo")

__all__ = [
    "build_demo",
    "check_port",
    "launch",
    "DemoLimits",
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


def _one_line(err: BaseException) -> str:
    return "; ".join(p.strip() for p in str(err).strip().splitlines() if p.strip()) or type(err).__name__


def _ui(fn: Callable[..., Any], after: Callable[[], None] | None = None) -> Callable[..., Any]:
    """Turn user errors (bad values, unreadable files or model folders) into ``gr.Error``: the same
    one-line text in the page and one ``WARNING`` line in the server log, no traceback. ``after``
    runs once the request is done (output pruning), whatever happened."""
    gr = _import_gradio()

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError) as err:
            message = _one_line(err)
            log.warning("user error in %s: %s", fn.__name__, message)
            raise gr.Error(message, print_exception=False) from None
        finally:
            if after is not None:
                after()

    return wrapper


def _enlarge(image: Any, side: int = 256) -> Any:
    """A float [0, 1] ``(H, W, 3)`` array as a PIL image scaled up (nearest) to ``side`` px wide."""
    from PIL import Image

    pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    scale = max(1, side // pil.width)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def _number(name: str, value: Any) -> float:
    """A UI number as a float; ``TypeError`` naming ``name`` for anything else (no silent cast)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {type(value).__name__}")
    return value


def _cleanup_folder(path: Path) -> None:
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def stop_on_sigterm() -> bool:
    """Make SIGTERM stop the server as Ctrl-C does (Gradio closes it, the process exits normally and
    the temp folders are deleted at exit); only from the main thread. Returns whether installed."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    return True


def build_demo(
    models: DemoModels | None = None, out_dir: str | Path | None = None, limits: DemoLimits | None = None
) -> Any:
    """The demo as a ``gr.Blocks``; outputs go under ``out_dir`` (a new temp folder by default,
    deleted when the process exits) and are pruned to ``limits`` after every request."""
    gr = _import_gradio()
    models = models or DemoModels()
    limits = limits or DemoLimits()
    if out_dir is None:
        out = Path(tempfile.mkdtemp(prefix="mmaccel-demo-"))
        _cleanup_folder(out)
    else:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
    track = gr.Progress(track_tqdm=True)
    uploads: list[Path] = []  # the private upload folder, set by launch()

    def prune() -> None:
        keep = dict(max_files=limits.max_outputs, max_bytes=limits.max_output_bytes, min_age_s=limits.keep_s)
        prune_folder(out, pattern=f"{OUTPUT_PREFIX}*", **keep)
        for folder in uploads:
            prune_folder(folder, **keep)

    def ui(fn: Callable[..., Any]) -> Callable[..., Any]:
        return _ui(fn, after=prune)

    @ui
    def vlm(image, question, budget, hired, vista, max_new_tokens, progress=track):  # noqa: ANN001, ARG001
        # every event runs without Gradio's preprocessing, so out-of-range API values reach the checks
        # below (one gr.Error, no traceback in the log) instead of Gradio's own slider check, which
        # logs a traceback; `image` is the upload's {"path": ...}, read from its
        # header before decoding (validate_image), never decoded by Gradio first
        r = run_vlm_tab(
            models, image, question, _number("budget", budget), _flag("hired", hired), _flag("vista", vista),
            as_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS), limits=limits,
        )  # fmt: skip
        return r.dense, r.accelerated, r.extras["overlay"], r.markdown(), r.extras["timing"].ratio

    @ui
    def vlm_realistic(budget, hired, vista, toy_ratio, progress=track):  # noqa: ANN001, ARG001
        budget = _number("budget", budget)
        if not 0.01 <= budget <= 1.0:
            raise ValueError(f"budget must be in [0.01, 1.0], got {budget}")
        if not (_flag("hired", hired) or _flag("vista", vista)):
            raise ValueError("turn on HiRED or VISTA (or both) to compare against the dense model")
        with models.lock:  # one timing at a time: concurrent runs would disturb each other's figures
            return realistic_vlm(budget, hired, vista).markdown(toy_ratio)

    @ui
    def dit(text, steps, keep_ratio, dense_from, seed, progress=track):  # noqa: ANN001, ARG001
        r = run_dit_tab(
            models, text, as_int("steps", steps, 1, MAX_STEPS), _number("keep_ratio", keep_ratio),
            _number("dense_from", dense_from), as_int("seed", seed, 0, 2**31 - 1),
        )  # fmt: skip
        return _enlarge(r.dense), _enlarge(r.accelerated), r.markdown(), r.extras["timing"].ratio

    @ui
    def dit_realistic(steps, keep_ratio, dense_from, toy_ratio, progress=track):  # noqa: ANN001, ARG001
        steps = as_int("steps", steps, 1, MAX_STEPS)
        keep_ratio, dense_from = _number("keep_ratio", keep_ratio), _number("dense_from", dense_from)
        check_dit_settings(steps, keep_ratio, dense_from)
        scheduler = models.get("dit").scheduler  # the tab's step schedule: which steps are reduced
        with models.lock:
            return realistic_dit(keep_ratio, dense_from, step_progress(scheduler, steps)).markdown(toy_ratio)

    @ui
    def video(prompt, frames, steps, top_p, dense_steps, seed, progress=track):  # noqa: ANN001, ARG001
        r = run_video_tab(
            models, prompt, out, as_int("frames", frames, 1, MAX_FRAMES), as_int("steps", steps, 1, MAX_STEPS),
            _number("top_p", top_p), _number("dense_steps", dense_steps), as_int("seed", seed, 0, 2**31 - 1),
        )  # fmt: skip
        return str(r.dense), str(r.accelerated), r.markdown(), r.extras["timing"].ratio

    @ui
    def video_realistic(steps, top_p, dense_steps, toy_ratio, progress=track):  # noqa: ANN001, ARG001
        steps = as_int("steps", steps, 1, MAX_STEPS)
        top_p, dense_steps = _number("top_p", top_p), _number("dense_steps", dense_steps)
        check_video_settings(steps, top_p, dense_steps)
        with models.lock:  # Wan 2.1 and Wan 2.2 shapes
            return "\n\n".join(realistic_video(top_p, dense_steps, steps, model=m).markdown(toy_ratio) for m in VIDEO_MODELS)

    @ui
    def ar(class_id, grid, seed, progress=track):  # noqa: ANN001, ARG001
        r = run_ar_tab(
            models, as_int("class_id", class_id, 0, 9), out, as_int("grid", grid, 2, 16),
            as_int("seed", seed, 0, 2**31 - 1), progress=True,
        )  # fmt: skip
        return (
            _enlarge(r.dense),
            _enlarge(r.accelerated),
            str(r.extras["raster_gif"]),
            str(r.extras["nar_gif"]),
            r.markdown(),
            r.extras["timing"].ratio,
        )

    @ui
    def ar_realistic(toy_ratio, progress=track):  # noqa: ANN001, ARG001
        with models.lock:
            return realistic_ar().markdown(toy_ratio)

    defaults = models.defaults()
    age = max(60, int(limits.keep_s * 10))
    with gr.Blocks(title="mmaccel demo", delete_cache=(age, age)) as demo:
        gr.Markdown(
            "# mmaccel: dense vs accelerated\nEach tab runs the same model and inputs twice. "
            "By default the tabs run the zoo's small trained reference models (shapes VLM, digits DiT, "
            "moving-digits Wan, digits VQ + GPTs; `mmaccel zoo list`): real attention structure, toy "
            "scale. `--vlm-model tiny` etc. gives random tiny models; real checkpoints load with "
            "`mmaccel demo --vlm-model PATH ...`.\n\n"
            "**Timings are warm**: each click runs one untimed warm-up call of the dense and of the "
            "accelerated path (excluded), then times both alternately, 3 rounds, and shows the median "
            "with its min-max spread. The toy models are too small for most techniques to pay off: "
            f"each tab's **time on a realistic shape** button times the same settings on a model of "
            f"realistic shape with random weights (depth reduced for a CPU), shown as a *{LABEL}*."
        )
        realistic_label = "time on a realistic shape"
        with gr.Tab("VLM"):
            gr.Markdown(
                f"Default: HiRED at a {VLM_DEFAULTS['budget']:g} visual-token budget, VISTA off, up to "
                f"{VLM_DEFAULTS['max_new_tokens']} new tokens (answers end at the end-of-sequence token). "
                "Chosen on the zoo VLM where word agreement with the dense answer levels off (0.91 over 8 "
                "scenes, 5 identical); some answers still differ in a shape (docs/demo.md)."
            )
            with gr.Row():
                with gr.Column():
                    # a file path, not a decoded image: the size is checked from the header first
                    image = gr.Image(value=defaults["vlm_image"], type="filepath", label="image", image_mode=None)
                    question = gr.Textbox(value=defaults["vlm_question"], label="question")
                    budget = gr.Slider(0.05, 1.0, value=VLM_DEFAULTS["budget"], step=0.05,
                                       label="HiRED visual-token budget")  # fmt: skip
                    hired = gr.Checkbox(value=VLM_DEFAULTS["hired"], label="HiRED (drop visual tokens)")
                    vista = gr.Checkbox(value=VLM_DEFAULTS["vista"], label="VISTA (steer against hallucination)")
                    new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=VLM_DEFAULTS["max_new_tokens"], step=1,
                                           label="max new tokens")  # fmt: skip
                    vlm_btn = gr.Button("Answer", variant="primary")
                    vlm_real_btn = gr.Button(realistic_label)
                with gr.Column():
                    dense_answer = gr.Textbox(label="dense answer")
                    fast_answer = gr.Textbox(label="accelerated answer")
                    overlay = gr.Image(label="kept visual tokens (base image; dropped ones darkened)")
                    vlm_stats = gr.Markdown()
                    vlm_real = gr.Markdown()
            vlm_toy = gr.State(None)
            vlm_btn.click(
                vlm, [image, question, budget, hired, vista, new_tokens],
                [dense_answer, fast_answer, overlay, vlm_stats, vlm_toy], api_name="vlm", preprocess=False,
            )  # fmt: skip
            vlm_real_btn.click(vlm_realistic, [budget, hired, vista, vlm_toy], vlm_real, api_name="vlm_realistic",
                               preprocess=False)  # fmt: skip
        with gr.Tab("Image DiT"):
            labels = sorted(getattr(models.get("dit"), "labels", {}) or {})
            gr.Markdown(
                f"Default: keep {DIT_DEFAULTS['keep_ratio']:g} of the tokens until progress "
                f"{DIT_DEFAULTS['dense_from']:g}, dense after, {DIT_DEFAULTS['steps']} steps. Chosen on the "
                "zoo digits DiT so the digit classifier gives the accelerated sample the dense sample's label "
                "(shown below); fewer kept tokens or a longer reduced phase changes digits (docs/demo.md)."
            )
            with gr.Row():
                with gr.Column():
                    choices = labels or ["a small cat sitting on grass"]
                    label = gr.Dropdown(
                        choices,
                        value=defaults["dit_label"] if defaults["dit_label"] in choices else choices[0],
                        label="class (DiT) or prompt (PixArt)",
                        allow_custom_value=True,
                    )
                    dit_steps = gr.Slider(1, MAX_STEPS, value=DIT_DEFAULTS["steps"], step=1, label="denoising steps")
                    keep = gr.Slider(0.05, 1.0, value=DIT_DEFAULTS["keep_ratio"], step=0.05,
                                     label="token keep ratio (early steps)")  # fmt: skip
                    dense_from = gr.Slider(0.05, 1.0, value=DIT_DEFAULTS["dense_from"], step=0.05,
                                           label="dense from progress")  # fmt: skip
                    dit_seed = gr.Number(value=0, precision=0, label="seed")
                    dit_btn = gr.Button("Generate", variant="primary")
                    dit_real_btn = gr.Button(realistic_label)
                with gr.Column():
                    with gr.Row():
                        dit_dense = gr.Image(label="dense")
                        dit_fast = gr.Image(label="token density")
                    dit_stats = gr.Markdown()
                    dit_real = gr.Markdown()
            dit_toy = gr.State(None)
            dit_btn.click(
                dit,
                [label, dit_steps, keep, dense_from, dit_seed],
                [dit_dense, dit_fast, dit_stats, dit_toy],
                api_name="dit",
                preprocess=False,
            )
            dit_real_btn.click(
                dit_realistic, [dit_steps, keep, dense_from, dit_toy], dit_real, api_name="dit_realistic",
                preprocess=False,
            )
        with gr.Tab("Video"):
            gr.Markdown(
                f"Default: SVG2 keeping {VIDEO_DEFAULTS['top_p']:g} of the attention mass, the first "
                f"{VIDEO_DEFAULTS['dense_steps']:g} of {VIDEO_DEFAULTS['steps']} steps dense. Chosen on the zoo "
                "moving-digits model for the highest PSNR vs dense among the settings tried (docs/demo.md); "
                "the PSNR of each run is shown below."
            )
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(value=defaults["video_prompt"], label="prompt")
                    frames = gr.Slider(1, MAX_FRAMES, value=VIDEO_DEFAULTS["frames"], step=4, label="frames (1 + 4k)")
                    v_steps = gr.Slider(1, MAX_STEPS, value=VIDEO_DEFAULTS["steps"], step=1, label="denoising steps")
                    top_p = gr.Slider(
                        0.1, 1.0, value=VIDEO_DEFAULTS["top_p"], step=0.05, label="SVG2 top-p (attention mass kept)"
                    )
                    dense_steps = gr.Slider(
                        0.0, 1.0, value=VIDEO_DEFAULTS["dense_steps"], step=0.05, label="dense first steps (fraction)"
                    )
                    v_seed = gr.Number(value=0, precision=0, label="seed")
                    v_btn = gr.Button("Generate", variant="primary")
                    v_real_btn = gr.Button(realistic_label)
                with gr.Column():
                    with gr.Row():
                        v_dense = gr.Video(label="dense")
                        v_fast = gr.Video(label="SVG2")
                    v_stats = gr.Markdown()
                    v_real = gr.Markdown()
            gr.Markdown(
                "Long videos over several processes (clip / layer parallel) are the CLI's job:\n\n"
                f"```\n{torchrun_command()}\n```"
            )
            v_toy = gr.State(None)
            v_btn.click(
                video, [prompt, frames, v_steps, top_p, dense_steps, v_seed], [v_dense, v_fast, v_stats, v_toy],
                api_name="video", preprocess=False,
            )  # fmt: skip
            v_real_btn.click(
                video_realistic, [v_steps, top_p, dense_steps, v_toy], v_real, api_name="video_realistic",
                preprocess=False,
            )
        with gr.Tab("AR image"):
            with gr.Row():
                with gr.Column():
                    class_id = gr.Slider(0, 9, value=1, step=1, label="class id")
                    ar_grid = models.get("ar").grid
                    grid = gr.Slider(2, 16, value=ar_grid or 8, step=1, label="token grid (H = W)",
                                     interactive=ar_grid is None)  # fmt: skip
                    ar_seed = gr.Number(value=0, precision=0, label="seed")
                    ar_btn = gr.Button("Sample", variant="primary")
                    ar_real_btn = gr.Button(realistic_label)
                with gr.Column():
                    with gr.Row():
                        ar_raster = gr.Image(label="raster order")
                        ar_nar = gr.Image(label="NAR (next-neighbour)")
                    with gr.Row():
                        raster_gif = gr.Image(label="raster decoding order", type="filepath")
                        nar_gif = gr.Image(label="NAR decoding order", type="filepath")
                    ar_stats = gr.Markdown()
                    ar_real = gr.Markdown()
            ar_toy = gr.State(None)
            ar_btn.click(
                ar,
                [class_id, grid, ar_seed],
                [ar_raster, ar_nar, raster_gif, nar_gif, ar_stats, ar_toy],
                api_name="ar",
                preprocess=False,
            )
            ar_real_btn.click(ar_realistic, [ar_toy], ar_real, api_name="ar_realistic", preprocess=False)
    demo.mmaccel_out_dir = out  # where launch() allows file serving from
    demo.mmaccel_uploads = uploads  # launch() adds its private upload folder: pruned like `out`
    demo.mmaccel_limits = limits
    return demo


def check_port(host: str, port: int | None) -> None:
    """``ValueError`` naming ``--host`` / ``--port`` unless ``host:port`` can be bound now.

    ``port=None`` lets Gradio pick a free port (7860 upwards) and is not checked.
    """
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"--host must be an interface name or address such as 127.0.0.1, got {host!r}")
    if port is None:
        return
    as_int("--port", port, 1, 65535)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ValueError(f"--host {host!r} is not a known interface or address ({err})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as err:
            why = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
            raise ValueError(f"--port {port} on {host} {why}; pick another with --port") from None


def private_upload_folder() -> Path:
    """A fresh folder for Gradio's uploads (``GRADIO_TEMP_DIR``), deleted when the process exits.

    Call it before the app is built, in a process that serves only this demo (``mmaccel demo``
    does): Gradio reads ``GRADIO_TEMP_DIR`` when the app is created, and the folder is then pruned
    to the demo's limits after every request instead of growing in the shared ``/tmp/gradio``.
    """
    folder = Path(tempfile.mkdtemp(prefix="mmaccel-demo-uploads-"))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    _cleanup_folder(folder)
    return folder


def launch(
    models: DemoModels | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    out_dir: str | Path | None = None,
    block: bool = True,
    limits: DemoLimits | None = None,
    upload_dir: str | Path | None = None,
    **launch_kwargs: Any,
) -> Any:
    """Build and serve the demo on ``host:port`` (127.0.0.1 by default); returns the ``gr.Blocks``.

    The port is checked before any model is built: a busy one is a ``ValueError`` naming
    ``--port``. ``upload_dir`` (see :func:`private_upload_folder`) is pruned like the outputs.
    """
    check_port(host, port)
    if block:
        stop_on_sigterm()
    demo = build_demo(models, out_dir, limits)
    if upload_dir is not None:
        demo.mmaccel_uploads.append(Path(upload_dir))
    try:
        demo.queue().launch(
            server_name=host,
            server_port=port,
            allowed_paths=[str(demo.mmaccel_out_dir)],
            prevent_thread_lock=not block,
            show_error=True,
            max_file_size=MAX_UPLOAD,
            **launch_kwargs,
        )
    except OSError as err:  # the port was taken between check_port and the bind
        if "port" not in str(err).lower():
            raise
        raise ValueError(f"--port {port} on {host} is already in use; pick another with --port") from None
    return demo
