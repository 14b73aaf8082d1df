"""Issue #18: every user mistake is one line naming the parameter and its range, checked before work.

Table-driven over the CLI (``mmaccel.apps.cli.main`` in-process, a few real subprocesses), the demo's
handlers (called directly) and the Python API, plus unit tests of the runtime pieces behind them
(`runtime.images`, `runtime.limits`, `runtime.paths`, `runtime.checkpoint_io`). Cases whose fix
belongs in another package are ``xfail(strict=True)`` naming the file to wire; each fails today
for the reason the issue gives (the limit is not checked before the work starts).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmaccel.apps.cli import main
from mmaccel.runtime import checkpoint_io
from mmaccel.runtime.images import PIL_MAX_PIXELS, image_size, open_image
from mmaccel.runtime.limits import (
    MEMORY_LIMIT_ENV,
    as_int,
    available_memory,
    check_prompt,
    check_video_memory,
    estimate_video_memory,
    parse_bytes,
    read_video_model_config,
)
from mmaccel.runtime.paths import (
    check_model_folder,
    check_output_dir,
    check_output_path,
    model_folder_class,
    prune_folder,
)

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "apps" / "zoo" / "models"


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that *declares* ``width x height`` but holds almost no data: decoding it would fail,
    so an error about its size proves the size was read from the header, before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 48), "red").save(d / "ok.png")
    Image.new("RGB", (1, 1)).save(d / "one.png")
    full = (d / "ok.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "text.png").write_bytes(b"not an image at all")
    (d / "a_file").write_text("x")
    (d / "empty_dir").mkdir()
    return {
        "ok": d / "ok.png",
        "one": d / "one.png",
        "bomb": _png_header(d / "bomb.png", 20_000, 20_000),
        "big": _png_header(d / "big.png", 12_000, 12_000),
        "wide": _png_header(d / "wide.png", 5000, 200),
        "truncated": d / "truncated.png",
        "text": d / "text.png",
        "a_file": d / "a_file",
        "empty_dir": d / "empty_dir",
        "dir": d,
    }


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, capsys.readouterr().err


def _assert_one_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


# ------------------------------------------------------------------------------------------
# CLI: mmaccel vlm / mmaccel demo (in-process), one line + exit 2 + the parameter named
# ------------------------------------------------------------------------------------------

_P = "--prompt"
CLI_CASES = [
    # id, argv (placeholders {name} from the files fixture), words the one line must hold
    ("vlm-bomb-20000x20000", ["vlm", "--image", "{bomb}", _P, "hi"], ["--image", "400,000,000 pixels", "--max-pixels"]),
    ("vlm-12000x12000", ["vlm", "--image", "{big}", _P, "hi"], ["12000x12000", "16,000,000", "--max-pixels"]),
    ("vlm-cap-configurable", ["vlm", "--image", "{ok}", _P, "hi", "--max-pixels", "1000"], ["64x48", "--max-pixels"]),
    ("vlm-1x1", ["vlm", "--image", "{one}", _P, "hi"], ["--image", "1x1", "at least 16 px"]),
    ("vlm-empty-prompt", ["vlm", "--image", "{ok}", _P, ""], ["--prompt is empty", "1 to 4000"]),
    ("vlm-blank-prompt", ["vlm", "--image", "{ok}", _P, "   "], ["--prompt is empty"]),
    ("vlm-100k-prompt", ["vlm", "--image", "{ok}", _P, "x" * 100_000], ["--prompt is 100,000 characters", "4,000"]),
    ("vlm-not-an-image", ["vlm", "--image", "{text}", _P, "hi"], ["cannot read --image"]),
    ("vlm-truncated-image", ["vlm", "--image", "{truncated}", _P, "hi"], ["--image", "truncated"]),
    ("vlm-missing-image", ["vlm", "--image", "/no/such.png", _P, "hi"], ["--image '/no/such.png' not found"]),
    ("vlm-image-is-dir", ["vlm", "--image", "{dir}", _P, "hi"], ["--image", "is a folder, not an image file"]),
    ("vlm-max-pixels-range", ["vlm", "--image", "{ok}", _P, "hi", "--max-pixels", "5"], ["--max-pixels", "[256, "]),
    ("vlm-max-pixels-not-int", ["vlm", "--image", "{ok}", _P, "hi", "--max-pixels", "1e9"], ["--max-pixels", "integer"]),
    ("vlm-tokens-0", ["vlm", "--image", "{ok}", _P, "hi", "--max-new-tokens", "0"], ["--max-new-tokens", "[1, 4096]"]),
    ("vlm-budget-nan", ["vlm", "--image", "{ok}", _P, "hi", "--budget", "nan"], ["--budget", "(0, 1]"]),
    ("vlm-model-wrong-kind", ["vlm", "--image", "{ok}", _P, "hi", "--model", str(ZOO / "digits-dit")],
     ["--model", "holds a DiTPipeline", "LlavaNextForConditionalGeneration"]),  # fmt: skip
    ("vlm-model-empty-dir", ["vlm", "--image", "{ok}", _P, "hi", "--model", "{empty_dir}"], ["--model", "naming a class"]),
    ("vlm-device-bogus", ["vlm", "--image", "{ok}", _P, "hi", "--device", "gpu0"], ["--device", "cpu, cuda"]),
    ("demo-port-range", ["demo", "--port", "70000"], ["--port", "[1, 65535]"]),
    ("demo-port-text", ["demo", "--port", "http"], ["--port", "integer"]),
    ("demo-dit-is-vlm", ["demo", "--dit-model", str(ZOO / "shapes-vlm")],
     ["--dit-model", "holds a LlavaNextForConditionalGeneration", "DiTPipeline or PixArtAlphaPipeline"]),  # fmt: skip
    ("demo-vlm-is-wan", ["demo", "--vlm-model", str(ZOO / "moving-digits")], ["--vlm-model", "holds a WanPipeline"]),
    ("demo-video-is-dit", ["demo", "--video-model", str(ZOO / "digits-dit")], ["--video-model", "holds a DiTPipeline"]),
    ("demo-model-missing", ["demo", "--dit-model", "/no/model"], ["--dit-model", "no such folder"]),
    ("demo-out-dir-is-file", ["demo", "--port", "{free_port}", "--out-dir", "{a_file}"], ["--out-dir", "not a folder"]),
    ("demo-out-dir-unwritable", ["demo", "--port", "{free_port}", "--out-dir", "/proc/mmaccel-out"],
     ["--out-dir", "cannot write"]),  # fmt: skip
    ("demo-host-empty", ["demo", "--host", "", "--port", "{free_port}"], ["--host"]),
    ("demo-max-outputs", ["demo", "--max-outputs", "1"], ["--max-outputs", "[4, "]),
    ("demo-max-pixels", ["demo", "--max-pixels", "-3"], ["--max-pixels", "[256, "]),
    ("demo-unknown-flag", ["demo", "--prot", "80"], ["unrecognized arguments: --prot 80"]),
    ("bench-unknown", ["bench", "no_such_bench"], ["unknown benchmark 'no_such_bench'"]),
    ("zoo-unknown-model", ["zoo", "path", "nope"], ["invalid choice: 'nope'"]),
    ("zoo-train-output-is-file", ["zoo", "train", "digits-dit", "--output", "{a_file}"], ["--output", "not a folder"]),
    ("zoo-train-output-unwritable", ["zoo", "train", "digits-dit", "--output", "/proc/zoo"], ["--output", "cannot write"]),
    ("zoo-train-threads-0", ["zoo", "train", "digits-dit", "--threads", "0"], ["--threads must be >= 1"]),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_user_error_is_one_line_exit_2(capsys, files, argv, needles):
    values = {k: str(v) for k, v in files.items()} | {"free_port": str(_free_port())}
    argv = [a.format(**values) if a.startswith("{") else a for a in argv]
    _assert_one_line(*_run(argv, capsys), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_device_without_cuda(capsys, files):
    code, err = _run(["vlm", "--image", str(files["ok"]), _P, "hi", "--device", "cuda"], capsys)
    _assert_one_line(code, err, "--device", "CUDA is not available")


def test_cli_demo_busy_port_is_one_line_before_any_model(capsys, monkeypatch):
    from mmaccel.apps import demo_tabs

    def never(*args, **kwargs):
        raise AssertionError("a model was built before the port was checked")

    monkeypatch.setattr(demo_tabs.DemoModels, "get", never)
    sock, port = _busy_port()
    with sock:
        code, err = _run(["demo", "--port", str(port)], capsys)
    _assert_one_line(code, err, f"--port {port}", "already in use", "pick another with --port")


def test_cli_real_process_bomb_and_busy_port_print_no_traceback(files):
    """The same through a real ``python -m mmaccel.apps.cli`` (what a user runs)."""
    sock, port = _busy_port()
    with sock:
        for argv, needle in (
            (["vlm", "--image", str(files["bomb"]), _P, "hi"], "--max-pixels"),
            (["demo", "--port", str(port)], f"--port {port}"),
        ):
            proc = subprocess.run([sys.executable, "-m", "mmaccel.apps.cli", *argv], capture_output=True,
                                  text=True, timeout=120, cwd=ROOT, env={**os.environ, "MMACCEL_DEBUG": ""})  # fmt: skip
            _assert_one_line(proc.returncode, proc.stderr, needle)


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False), ("3", False)])
def test_cli_user_error_printed_once_on_rank_0(capsys, monkeypatch, files, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, err = _run(["vlm", "--image", str(files["ok"]), _P, ""], capsys)
    assert code == 2
    assert ("--prompt is empty" in err) is printed
    assert len(err.strip().splitlines()) == (1 if printed else 0)


def test_cli_debug_env_shows_the_traceback(monkeypatch, files):
    monkeypatch.setenv("MMACCEL_DEBUG", "1")
    with pytest.raises(ValueError, match="--prompt is empty"):
        main(["vlm", "--image", str(files["ok"]), _P, ""])


# ------------------------------------------------------------------------------------------
# CLI: mmaccel video (apps/video.py + parallel_video/): needs wiring by their owner
# ------------------------------------------------------------------------------------------


@pytest.fixture
def video_never_loads(monkeypatch):
    """Fail the test (AssertionError) the moment `mmaccel video` loads a model: the user errors
    below must be refused before that."""
    import mmaccel.apps.video as video

    def never(*args, **kwargs):
        raise AssertionError("mmaccel video loaded the model before checking its arguments")

    monkeypatch.setattr(video, "_load", never)


_VIDEO = ["video", "--model", "tiny", "--steps", "1", "--quiet"]


@pytest.mark.parametrize("out", ["{dir}", "/proc/mmaccel-video.mp4", "{a_file}/video.mp4"])
def test_video_out_checked_before_the_model_loads(capsys, files, video_never_loads, out):
    out = out.format(**{k: str(v) for k, v in files.items()})
    code, err = _run([*_VIDEO, _P, "a car", "--frames", "5", "--out", out], capsys)
    _assert_one_line(code, err, "--out")


def test_video_100k_prompt_refused_before_the_model_loads(capsys, tmp_path, video_never_loads):
    code, err = _run([*_VIDEO, _P, "x" * 100_000, "--frames", "5", "--out", str(tmp_path / "v.mp4")], capsys)
    _assert_one_line(code, err, "--prompt", "characters")


def test_video_billion_frames_refused_before_any_allocation(capsys, monkeypatch, tmp_path):
    import mmaccel.apps.video as video

    def never(*args, **kwargs):
        raise AssertionError("generation started: 1000000001 frames were not refused")

    monkeypatch.setattr(video, "generate_long_video", never)
    start = time.perf_counter()
    argv = [*_VIDEO, _P, "a car", "--frames", "1000000001", "--out", str(tmp_path / "v.mp4")]
    code, err = _run(argv, capsys)
    _assert_one_line(code, err, "--frames", "[1, 10001]", "--max-frames")
    code, err = _run([*argv, "--max-frames", "2000000000"], capsys)  # the cap raised: memory refuses it
    _assert_one_line(code, err, "--frames", MEMORY_LIMIT_ENV)
    assert time.perf_counter() - start < 5


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step tiny video run; its clip checkpoints stay in ``v.mp4.parts``."""
    out = tmp_path_factory.mktemp("video") / "v.mp4"
    assert main([*_VIDEO[:-3], "--steps", "2", "--quiet", _P, "a car", "--frames", "5", "--out", str(out)]) == 0
    return out


def test_video_resume_with_changed_prompt_names_the_setting(capsys, finished_run):
    argv = [*_VIDEO[:-3], "--steps", "2", "--quiet", "--frames", "5", "--out", str(finished_run), "--resume"]
    code, err = _run([*argv, _P, "a dog"], capsys)
    _assert_one_line(code, err, "prompt: 'a car' -> 'a dog'")


def test_video_resume_falls_back_from_a_truncated_checkpoint(capsys, tmp_path):
    out = tmp_path / "v.mp4"
    argv = [*_VIDEO[:-3], "--steps", "2", "--quiet", _P, "a car", "--frames", "5", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    newest = sorted((tmp_path / "v.mp4.parts").glob("*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    code = main([*argv, "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if newest.name in line]
    assert len(warnings) == 1 and "truncated" in warnings[0] and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# Python API (the same text as ValueError / TypeError / FileNotFoundError)
# ------------------------------------------------------------------------------------------


def test_load_vlm_missing_folder_says_no_such_folder():
    from mmaccel.vlm import load_vlm

    with pytest.raises(FileNotFoundError, match="/nonexistent/path"):
        load_vlm("/nonexistent/path")


def test_attention_balance_twice_says_already_applied():
    from mmaccel.testing import tiny_llava
    from mmaccel.vlm import apply_attention_balance

    model, _ = tiny_llava()
    with apply_attention_balance(model):
        with pytest.raises(ValueError, match="already applied"):
            apply_attention_balance(model)


def test_svg2_kmeans_tol_must_be_finite():
    from mmaccel.sparse_attn import SVG2Config

    with pytest.raises(ValueError, match="kmeans_tol"):
        SVG2Config(kmeans_tol=float("inf"))


def test_top_p_mask_nan_scores_refused():
    from mmaccel.runtime import top_p_mask

    with pytest.raises(ValueError, match="must not be NaN"):
        top_p_mask(torch.tensor([[0.2, float("nan")]]), 0.9)


# ------------------------------------------------------------------------------------------
# Demo handlers: gr.Error with the same text, ONE log line, no traceback; uploads; outputs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pytest.importorskip("gradio")
    from mmaccel.apps.demo import build_demo
    from mmaccel.apps.demo_tabs import DemoLimits, DemoModels

    out = tmp_path_factory.mktemp("demo_out")
    limits = DemoLimits(max_outputs=4, max_output_bytes=1 << 20, keep_s=0)
    return build_demo(DemoModels(vlm="tiny", dit="tiny", video="tiny", ar="tiny"), out, limits)


def _handler(demo, name: str):
    return next(f.fn for f in demo.fns.values() if f.api_name == name)


DEMO_CASES = [
    ("ar-class-1.5", "ar", (1.5, 4, 0), "class_id must be an integer in [0, 9], got 1.5"),
    ("ar-class-10", "ar", (10, 4, 0), "class_id must be in [0, 9], got 10"),
    ("ar-grid-text", "ar", (1, "4", 0), "grid must be an integer in [2, 16], got str"),
    ("video-100k-prompt", "video", ("x" * 100_000, 5, 2, 0.9, 0.25, 0), "prompt is 100,000 characters"),
    ("video-frames-2.5", "video", ("a car", 2.5, 2, 0.9, 0.25, 0), "frames must be an integer in [1, 33]"),
    ("dit-steps-1e9", "dit", ("dog", 1e9, 0.25, 0.8, 0), "steps must be in [1, 50]"),
    ("vlm-no-upload", "vlm", (None, "q", 0.2, True, False, 4), "upload an image first"),
    ("vlm-bomb-upload", "vlm", ({"path": "{bomb}"}, "q", 0.2, True, False, 4), "400,000,000 pixels"),
    ("vlm-12000-upload", "vlm", ({"path": "{big}"}, "q", 0.2, True, False, 4), "12000x12000"),
    ("vlm-wide-upload", "vlm", ({"path": "{wide}"}, "q", 0.2, True, False, 4), "5000x200; each side must be at most 4096 px"),
    ("vlm-1x1-upload", "vlm", ({"path": "{one}"}, "q", 0.2, True, False, 4), "1x1"),
    ("vlm-empty-question", "vlm", ({"path": "{ok}"}, " ", 0.2, True, False, 4), "type a question"),
    ("vlm-tokens-2.5", "vlm", ({"path": "{ok}"}, "q", 0.2, True, False, 2.5), "max_new_tokens must be an integer"),
    ("vlm-hired-text", "vlm", ({"path": "{ok}"}, "q", 0.2, "yes", False, 4), "hired must be true or false"),
]


@pytest.mark.parametrize(("name", "args", "message"), [c[1:] for c in DEMO_CASES], ids=[c[0] for c in DEMO_CASES])
def test_demo_user_error_is_gr_error_and_one_log_line(demo, files, caplog, name, args, message):
    import gradio as gr

    paths = {k: str(v) for k, v in files.items()}
    args = [{"path": a["path"].format(**paths)} if isinstance(a, dict) else a for a in args]
    with caplog.at_level("WARNING", logger="mmaccel.demo"), pytest.raises(gr.Error) as exc:
        _handler(demo, name)(*args)
    assert message in exc.value.message and "\n" not in exc.value.message
    assert exc.value.print_exception is False  # Gradio prints no traceback for it
    records = [r for r in caplog.records if r.name == "mmaccel.demo"]
    assert len(records) == 1 and records[0].exc_info is None
    assert message in records[0].getMessage() and "\n" not in records[0].getMessage()


def test_demo_model_folder_of_wrong_kind_refused_before_loading(monkeypatch):
    import diffusers

    from mmaccel.apps.demo_tabs import DemoModels

    def never(*args, **kwargs):
        raise AssertionError("loaded a pipeline before checking its class")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", never)
    with pytest.raises(ValueError, match="--dit-model .* holds a LlavaNextForConditionalGeneration"):
        DemoModels(dit=str(ZOO / "shapes-vlm")).get("dit")
    with pytest.raises(ValueError, match="--video-model .* holds a DiTPipeline"):
        DemoModels(video=str(ZOO / "digits-dit")).get("video")


def test_demo_outputs_and_uploads_are_bounded(demo, tmp_path):
    out = demo.mmaccel_out_dir
    other = out / "not-ours.txt"
    other.write_text("the user's file stays")
    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    for i in range(6):
        (uploads / "abc" / f"up{i}.png").write_bytes(b"x" * 10)
        os.utime(uploads / "abc" / f"up{i}.png", (time.time() - 100 + i,) * 2)
    demo.mmaccel_uploads.append(uploads)
    try:
        ar = _handler(demo, "ar")
        for seed in range(3):  # 2 GIFs per request, max_outputs=4
            ar(1, 2, seed)
    finally:
        demo.mmaccel_uploads.remove(uploads)
    ours = sorted(p.name for p in out.glob("mmaccel-*"))
    assert len(ours) == 4 and other.exists()
    assert sorted(p.name for p in (uploads / "abc").iterdir()) == ["up2.png", "up3.png", "up4.png", "up5.png"]


def test_demo_temp_out_dir_is_removed_at_exit():
    code = (
        "from mmaccel.apps.demo import build_demo; from mmaccel.apps.demo_tabs import DemoModels; "
        "d = build_demo(DemoModels(vlm='tiny', dit='tiny', video='tiny', ar='tiny')); print(d.mmaccel_out_dir)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("mmaccel-demo-") and not folder.exists()


def test_demo_check_port():
    from mmaccel.apps.demo import check_port

    sock, port = _busy_port()
    with sock, pytest.raises(ValueError, match=f"--port {port} on 127.0.0.1 is already in use"):
        check_port("127.0.0.1", port)
    check_port("127.0.0.1", None)  # Gradio picks the port
    check_port("127.0.0.1", _free_port())
    with pytest.raises(ValueError, match=r"--port must be in \[1, 65535\]"):
        check_port("127.0.0.1", 0)


# ------------------------------------------------------------------------------------------
# runtime.images
# ------------------------------------------------------------------------------------------


def test_open_image_reads_header_before_decoding(files):
    assert image_size(files["big"]) == (12_000, 12_000)
    with pytest.raises(ValueError, match="declares 400,000,000 pixels; PIL opens at most 178,956,970"):
        image_size(files["bomb"])
    img = open_image(files["ok"])
    assert img.size == (64, 48) and img.mode == "RGB"
    img = open_image(files["ok"].read_bytes())  # bytes, as uploads arrive
    assert img.size == (64, 48)
    with pytest.raises(ValueError, match="cannot decode image"):  # within the cap, so decoding is tried
        open_image(files["big"].read_bytes(), max_pixels=PIL_MAX_PIXELS)


@pytest.mark.parametrize(
    ("key", "kwargs", "error", "match"),
    [
        ("bomb", {}, ValueError, r"declares 400,000,000 pixels; the limit is 16,000,000 \(max_pixels"),
        ("big", {"max_pixels": 100_000_000}, ValueError, "12000x12000 = 144,000,000 pixels"),
        ("ok", {"max_pixels": 1000}, ValueError, "64x48 = 3,072 pixels; the limit is 1,000"),
        ("one", {}, ValueError, "1x1; each side must be at least 16 px"),
        ("ok", {"min_side": 50}, ValueError, "at least 50 px"),
        ("text", {}, ValueError, "cannot read image"),
        ("truncated", {}, ValueError, "cannot decode image .*truncated"),
        ("ok", {"max_pixels": 0}, ValueError, r"max_pixels must be in \[1, "),
        ("ok", {"max_pixels": PIL_MAX_PIXELS + 1}, ValueError, "max_pixels must be in"),
        ("ok", {"max_pixels": 2.5}, TypeError, "max_pixels must be an int"),
    ],
)
def test_open_image_errors(files, key, kwargs, error, match):
    with pytest.raises(error, match=match):
        open_image(files[key], **kwargs)


def test_open_image_missing_and_wrong_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="--image '.*nope.png' not found"):
        open_image(tmp_path / "nope.png", name="--image")
    with pytest.raises(TypeError, match="must be a path or bytes"):
        open_image(3)


def test_big_image_is_refused_fast_and_small(files):
    """A 12000 x 12000 header is refused in milliseconds: nothing near its 432 MB is allocated."""
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ValueError):
        open_image(files["big"])
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 10 * 2**20


# ------------------------------------------------------------------------------------------
# runtime.limits
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (1.5, ValueError, r"class_id must be an integer in \[0, 9\], got 1.5"),
        (float("nan"), ValueError, "got nan"),
        (True, TypeError, "got bool"),
        ("3", TypeError, "got str"),
        (10, ValueError, r"class_id must be in \[0, 9\], got 10"),
        (-1.0, ValueError, "got -1"),
    ],
)
def test_as_int_errors(value, error, match):
    with pytest.raises(error, match=match):
        as_int("class_id", value, 0, 9)


def test_as_int_accepts_integral_floats():
    assert as_int("x", 3.0, 0, 9) == 3 and isinstance(as_int("x", 3.0, 0, 9), int)


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [
        ("", ValueError, "prompt is empty; give 1 to 4000 characters"),
        (" \n", ValueError, "prompt is empty"),
        ("x" * 100_000, ValueError, "prompt is 100,000 characters; at most 4,000"),
        ("a\x00b", ValueError, "NUL"),
        (None, TypeError, "prompt must be a str, got NoneType"),
    ],
)
def test_check_prompt_errors(prompt, error, match):
    with pytest.raises(error, match=match):
        check_prompt(prompt)


def test_check_prompt_limits_are_parameters():
    assert check_prompt("x" * 5000, max_chars=10_000) == "x" * 5000
    assert check_prompt("", allow_empty=True) == ""


WAN_TINY = {"in_channels": 16, "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16,
            "ffn_dim": 64}  # fmt: skip


def test_video_memory_estimate_refuses_a_billion_frames_at_once(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    start = time.perf_counter()
    estimate = estimate_video_memory(1_000_000_001, 64, 96, WAN_TINY)
    assert estimate.latent_frames == 250_000_001
    with pytest.raises(ValueError) as exc:
        check_video_memory(estimate, "cpu")
    assert time.perf_counter() - start < 0.1
    message = str(exc.value)
    assert "\n" not in message and "--frames" in message and MEMORY_LIMIT_ENV in message and "TiB" in message


def test_video_memory_estimate_scales_and_fits():
    small = estimate_video_memory(81, 480, 832, WAN_TINY)
    double = estimate_video_memory(161, 480, 832, WAN_TINY)
    split = estimate_video_memory(161, 480, 832, WAN_TINY, ranks=2)
    assert small.latent_frames == 21 and double.latent_frames == 41
    assert double.total > 1.9 * small.total
    assert split.latents < double.latents and split.activations < double.activations
    assert split.frames == double.frames  # rank 0 gathers the whole video
    check_video_memory(estimate_video_memory(5, 64, 96, WAN_TINY), "cpu")  # a tiny video fits


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"frames": 0}, ValueError, "frames must be an int >= 1, got 0"),
        ({"height": 64.0}, TypeError, "height must be an int"),
        ({"ranks": -2}, ValueError, "ranks must be an int >= 1"),
        ({"transformer_config": {}}, ValueError, "transformer_config lacks"),
    ],
)
def test_video_memory_estimate_errors(kwargs, error, match):
    args = {"frames": 5, "height": 64, "width": 96, "transformer_config": WAN_TINY} | kwargs
    with pytest.raises(error, match=match):
        estimate_video_memory(**args)


def test_memory_limit_env(monkeypatch):
    estimate = estimate_video_memory(81, 480, 832, WAN_TINY)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1MiB")
    assert available_memory() == 2**20
    with pytest.raises(ValueError, match="but 1.0 MiB is free"):
        check_video_memory(estimate)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "off")
    assert available_memory() is None
    check_video_memory(estimate_video_memory(1_000_000_001, 64, 96, WAN_TINY))  # explicitly off
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MEMORY_LIMIT_ENV} must be a size"):
        available_memory()


@pytest.mark.parametrize(("text", "expected"), [("48GiB", 48 * 2**30), ("500 MB", 500 * 10**6), ("1e9", 10**9),
                                                ("1024", 1024)])  # fmt: skip
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_read_video_model_config_from_the_zoo_folder():
    transformer, temporal, spatial = read_video_model_config(ZOO / "moving-digits")
    assert transformer["_class_name"] == "WanTransformer3DModel" and temporal >= 1 and spatial >= 1
    estimate_video_memory(5, 64, 64, transformer, temporal_stride=temporal, spatial_stride=spatial)
    with pytest.raises(FileNotFoundError, match="transformer/config.json"):
        read_video_model_config(ZOO / "shapes-vlm")


# ------------------------------------------------------------------------------------------
# runtime.paths
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("{dir}", "is a directory; give a file path"),
        ("/proc/mmaccel-video.mp4", "cannot write in '/proc'"),
        ("{a_file}/video.mp4", "is not a folder"),
        ("", "--out is empty"),
    ],
)
def test_check_output_path_errors(files, path, match):
    path = path.format(**{k: str(v) for k, v in files.items()})
    with pytest.raises(ValueError, match=match):
        check_output_path(path)


def test_check_output_path_accepts_new_files_and_folders(tmp_path):
    assert check_output_path(tmp_path / "v.mp4") == tmp_path / "v.mp4"
    assert check_output_path(tmp_path / "new" / "deeper" / "v.mp4")  # the writer creates the parents
    assert not (tmp_path / "new").exists()  # nothing created, no probe file left
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="must end with .mp4"):
        check_output_path(tmp_path / "v.gif", suffixes=[".mp4"])
    with pytest.raises(TypeError, match="--out must be a path"):
        check_output_path(3)


def test_check_output_dir(files, tmp_path):
    assert check_output_dir(tmp_path / "parts") == tmp_path / "parts"
    with pytest.raises(ValueError, match="--checkpoint-dir .* exists and is not a folder"):
        check_output_dir(files["a_file"])
    with pytest.raises(ValueError, match="cannot write"):
        check_output_dir("/proc/mmaccel-parts")


def test_model_folder_class_reads_json_only(tmp_path):
    assert model_folder_class(ZOO / "digits-dit") == "DiTPipeline"
    assert model_folder_class(ZOO / "shapes-vlm") == "LlavaNextForConditionalGeneration"
    assert model_folder_class(tmp_path) is None
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not readable JSON"):
        model_folder_class(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    assert model_folder_class(tmp_path) == "WanTransformer3DModel"
    with pytest.raises(ValueError, match="--x .* holds a WanTransformer3DModel; expected one of WanPipeline"):
        check_model_folder(tmp_path, flag="--x", accepted=["WanPipeline"])
    with pytest.raises(FileNotFoundError, match="--x '/no/such' is not a folder"):
        check_model_folder("/no/such", flag="--x", accepted=["WanPipeline"])


def test_prune_folder_keeps_newest_and_young_files(tmp_path):
    now = time.time()
    for i in range(5):
        path = tmp_path / "sub" / f"mmaccel-{i}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - 1000 + i, now - 1000 + i))
    (tmp_path / "user.txt").write_text("kept")
    deleted = prune_folder(tmp_path, max_files=2, max_bytes=10**6, pattern="mmaccel-*", now=now)
    assert sorted(p.name for p in deleted) == ["mmaccel-0.bin", "mmaccel-1.bin", "mmaccel-2.bin"]
    assert (tmp_path / "user.txt").exists()
    assert prune_folder(tmp_path, max_files=0, max_bytes=0, min_age_s=10_000, now=now) == []  # all too young
    prune_folder(tmp_path, max_files=0, max_bytes=0, pattern="mmaccel-*", now=now)
    assert not (tmp_path / "sub").exists()  # emptied sub-folders go too
    with pytest.raises(ValueError, match="max_files must be an int >= 0"):
        prune_folder(tmp_path, max_files=-1, max_bytes=0)


# ------------------------------------------------------------------------------------------
# runtime.checkpoint_io
# ------------------------------------------------------------------------------------------


def test_checkpoint_roundtrip_and_atomic(tmp_path):
    obj = {"latents": torch.randn(2, 3), "step": 4, "meta": {"settings": "{}"}}
    path = checkpoint_io.save_verified(obj, tmp_path / "c.pt")
    back = checkpoint_io.load_verified(path)
    assert torch.equal(back["latents"], obj["latents"]) and back["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b[:30], "truncated .*no header"),
        (lambda b: b[: len(b) - 50], r"truncated \(\d+ of \d+ payload bytes\)"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum mismatch"),
        (lambda b: b"PK" + b[2:], "no mmaccel checksum header"),
    ],
)
def test_checkpoint_damage_is_one_line_naming_the_file(tmp_path, damage, match):
    path = checkpoint_io.save_verified({"x": torch.ones(100)}, tmp_path / "c.pt")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(checkpoint_io.CorruptCheckpointError, match=match) as exc:
        checkpoint_io.load_verified(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_checkpoint_refuses_unsafe_pickles(tmp_path):
    path = checkpoint_io.save_verified({"f": Path("x")}, tmp_path / "c.pt")  # not a weights-only type
    with pytest.raises(checkpoint_io.CorruptCheckpointError, match="cannot be loaded safely"):
        checkpoint_io.load_verified(path)


def test_newest_valid_falls_back_with_one_warning(tmp_path):
    paths = [checkpoint_io.save_verified({"step": s}, tmp_path / f"s{s}.pt") for s in (1, 2, 3)]
    paths[2].write_bytes(paths[2].read_bytes()[:100])
    warnings: list[str] = []
    path, payload = checkpoint_io.newest_valid(paths, warn=warnings.append)
    assert path == paths[1] and payload["step"] == 2
    assert len(warnings) == 1 and "s3.pt" in warnings[0] and "falling back to s2.pt" in warnings[0]
    for p in paths:
        p.write_bytes(b"")
    assert checkpoint_io.newest_valid(paths, warn=warnings.append) is None
    assert "no older checkpoint" in warnings[-1]


def test_settings_diff_names_the_settings():
    saved = {"settings": json.dumps({"prompt": "a car", "seed": 0, "num_frames": 81}), "world_size": 2}
    now = {"settings": json.dumps({"prompt": "a dog", "seed": 0, "num_frames": 85}), "world_size": 2}
    assert checkpoint_io.settings_diff(saved, now) == ["num_frames: 81 -> 85", "prompt: 'a car' -> 'a dog'"]
    assert checkpoint_io.settings_diff(now, now) == []
    assert checkpoint_io.settings_diff({"a": 1}, {"b": 1}) == ["a: 1 -> (absent)", "b: (absent) -> 1"]
    nested = checkpoint_io.settings_diff({"s": json.dumps({"clip": {"padding": 1}})}, {"s": json.dumps({"clip": {"padding": 2}})})
    assert nested == ["clip.padding: 1 -> 2"]



# ------------------------------------------------------------------------------------------
# Issue #31: limits of the video command, outputs checked first, checkpoint folders, weights
# ------------------------------------------------------------------------------------------


def _copy_configs(src: Path, dst: Path) -> Path:
    """The JSON / text files of a saved model folder (no weights), as a base for broken folders."""
    for path in src.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jinja", ".txt", ".model"):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dst


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    """Model folders with one bad weight file each, and checkpoint folders of an earlier run."""
    d = tmp_path_factory.mktemp("broken")
    out: dict[str, Path] = {}
    video_weights = "transformer/diffusion_pytorch_model.safetensors"
    real = (ZOO / "moving-digits" / video_weights).read_bytes()
    for name, content in (("truncated", real[: len(real) // 2]), ("garbage", b"\xff" * 4096)):
        folder = _copy_configs(ZOO / "moving-digits", d / f"video-{name}")
        (folder / video_weights).write_bytes(content)
        out[f"video-{name}"] = folder
    pickled = _copy_configs(ZOO / "moving-digits", d / "video-pickle")
    torch.save({"w": torch.zeros(2)}, pickled / "transformer" / "diffusion_pytorch_model.bin")
    out["video-pickle"] = pickled
    vlm = _copy_configs(ZOO / "shapes-vlm", d / "vlm-garbage")
    (vlm / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    out["vlm-garbage"] = vlm
    bad_json = _copy_configs(ZOO / "shapes-vlm", d / "vlm-bad-json")
    (bad_json / "config.json").write_text("{ not json")
    out["vlm-bad-json"] = bad_json
    video_json = _copy_configs(ZOO / "moving-digits", d / "video-bad-json")
    (video_json / "transformer" / "config.json").write_text("{ not json")
    out["video-bad-json"] = video_json
    parts = d / "run.mp4.parts"
    parts.mkdir()
    for step in (103, 104, 105):
        (parts / f"clip0of1_step{step:05d}.pt").write_bytes(b"x")
    out["parts"] = parts
    return out


VIDEO_CASES = [
    # id, extra argv ({name} from the broken / files fixtures), words the one line must hold
    ("steps-100M", ["--steps", "100000000"], ["--steps must be in [1, 1000]", "--max-steps"]),
    ("steps-1e12", ["--steps", "1e12"], ["--steps", "invalid int value"]),
    ("steps-100M-raised", ["--steps", "100000000", "--max-steps", "1000000000"], ["--steps", "schedule", MEMORY_LIMIT_ENV]),
    ("max-steps-0", ["--max-steps", "0"], ["--max-steps must be an int >= 1"]),
    ("frames-over-cap", ["--frames", "20001"], ["--frames must be in [1, 10001]", "--max-frames"]),
    ("out-webm", ["--out", "{dir}/x.webm"], ["--out", "'.webm'", ".mp4", ".gif", ".png"]),
    ("out-txt", ["--out", "{dir}/x.txt"], ["--out", "'.txt'", "the formats written are"]),
    ("out-no-suffix", ["--out", "{dir}/video"], ["--out", "no suffix"]),
    ("old-checkpoints", ["--out", "{dir}/run.mp4", "--checkpoint-dir", "{parts}"],
     ["--checkpoint-dir", "3 checkpoint(s)", "up to step 105", "--resume", "--overwrite"]),  # fmt: skip
    ("resume-and-overwrite", ["--resume", "--overwrite"], ["--resume and --overwrite"]),
    ("timeout-0", ["--timeout", "0"], ["--timeout"]),
    ("model-truncated", ["--model", "{video-truncated}"], ["--model", "diffusion_pytorch_model.safetensors", "truncated"]),
    ("model-garbage", ["--model", "{video-garbage}"], ["--model", "diffusion_pytorch_model.safetensors", "not a safetensors"]),
    ("model-pickle", ["--model", "{video-pickle}"], ["--model", "diffusion_pytorch_model.bin", "pickle"]),
    ("prompt-nul", [_P, "a\x00car"], ["--prompt contains a NUL"]),
    ("model-bad-config-json", ["--model", "{video-bad-json}"], ["transformer/config.json", "not readable JSON"]),
    ("minutes-lower-bound", ["--frames", "2001", "--height", "256", "--width", "384", "--steps", "1000",
                             "--max-minutes", "1"],
     ["this video needs at least", "TFLOP in 1,000 steps", "over the limit of 1 min", "--max-minutes"]),
    ("max-minutes-0", ["--max-minutes", "0"], ["--max-minutes must be an int >= 1"]),
]


@pytest.mark.parametrize(("extra", "needles"), [c[1:] for c in VIDEO_CASES], ids=[c[0] for c in VIDEO_CASES])
def test_video_user_error_is_one_line_before_any_work(capsys, monkeypatch, files, broken, video_never_loads,
                                                      extra, needles):  # fmt: skip
    import mmaccel.apps.video as video

    def never(*args, **kwargs):
        raise AssertionError("generation started before the arguments were refused")

    monkeypatch.setattr(video, "generate_long_video", never)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "8GiB")
    values = {k: str(v) for k, v in {**files, **broken}.items()}
    extra = [a.format(**values) if "{" in a else a for a in extra]
    argv = [*_VIDEO, _P, "a car", "--frames", "5", "--out", str(files["dir"] / "v.mp4"), *extra]
    start = time.perf_counter()
    _assert_one_line(*_run(argv, capsys), *needles)
    assert time.perf_counter() - start < 5


VLM_MODEL_CASES = [
    ("garbage-safetensors", "vlm-garbage", ["--model", "model.safetensors", "garbled"]),
    ("broken-config-json", "vlm-bad-json", ["--model", "config.json", "not readable JSON"]),
]


@pytest.mark.parametrize(("key", "needles"), [c[1:] for c in VLM_MODEL_CASES], ids=[c[0] for c in VLM_MODEL_CASES])
def test_vlm_broken_model_folder_is_one_line(capsys, files, broken, key, needles):
    code, err = _run(["vlm", "--image", str(files["ok"]), _P, "hi", "--model", str(broken[key])], capsys)
    _assert_one_line(code, err, *needles)
    assert "invalid model value" not in err


def test_vlm_image_dev_zero_is_not_a_regular_file(capsys):
    code, err = _run(["vlm", "--image", "/dev/zero", _P, "hi"], capsys)
    _assert_one_line(code, err, "--image '/dev/zero' is not a regular file")


def test_demo_refuses_a_broken_model_folder_before_loading(broken):
    from mmaccel.apps.demo_tabs import DemoModels

    with pytest.raises(ValueError, match="--video-model: weight file .*diffusion_pytorch_model.bin.* pickle"):
        DemoModels(video=str(broken["video-pickle"])).get("video")


def test_video_rerun_without_resume_keeps_the_finished_steps(capsys, tmp_path):
    """An interrupted run's checkpoints survive a rerun without --resume (refused, nothing
    deleted); --overwrite starts over; --resume continues."""
    out = tmp_path / "v.mp4"
    argv = [*_VIDEO[:-3], "--steps", "2", "--quiet", _P, "a car", "--frames", "5", "--out", str(out)]
    assert main(argv) == 0
    parts = sorted((tmp_path / "v.mp4.parts").glob("*.pt"))
    before = {p.name: p.read_bytes() for p in parts}
    capsys.readouterr()
    _assert_one_line(*_run(argv, capsys), "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in parts} == before  # nothing replaced
    assert main([*argv, "--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("suffix", [".gif", ".png", ".mp4"])
def test_video_formats_are_written_and_verified(tmp_path, suffix):
    from mmaccel.apps.video_output import check_video_output, frame_paths, write_video

    rng = torch.Generator().manual_seed(0)
    frames = torch.rand(5, 32, 48, 3, generator=rng).numpy()
    path = check_video_output(tmp_path / f"v{suffix}")
    written = write_video(frames, path, fps=8)
    files = frame_paths(path, 5) if suffix == ".png" else [path]
    assert written == files[0] and all(f.stat().st_size > 0 for f in files)
    if suffix == ".png":
        assert Image.open(files[-1]).size == (48, 32)


def test_video_written_file_is_verified_before_wrote(tmp_path, monkeypatch):
    """A writer that leaves an empty file is caught: one-line WriteError, nothing reported written."""
    from mmaccel.apps import video_output
    from mmaccel.runtime.checkpoint_io import WriteError

    monkeypatch.setattr(video_output, "_write_one", lambda path, write: path.write_bytes(b""))
    with pytest.raises(WriteError, match="was written empty"):
        video_output.write_video(torch.rand(3, 16, 16, 3).numpy(), tmp_path / "v.gif", fps=8)


def test_checkpoint_disk_full_is_one_line_naming_the_path_and_space(tmp_path, monkeypatch):
    """The kernel's own ENOSPC (/dev/full) during torch.save: one line, no torch traceback."""
    import builtins

    real_open = builtins.open

    def full_open(path, mode="r", *args, **kwargs):
        return real_open("/dev/full", mode) if "w" in mode else real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "open", full_open, raising=False)
    target = tmp_path / "ckpt.pt"
    with pytest.raises(checkpoint_io.WriteError) as exc:
        checkpoint_io.save_verified({"latents": torch.zeros(1000)}, target)
    message = str(exc.value)
    assert "no space left to write" in message and str(target) in message and "needs about" in message
    assert "\n" not in message and "inline_container" not in message
    assert isinstance(exc.value, ValueError)  # the CLI and the ranks report it as one line
    assert not list(tmp_path.iterdir())  # no temp file left behind


def test_checkpoint_permission_error_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint_io, "open", refuse, raising=False)
    with pytest.raises(checkpoint_io.WriteError, match="cannot write .*ckpt.pt.*Permission denied"):
        checkpoint_io.save_verified({"x": 1}, tmp_path / "ckpt.pt")


def test_check_weight_files_accepts_the_zoo_and_names_bad_files(broken):
    for name in ("moving-digits", "shapes-vlm", "digits-dit"):
        checkpoint_io.check_weight_files(ZOO / name)
    with pytest.raises(checkpoint_io.CorruptCheckpointError, match="m: weight file .* is truncated"):
        checkpoint_io.check_weight_files(broken["video-truncated"], flag="m")


def test_check_weight_files_leaves_a_pickle_next_to_safetensors_alone(tmp_path):
    """Hub folders often ship pytorch_model.bin beside model.safetensors; the loaders take the latter."""
    (tmp_path / "model.safetensors").write_bytes((ZOO / "shapes-vlm" / "model.safetensors").read_bytes())
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    checkpoint_io.check_weight_files(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(checkpoint_io.CorruptCheckpointError, match="pytorch_model.bin.* is a pickle"):
        checkpoint_io.check_weight_files(tmp_path)


def test_lost_peer_is_one_line_with_the_resume_hint(tmp_path):
    """Under torchrun, a killed rank: the survivor prints our one line with the hint, no traceback."""
    script = tmp_path / "job.py"
    script.write_text(
        "import os, torch\nfrom mmaccel.runtime.distributed import all_gather_varlen, init_distributed\n"
        "ctx = init_distributed(backend='gloo', timeout_s=20)\n"
        "with ctx.guard('mmaccel video', hint='rerun the same command with --resume'):\n"
        "    all_gather_varlen(ctx, torch.ones(2))\n"
        "    if ctx.rank == 1:\n        os._exit(9)\n"
        "    all_gather_varlen(ctx, torch.ones(2))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "MMACCEL_DEBUG")}  # fmt: skip
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0", str(script)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("mmaccel video: error:")]
    assert proc.returncode != 0
    assert len(ours) == 1 and "rerun the same command with --resume" in ours[0], proc.stderr[-3000:]
    assert 'job.py", line' not in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# Issue #31: the Python API holds the same limits (VLM.generate, LongVideoConfig, Limits)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm():
    from mmaccel.testing import tiny_llava_next
    from mmaccel.vlm import load_vlm

    model, processor = tiny_llava_next()
    return load_vlm(model, processor=processor)


_OK_IMAGE = Image.new("RGB", (64, 48), "red")
API_CASES = [
    # id, generate kwargs, error type, message
    ("prompt-1MB", {"prompts": "x" * 1_000_000}, ValueError, "prompt is 1,000,000 characters"),
    ("new-tokens-1e12", {"max_new_tokens": 10**12}, ValueError, r"max_new_tokens must be in \[1, 4096\].*Limits"),
    ("new-tokens-float", {"max_new_tokens": 2.0}, TypeError, "max_new_tokens must be an int"),
    ("new-tokens-bool", {"max_new_tokens": True}, TypeError, "max_new_tokens"),
    ("image-1x1", {"images": Image.new("RGB", (1, 1))}, ValueError, "1x1; each side must be at least 16 px"),
    ("array-nan", {"images": np.full((32, 32, 3), np.nan, dtype=np.float32)}, ValueError, "NaN or infinite"),
    ("array-2x2", {"images": np.zeros((2, 2, 3), dtype=np.uint8)}, ValueError, "at least 16 px"),
    ("prompt-nul", {"prompts": "what\x00is it"}, ValueError, "prompt contains a NUL"),
    ("prompt-empty", {"prompts": "  "}, ValueError, "prompt is empty"),
    ("prompt-not-str", {"prompts": [3]}, TypeError, r"prompts\[0\] must be a str|prompt must be a str"),
    ("over-context", {"prompts": "word " * 700, "max_new_tokens": 4096}, ValueError, "over the model's context"),
    ("limits-type", {"limits": {"max_new_tokens": 5}}, TypeError, "limits must be"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_vlm_generate_holds_the_limits(tiny_vlm, kwargs, error, match):
    import mmaccel.vlm.api as api

    kwargs = {"images": _OK_IMAGE, "prompts": "what is it?", **kwargs}
    start = time.perf_counter()
    with pytest.raises(error, match=match) as exc:
        tiny_vlm.generate(**kwargs)
    assert "\n" not in str(exc.value)
    assert time.perf_counter() - start < 5
    assert api.VLM.generate is type(tiny_vlm).generate


def test_vlm_generate_limits_can_be_raised(tiny_vlm):
    from mmaccel.runtime.limits import Limits

    with pytest.raises(ValueError, match="new tokens fit"):  # raised past the cap: the context decides
        tiny_vlm.generate(_OK_IMAGE, "what is it?", max_new_tokens=5000, limits=Limits(max_new_tokens=5000))
    with pytest.raises(ValueError, match="prompt is 5,000 characters; at most 4,000"):
        tiny_vlm.generate(_OK_IMAGE, "x" * 5000, max_new_tokens=2)
    with pytest.raises(ValueError, match="over the model's context of 2,048 tokens"):  # the raise took effect
        tiny_vlm.generate(_OK_IMAGE, "x" * 5000, max_new_tokens=2, limits=Limits(max_prompt_chars=6000))
    out = tiny_vlm.generate(_OK_IMAGE, "what is it?", max_new_tokens=2, limits=Limits(max_new_tokens=2))
    assert out.stats[0].new_tokens >= 1


def test_long_video_config_holds_the_limits():
    from mmaccel.parallel_video import LongVideoConfig
    from mmaccel.runtime.limits import Limits

    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\].*max_steps"):
        LongVideoConfig(prompt="a car", num_inference_steps=10**12)
    with pytest.raises(ValueError, match="num_frames must be in"):
        LongVideoConfig(prompt="a car", num_frames=10**9 + 1)
    with pytest.raises(ValueError, match="prompt contains a NUL"):
        LongVideoConfig(prompt="a\x00car")
    assert LongVideoConfig(prompt="a car", num_inference_steps=5000, limits=Limits(max_steps=5000))


def test_limits_validate_and_name_the_raise():
    from mmaccel.runtime.limits import Limits

    with pytest.raises(ValueError, match="Limits.max_steps must be in"):
        Limits(max_steps=0)
    with pytest.raises(TypeError, match="Limits.max_frames"):
        Limits(max_frames="9")
    with pytest.raises(ValueError, match=r"\(raise the limit with --max-steps\)"):
        Limits().steps(1001, "--steps", "--max-steps")
    assert Limits(max_steps=2000).steps(1001) == 1001


def test_video_memory_estimate_covers_steps(monkeypatch):
    from mmaccel.testing import TINY_WAN_TRANSFORMER

    small = estimate_video_memory(5, 64, 96, TINY_WAN_TRANSFORMER, steps=50)
    huge = estimate_video_memory(5, 64, 96, TINY_WAN_TRANSFORMER, steps=100_000_000)
    assert huge.total - small.total == (100_000_000 - 50) * 256  # the schedule's bytes per step
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "8GiB")
    check_video_memory(small, "cpu")
    with pytest.raises(ValueError, match=r"schedule 23\.8 GiB.*--steps"):
        check_video_memory(huge, "cpu")


# ------------------------------------------------------------------------------------------
# Issue #31: the demo refuses API values outside the sliders itself, hides server paths,
# cleans its temp folders on SIGTERM
# ------------------------------------------------------------------------------------------


def test_demo_events_skip_gradio_preprocessing(demo):
    """Gradio's own slider check raises an error whose traceback lands in the log; every event runs
    without it, so our checks refuse out-of-range API values in one line (DEMO_CASES above)."""
    events = {f.api_name: f.preprocess for f in demo.fns.values() if f.api_name}
    assert {"vlm", "dit", "video", "ar", "dit_realistic", "video_realistic", "ar_realistic"} <= set(events)
    assert not any(events.values()), events


@pytest.mark.parametrize("key", ["text", "truncated"])
def test_demo_upload_error_hides_the_server_path(demo, files, caplog, key):
    import gradio as gr

    with caplog.at_level("WARNING", logger="mmaccel.demo"), pytest.raises(gr.Error) as exc:
        _handler(demo, "vlm")({"path": str(files[key])}, "q", 0.2, True, False, 4)
    assert "uploaded image" in exc.value.message
    assert str(files["dir"]) not in exc.value.message and str(files["dir"]) not in caplog.text


def test_demo_sigterm_removes_its_temp_folders(tmp_path):
    """`mmaccel demo` stopped with SIGTERM deletes its output and upload temp folders, as on Ctrl-C."""
    import signal

    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmaccel.apps.cli", "demo", "--port", str(port), "--vlm-model", "tiny",
           "--dit-model", "tiny", "--video-model", "tiny", "--ar-model", "tiny"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert len(list(tmp_path.glob("mmaccel-demo-*"))) == 2  # outputs + private uploads
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(tmp_path.glob("mmaccel-demo-*")), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_video_user_error_under_torchrun_exits_2_on_every_rank_printed_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "MMACCEL_DEBUG")}  # fmt: skip
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0",
           "-m", "mmaccel.apps.cli", "video", "--model", "tiny", "--prompt", "a car", "--steps", "100000000",
           "--out", str(tmp_path / "v.mp4")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    ours = [line for line in proc.stderr.splitlines() if "--steps must be in [1, 1000]" in line]
    assert len(ours) == 1 and ours[0].startswith("mmaccel video: error: "), proc.stderr[-3000:]
    # torchrun's report: every rank exits 2; a rank still importing when another exits is stopped by
    # torchrun itself (SIGTERM, on a loaded machine), never a rank exiting 1 with a traceback
    codes = re.findall(r"exitcode  : (-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    assert 'cli.py", line' not in proc.stderr and 'video.py", line' not in proc.stderr


def test_step_timeout_follows_the_measured_step_time():
    from mmaccel.parallel_video.generate import MIN_TIMEOUT_S, TIMEOUT_STEPS, StepTimeout
    from mmaccel.runtime.distributed import DistContext

    ctx = DistContext.single(timeout_s=120)
    clock = StepTimeout(ctx)
    clock.step()  # a fast step: the floor
    assert ctx.timeout_s == MIN_TIMEOUT_S == 30.0
    clock.last -= 20.0  # a 20 s step
    clock.step()
    assert ctx.timeout_s == pytest.approx(TIMEOUT_STEPS * 20.0, rel=0.01)
    clock.last -= 30.0  # 3 steps in 30 s (a checkpoint every 3 iterations): 10 s each, the slowest stays
    clock.step(3)
    assert ctx.timeout_s == pytest.approx(TIMEOUT_STEPS * 20.0, rel=0.01)


def test_vlm_prompt_over_the_zoo_vlms_context_is_one_line(capsys, files):
    """3,900 characters pass the character cap but not the zoo VLM's 1,024-token context: refused
    before generating, without transformers' indexing warning."""
    code, err = _run(["vlm", "--image", str(files["ok"]), _P, "a red square " * 300], capsys)
    err = "\n".join(line for line in err.splitlines() if not line.startswith("Loading weights"))
    _assert_one_line(code, err, "over the model's context of 1,024 tokens", "shorten the prompt")


def _launch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "MMACCEL_DEBUG")}  # fmt: skip
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_video_nproc_per_node_user_error_is_one_line_exit_2(tmp_path):
    """`mmaccel video --nproc-per-node 2`: no launcher report at all, only our line and exit 2."""
    cmd = [sys.executable, "-m", "mmaccel.apps.cli", "video", "--nproc-per-node", "2", "--model", "tiny",
           "--prompt", "a car", "--steps", "100000000", "--out", str(tmp_path / "v.mp4")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_launch_env(), capture_output=True, text=True, timeout=180)
    _assert_one_line(proc.returncode, proc.stderr, "mmaccel video: error: --steps must be in [1, 1000]")


def test_video_nproc_per_node_runs_the_ranks(tmp_path):
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "mmaccel.apps.cli", "video", "--nproc-per-node", "2", "--model", "tiny",
           "--prompt", "a car", "--frames", "9", "--steps", "2", "--quiet", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and out.stat().st_size > 0
    assert "Traceback" not in proc.stderr and "W1" not in proc.stderr  # the launcher's log lines are silenced


def test_launcher_reports_a_killed_rank_with_the_resume_hint(capsys):
    from types import SimpleNamespace

    from mmaccel.apps.launch import _report, without_flag

    failures = {1: SimpleNamespace(exitcode=-9), 0: SimpleNamespace(exitcode=1)}
    assert _report(failures, "mmaccel video", "rerun with --resume") == 1
    assert capsys.readouterr().err == "mmaccel video: error: rank 1 was stopped by SIGKILL; rerun with --resume\n"
    assert _report({0: SimpleNamespace(exitcode=2), 1: SimpleNamespace(exitcode=1)}, "mmaccel video", None) == 2
    assert capsys.readouterr().err == ""  # a user error: the rank printed it
    assert without_flag(["video", "--nproc-per-node", "2", "--x", "--nproc-per-node=3"], "--nproc-per-node") == [
        "video", "--x"]  # fmt: skip


def test_demo_api_values_outside_the_sliders_are_one_log_line_over_http(capfd, caplog):
    """Through the real HTTP API (gradio_client): Gradio's own slider check is skipped, ours refuses
    each value in one WARNING line, and nothing prints a traceback."""
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    from mmaccel.apps.demo import launch
    from mmaccel.apps.demo_tabs import DemoModels

    demo = launch(DemoModels(vlm="tiny", dit="tiny", video="tiny", ar="tiny"), port=_free_port(), block=False,
                  quiet=True)  # fmt: skip
    try:
        client = Client(demo.local_url, verbose=False)
        assert len(client.predict(1, 4, 0, api_name="/ar")) == 5  # in range: answered
        with caplog.at_level("WARNING", logger="mmaccel.demo"):
            for args, message in (((1, 400, 0), "grid must be in [2, 16], got 400"),
                                  ((1.5, 4, 0), "class_id must be an integer in [0, 9], got 1.5")):  # fmt: skip
                with pytest.raises(Exception, match=re.escape(message)):
                    client.predict(*args, api_name="/ar")
    finally:
        demo.close()
    records = [r for r in caplog.records if r.name == "mmaccel.demo"]
    assert len(records) == 2 and all(r.exc_info is None for r in records)
    assert "Traceback" not in capfd.readouterr().err


def test_zoo_dit_loads_without_the_id2label_warning(capfd):
    from mmaccel.apps.demo_tabs import DemoModels
    from mmaccel.apps.zoo.digits_dit import load

    assert sorted(load().labels)[:2] == ["eight", "five"]
    assert len(DemoModels(dit=str(ZOO / "digits-dit")).get("dit").labels) == 10
    assert "Expected types for id2label" not in capfd.readouterr().err


def test_remove_drops_the_hook_registry_diffusers_created_while_patched():
    """SVG2 on a pipeline's transformer: the pipeline's cache_context creates `_diffusers_hook`
    during the patched run; remove() takes it away (and keeps one that existed before)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmaccel.sparse_attn import apply_svg2
    from mmaccel.testing import tiny_wan_pipeline

    transformer = tiny_wan_pipeline().transformer
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(5)
    before = set(transformer.__dict__)
    handle = apply_svg2(transformer, None, scheduler=scheduler)
    with transformer.cache_context("cond"):
        pass
    assert "_diffusers_hook" in transformer.__dict__
    handle.remove()
    assert set(transformer.__dict__) == before
    with transformer.cache_context("cond"):  # now it exists before the patch: it stays
        pass
    with apply_svg2(transformer, None, scheduler=scheduler):
        pass
    assert "_diffusers_hook" in transformer.__dict__


def test_video_overwrite_deletes_every_earlier_checkpoint(capsys, monkeypatch, broken, tmp_path):
    import shutil

    import mmaccel.apps.video as video

    parts = tmp_path / "run.mp4.parts"
    shutil.copytree(broken["parts"], parts)
    (parts / "pipe1of4_iter00002.pt").write_bytes(b"x")  # another mode and rank count
    (parts / "notes.txt").write_text("the user's file stays")

    def stop(*args, **kwargs):
        raise ValueError("stopped after the checks")

    monkeypatch.setattr(video, "_load", stop)
    argv = [*_VIDEO, _P, "a car", "--frames", "5", "--out", str(tmp_path / "run.mp4"), "--overwrite"]
    _assert_one_line(*_run(argv, capsys), "stopped after the checks")
    assert sorted(p.name for p in parts.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------
# Video time: a FLOP lower bound before any work, a measured step after it (#31)
# ------------------------------------------------------------------------------------------


def test_video_time_estimate_is_a_lower_bound_of_the_counted_flops():
    """The estimate of one transformer call never exceeds what the tiny Wan transformer really
    computes (its matmuls counted by torch's FlopCounterMode, plus its full self-attention), and
    is not vacuous (over half of it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmaccel.runtime.limits import estimate_video_time
    from mmaccel.testing import tiny_wan_pipeline

    tr = tiny_wan_pipeline().transformer
    cfg = tr.config
    latent = torch.randn(1, cfg.in_channels, 3, 8, 12)  # 9 frames of 64 x 96
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tr(hidden_states=latent, timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 32, cfg.text_dim),
           return_dict=False)  # fmt: skip
    hidden, tokens = cfg.num_attention_heads * cfg.attention_head_dim, 3 * 4 * 6
    attention = cfg.num_layers * tokens * 4 * hidden * (tokens + 32)  # QK^T and AV, self and cross
    true_flops = counter.get_total_flops() + attention
    estimate = estimate_video_time(9, 64, 96, dict(cfg), steps=1, guidance=False, text_tokens=32)
    assert 0.5 * true_flops < estimate.flops_per_step <= true_flops
    two = estimate_video_time(9, 64, 96, dict(cfg), steps=10, text_tokens=32, ranks=2)
    assert two.flops == 10 * estimate.flops_per_step  # CFG doubles, two ranks halve
    assert estimate_video_time(9, 64, 96, dict(cfg), steps=1, device="cuda").peak_flops == 5e15


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps must be an int >= 1, got 0"),
        ({"steps": 2.0}, TypeError, "steps must be an int"),
        ({"transformer_config": {"num_attention_heads": 2}}, ValueError, "lacks what the time estimate needs"),
    ],
)
def test_video_time_estimate_errors(kwargs, error, match):
    from mmaccel.runtime.limits import estimate_video_time
    from mmaccel.testing import TINY_WAN_TRANSFORMER

    args = {"frames": 5, "height": 64, "width": 96, "transformer_config": TINY_WAN_TRANSFORMER, "steps": 1} | kwargs
    with pytest.raises(error, match=match):
        estimate_video_time(**args)


def test_check_video_time_and_step_eta_refuse_over_the_limit():
    from mmaccel.runtime.limits import TimeEstimate, check_step_eta, check_video_time

    check_video_time(TimeEstimate(10**12, 60, 1e12, "1 CPU thread(s)"), 1)  # exactly 60 s: allowed
    with pytest.raises(ValueError, match=r"at least 2.0 min .* over the limit of 1 min; lower --steps.*--max-minutes"):
        check_video_time(TimeEstimate(2 * 10**12, 60, 1e12, "1 CPU thread(s)"), 1)
    assert check_step_eta(10.0, 10.0, 5, 1) == 50.0
    with pytest.raises(ValueError, match=r"a step takes 10.00 s, so the remaining 6 steps need about 60 s \(after "
                                         r"10 s so far\), over the limit of 1 min.*; kept"):  # fmt: skip
        check_step_eta(10.0, 10.0, 6, 1, hint="kept")


def test_limits_max_minutes_validates():
    from mmaccel.runtime.limits import MAX_MINUTES, Limits

    assert Limits().max_minutes == MAX_MINUTES == 1440
    with pytest.raises(ValueError, match="Limits.max_minutes must be in"):
        Limits(max_minutes=0)
    with pytest.raises(TypeError, match="Limits.max_minutes"):
        Limits(max_minutes="60")


_LONG = {"prompt": "a car", "num_frames": 5, "height": 32, "width": 48, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def tiny_wan():
    from mmaccel.testing import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_long_video_api_refuses_an_over_long_run_before_any_step(tiny_wan, monkeypatch):
    import mmaccel.parallel_video.generate as generate
    from mmaccel.parallel_video import LongVideoConfig, generate_long_video
    from mmaccel.runtime.limits import Limits

    def never(*args, **kwargs):
        raise AssertionError("the transformer ran before the time limit was checked")

    monkeypatch.setattr(generate, "apply_clip_parallel", never)
    monkeypatch.setattr(generate, "run_layer_pipeline", never)
    config = dict(_LONG, num_frames=2001, height=256, width=384, num_inference_steps=1000)
    for mode in ("clip", "pipeline"):
        with pytest.raises(ValueError, match=r"at least .* over the limit of 1 min.*Limits\(max_minutes=N\)"):
            generate_long_video(tiny_wan, LongVideoConfig(**config, mode=mode, limits=Limits(max_minutes=1)))


@pytest.mark.parametrize(
    ("mode", "unit", "kept"),
    [("clip", "step", ["clip0of1_step00001.pt", "clip0of1_step00002.pt"]),
     ("pipeline", "pipeline item", ["pipe0of1_iter00001.pt", "pipe0of1_iter00002.pt"])],
)  # fmt: skip
def test_long_video_step_eta_over_the_limit_stops_and_keeps_the_steps(tiny_wan, tmp_path, mode, unit, kept):
    """100,000 steps of the tiny model take over a minute at any speed (0.6 ms a step): the
    second measured span (clip: step; pipeline: checkpoint of the block schedule) stops the run
    in one line, the finished checkpoints kept."""
    from mmaccel.parallel_video import LongVideoConfig, generate_long_video
    from mmaccel.runtime.limits import Limits

    steps = 100_000
    config = dict(_LONG, num_inference_steps=steps, checkpoint_dir=str(tmp_path), mode=mode)
    with pytest.raises(ValueError) as exc:
        generate_long_video(tiny_wan, LongVideoConfig(**config, limits=Limits(max_steps=steps, max_minutes=1)))
    message = str(exc.value)
    assert "\n" not in message and f"the remaining {steps - 2:,} {unit}s need about" in message  # one block
    for needle in ("over the limit of 1 min", "--max-minutes", "Limits(max_minutes=N)", str(tmp_path), "--resume"):
        assert needle in message, needle
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_long_video_prints_the_eta_and_reports_it(tiny_wan, capsys, tmp_path):
    from mmaccel.parallel_video import LayerPipelineConfig, LongVideoConfig, generate_long_video

    out = generate_long_video(tiny_wan, LongVideoConfig(**_LONG, num_inference_steps=4))
    assert 0 < out.stats["step_s"] and out.stats["eta_s"] == pytest.approx(2 * out.stats["step_s"])
    assert re.search(r"a step takes [0-9.]+ s: about \d+ s for the remaining 2 step\(s\) \(limit 1,440 min\)",
                     capsys.readouterr().err)  # fmt: skip
    # pipeline mode (2 blocks of 2 latent frames, 4 steps: 8 items, 1 + 2 done at the second checkpoint)
    config = LongVideoConfig(**{**_LONG, "num_frames": 13}, num_inference_steps=4, mode="pipeline",
                             pipeline=LayerPipelineConfig(frames_per_block=2, num_cat=1), checkpoint_dir=str(tmp_path))  # fmt: skip
    out = generate_long_video(tiny_wan, config)
    assert out.stats["eta_s"] == pytest.approx(5 * out.stats["step_s"])
    assert "for the remaining 5 pipeline item(s)" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["clip", "pipeline"])
def test_long_video_api_refuses_earlier_checkpoints_without_resume_or_overwrite(tiny_wan, tmp_path, mode):
    """The Python API holds the CLI's rule: a fresh run over an earlier run's checkpoints is one
    ValueError naming resume=True and overwrite=True, nothing deleted; overwrite=True starts over
    (every checkpoint there deleted, other files kept) and resume=True continues."""
    from mmaccel.parallel_video import LongVideoConfig, generate_long_video

    config = dict(_LONG, num_inference_steps=2, checkpoint_dir=str(tmp_path), mode=mode, seed=3)
    first = generate_long_video(tiny_wan, LongVideoConfig(**config), progress=False)
    (tmp_path / "clip1of4_step00007.pt").write_bytes(b"x")  # another mode and rank count
    (tmp_path / "notes.txt").write_text("the user's file stays")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError) as exc:
        generate_long_video(tiny_wan, LongVideoConfig(**config), progress=False)
    message = str(exc.value)
    assert "\n" not in message and "checkpoint_dir" in message and str(tmp_path) in message
    assert "resume=True" in message and "overwrite=True" in message and "--resume" not in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing replaced
    resumed = generate_long_video(tiny_wan, LongVideoConfig(**config, resume=True), progress=False)
    assert resumed.stats["resumed_from_step"] > 0
    again = generate_long_video(tiny_wan, LongVideoConfig(**config, overwrite=True), progress=False)
    assert again.stats["resumed_from_step"] == 0
    np.testing.assert_array_equal(again.frames, first.frames)
    assert "clip1of4_step00007.pt" not in {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "notes.txt").is_file()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"resume": True, "overwrite": True, "checkpoint_dir": "x"}, ValueError, "exclude each other"),
        ({"overwrite": True}, ValueError, "overwrite=True needs checkpoint_dir"),
        ({"overwrite": 1, "checkpoint_dir": "x"}, TypeError, "overwrite must be a bool"),
        ({"resume": "yes", "checkpoint_dir": "x"}, TypeError, "resume must be a bool"),
    ],
)
def test_long_video_config_resume_overwrite_errors(kwargs, error, match):
    from mmaccel.parallel_video import LongVideoConfig

    with pytest.raises(error, match=match):
        LongVideoConfig(prompt="a car", **kwargs)


def test_demo_video_tab_checks_the_time_before_any_run(tmp_path, monkeypatch):
    import mmaccel.apps.demo_tabs as tabs
    from mmaccel.runtime.limits import Limits

    def never(*args, **kwargs):
        raise AssertionError("the video ran before the time limit was checked")

    monkeypatch.setattr(tabs, "warm_compare", never)
    import mmaccel.runtime.limits as limits

    models = tabs.DemoModels(video="tiny")
    # the demo's sliders keep the tiny model far under a minute, so the test lowers the peak
    # FLOP/s assumed: 8 runs x 33 frames x 50 steps are then refused from the lower bound alone
    monkeypatch.setitem(limits.PEAK_FLOPS, "cpu_fp32", 1e6)
    with pytest.raises(ValueError, match=r"over the limit of 1 min; lower steps or frames.*Limits\(max_minutes=N\)"):
        tabs.run_video_tab(models, "a car", tmp_path, frames=33, steps=50, limits=Limits(max_minutes=1))


def test_parallel_video_doc_knobs_table_lists_every_video_flag():
    """docs/parallel_video.md's knobs table names every `mmaccel video` option (the limits,
    --overwrite, --timeout and --nproc-per-node included)."""
    import argparse

    from mmaccel.apps.video import add_video_parser

    parser = add_video_parser(argparse.ArgumentParser().add_subparsers())
    flags = [f for a in parser._actions for f in a.option_strings if f.startswith("--") and f != "--help"]
    assert {"--max-steps", "--max-frames", "--max-minutes", "--overwrite", "--nproc-per-node", "--timeout"} <= set(flags)
    doc = (ROOT / "docs" / "parallel_video.md").read_text()
    table = doc[doc.index("### Knobs") :].split("\n\n")[1]
    assert [f for f in flags if f"`{f}`" not in table] == []


def test_video_eta_over_the_limit_on_two_ranks_is_one_line_exit_2_steps_kept(tmp_path):
    """Two ranks agree on the slowest measured step: both stop after it with exit 2, the line is
    printed once, and both ranks' checkpoints are kept for --resume."""
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "mmaccel.apps.cli", "video", "--nproc-per-node", "2", "--model", "tiny",
           "--prompt", "a car", "--frames", "9", "--steps", "100000", "--max-steps", "100000", "--max-minutes", "1",
           "--quiet", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_launch_env(), capture_output=True, text=True, timeout=300)
    _assert_one_line(proc.returncode, proc.stderr, "mmaccel video: error: a step takes",
                     "the remaining 99,998 steps", "--max-minutes", "v.mp4.parts", "--resume")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "v.mp4.parts").iterdir()) == [
        "clip0of2_step00001.pt", "clip0of2_step00002.pt", "clip1of2_step00001.pt", "clip1of2_step00002.pt"
    ]  # fmt: skip
    assert not out.exists()


def test_errors_doc_says_how_to_raise_every_limit():
    """docs/errors.md names every `Limits` field as the argument that raises it, and every
    `mmaccel video --max-*` flag."""
    from dataclasses import fields

    from mmaccel.runtime.limits import Limits

    doc = (ROOT / "docs" / "errors.md").read_text()
    assert [f.name for f in fields(Limits) if f"{f.name}=N" not in doc] == []
    assert [flag for flag in ("--max-steps", "--max-frames", "--max-minutes") if f"`{flag} N`" not in doc] == []
