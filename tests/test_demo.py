"""The demo's app functions (called directly) and the launched Gradio app (through gradio_client)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the demo needs the 'demo' extra (gradio)")

from mmaccel.apps.demo_tabs import (  # noqa: E402
    DemoModels,
    run_ar_tab,
    run_dit_tab,
    run_video_tab,
    run_vlm_tab,
    validate_image,
)
from mmaccel.testing import tiny_image  # noqa: E402


def _png_header(path, width: int, height: int):
    """A PNG declaring ``width x height`` with almost no pixel data (see tests/test_errors.py)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def models() -> DemoModels:
    return DemoModels(vlm="tiny", dit="tiny", video="tiny", ar="tiny")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return tiny_image(128, 128, seed=3)


def test_validate_image_limits():
    assert validate_image(np.zeros((32, 48, 3), np.uint8)).size == (48, 32)
    with pytest.raises(ValueError, match="upload an image"):
        validate_image(None)
    with pytest.raises(ValueError, match=r"sides must be in \[16, 4096\]"):
        validate_image(Image.new("RGB", (8, 64)))
    with pytest.raises(ValueError, match="sides must be"):
        validate_image(Image.new("L", (5000, 20)))
    with pytest.raises(ValueError, match="uint8"):
        validate_image(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="a/path.png"):
        validate_image("a/path.png")
    with pytest.raises(TypeError, match="PIL image"):
        validate_image(3)
    assert validate_image(Image.new("RGBA", (20, 20))).mode == "RGB"


def test_vlm_full_budget_is_dense(models, image):
    r = run_vlm_tab(models, image, "What is it?", budget=1.0, hired=True, vista=False, max_new_tokens=4)
    assert r.accelerated == r.dense
    before, after = r.stats["visual tokens (dense -> accelerated)"].split(" -> ")
    assert before == after and r.stats["answers agree"] is True
    assert np.array_equal(np.asarray(r.extras["overlay"]), np.asarray(image))  # nothing dropped


def test_vlm_budget_drops_tokens_and_draws_overlay(models, image):
    r = run_vlm_tab(models, image, "What is it?", budget=0.2, hired=True, vista=True, max_new_tokens=4)
    sel = r.extras["selection"]
    assert sel.tokens_after < sel.tokens_before
    overlay = np.asarray(r.extras["overlay"], np.int32)
    assert overlay.shape == np.asarray(image).shape
    darker = (overlay < np.asarray(image, np.int32)).any(-1).mean()
    base = sel.tokens_per_partition[0]
    dropped_base = 1 - sel.keep[:base].float().mean().item()
    assert darker == pytest.approx(dropped_base, abs=0.1)  # dropped patches are darkened
    assert "TTFT speed-up" in r.markdown()
    # the model is restored after the accelerated run
    assert not models.get("vlm").model._forward_hooks and models.get("vlm").handle is None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(question=" "), "type a question"),
        (dict(budget=0.0), r"budget must be in \[0.01, 1.0\]"),
        (dict(hired=False, vista=False), "turn on HiRED or VISTA"),
        (dict(max_new_tokens=1000), "max_new_tokens must be in"),
    ],
)
def test_vlm_user_errors(models, image, kwargs, error):
    args = dict(question="q", budget=0.2, hired=True, vista=False, max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=error):
        run_vlm_tab(models, image, **args)


def test_dit_full_density_is_dense_and_reduced_density_measured(models):
    exact = run_dit_tab(models, "dog", steps=2, keep_ratio=1.0, dense_from=1.0)
    assert np.array_equal(exact.dense, exact.accelerated)
    assert exact.stats["PSNR vs dense (dB)"] == "inf"
    r = run_dit_tab(models, "dog", steps=4, keep_ratio=0.25, dense_from=0.5)
    assert r.dense.shape == r.accelerated.shape == (64, 64, 3)
    assert float(r.stats["mean token ratio"]) < 1.0
    assert 10 < float(r.stats["PSNR vs dense (dB)"]) < float("inf")
    with pytest.raises(ValueError, match="unknown class"):
        run_dit_tab(models, "unicorn")
    with pytest.raises(ValueError, match="dense_from 0"):
        run_dit_tab(models, "dog", dense_from=0.0)


def test_video_writes_mp4s_only_into_out_dir(models, tmp_path):
    r = run_video_tab(models, "a car", tmp_path, frames=5, steps=2, top_p=0.5, dense_steps=0.5)
    assert {p.parent for p in (r.dense, r.accelerated)} == {tmp_path}
    assert all(p.suffix == ".mp4" and p.stat().st_size > 0 for p in (r.dense, r.accelerated))
    assert sorted(tmp_path.iterdir()) == sorted([r.dense, r.accelerated])
    assert 0 < float(r.stats["density of the sparse calls"]) < 1
    assert r.extras["dense_frames"].shape[0] == 5
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        run_video_tab(models, "a car", tmp_path, frames=6)
    with pytest.raises(ValueError, match=r"frames must be in \[1, 33\]"):
        run_video_tab(models, "a car", tmp_path, frames=65)
    with pytest.raises(ValueError, match="does not exist"):
        run_video_tab(models, "a car", tmp_path / "missing")


def test_ar_counts_forwards_and_animates_order(models, tmp_path):
    r = run_ar_tab(models, class_id=2, out_dir=tmp_path, grid=4)
    assert (r.extras["raster_forwards"], r.extras["nar_forwards"]) == (16, 7)
    assert r.dense.shape == r.accelerated.shape == (8, 8, 3)  # VQ downsamples by 2
    for key, frames in (("raster_gif", 16), ("nar_gif", 7)):
        with Image.open(r.extras[key]) as gif:
            assert gif.n_frames == frames
        assert r.extras[key].parent == tmp_path
    with pytest.raises(ValueError, match=r"class_id must be in \[0, 9\]"):
        run_ar_tab(models, class_id=10, out_dir=tmp_path)


def test_launched_server_through_gradio_client(models, tmp_path):
    from gradio_client import Client, handle_file

    from mmaccel.apps.demo import launch

    demo = launch(models, port=None, out_dir=tmp_path, block=False, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        endpoints = set(client.view_api(return_format="dict")["named_endpoints"])
        assert {"/vlm", "/dit", "/video", "/ar"} <= endpoints
        assert {"/vlm_realistic", "/dit_realistic", "/video_realistic", "/ar_realistic"} <= endpoints
        # the realistic-shape buttons check the tab's settings before building anything
        with pytest.raises(Exception, match=r"steps must be an integer in \[1, 50\], got 2.5"):
            client.predict(2.5, 0.5, 0.5, api_name="/dit_realistic")
        with pytest.raises(Exception, match=r"steps must be an integer in \[1, 50\], got 4.5"):
            client.predict(4.5, 0.9, 0.5, api_name="/video_realistic")
        with pytest.raises(Exception, match="turn on HiRED or VISTA"):
            client.predict(0.5, False, False, api_name="/vlm_realistic")
        path = tmp_path / "in.png"
        tiny_image(64, 128, seed=1).save(path)
        dense, fast, overlay, stats = client.predict(
            handle_file(str(path)), "What?", 0.3, True, False, 3, api_name="/vlm"
        )
        assert isinstance(dense, str) and isinstance(fast, str) and "visual tokens" in stats
        with Image.open(overlay) as img:
            assert img.size == (128, 64)
        *images, stats = client.predict(1, 4, 0, api_name="/ar")
        assert "16 / 7" in stats and len(images) == 4
        with Image.open(images[0]) as img:
            assert img.size == (256, 256)  # the 8 px sample, enlarged for display
        *images, stats = client.predict("dog", 2, 0.25, 0.8, 0, api_name="/dit")
        assert "PSNR vs dense" in stats and "warm-up excluded" in stats
        for path in images:
            with Image.open(path) as img:
                assert img.size == (256, 256)
        with pytest.raises(Exception, match="frames must be 1 \\+ 4k"):
            client.predict("a car", 6, 2, 0.9, 0.25, 0, api_name="/video")
        # issue #18 over HTTP: the upload's size is read from its header (the file holds no pixel
        # data, so decoding it first would fail differently), AR class 1.5 is refused, not truncated
        big = _png_header(tmp_path / "big.png", 12_000, 12_000)
        with pytest.raises(Exception, match="uploaded image is 12000x12000; each side must be at most 4096 px"):
            client.predict(handle_file(str(big)), "What?", 0.3, True, False, 3, api_name="/vlm")
        with pytest.raises(Exception, match=r"class_id must be an integer in \[0, 9\], got 1.5"):
            client.predict(1.5, 4, 0, api_name="/ar")
    finally:
        demo.close()
    # outputs of the app stay inside its output folder
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())


def test_dit_tab_loads_a_pixart_folder_and_takes_a_prompt(tmp_path):
    from mmaccel.testing import save_tiny

    folder = save_tiny("pixart", tmp_path / "pixart")
    pixart = DemoModels(dit=str(folder))
    exact = run_dit_tab(pixart, "a small cat", steps=2, keep_ratio=1.0, dense_from=1.0)
    assert exact.dense.shape == (64, 64, 3) and np.array_equal(exact.dense, exact.accelerated)
    r = run_dit_tab(pixart, "a small cat", steps=2, keep_ratio=0.25, dense_from=0.9)
    assert float(r.stats["mean token ratio"]) < 1.0
    with pytest.raises(ValueError, match="PixArt needs steps >= 2"):
        run_dit_tab(pixart, "a small cat", steps=1)
    with pytest.raises(FileNotFoundError, match="--dit-model"):
        DemoModels(dit=str(tmp_path / "missing")).get("dit")
    with pytest.raises(ValueError, match="--dit-model .* holds a WanPipeline; expected one of DiTPipeline"):
        DemoModels(dit=str(save_tiny("wan", tmp_path / "wan"))).get("dit")


@pytest.fixture(scope="module")
def zoo_models() -> DemoModels:
    return DemoModels()  # the default: the zoo's trained reference models


def test_zoo_models_drive_every_tab(zoo_models, tmp_path):
    from mmaccel.apps.zoo.shapes_data import SHAPES

    d = zoo_models.defaults()
    r = run_vlm_tab(zoo_models, d["vlm_image"], d["vlm_question"], budget=1.0, max_new_tokens=24)
    assert r.dense == r.accelerated
    assert any(shape in r.dense for shape in SHAPES), r.dense  # a trained captioner names shapes
    r = run_dit_tab(zoo_models, "three", steps=2, keep_ratio=1.0, dense_from=1.0)
    assert np.array_equal(r.dense, r.accelerated) and r.dense.shape[-1] == 3
    r = run_ar_tab(zoo_models, 3, tmp_path, grid=8)
    assert r.dense.shape == r.accelerated.shape == (32, 32, 3)
    assert r.extras["nar_forwards"] < r.extras["raster_forwards"]
    with pytest.raises(ValueError, match="grid must be 8"):
        run_ar_tab(zoo_models, 3, tmp_path, grid=6)
    r = run_video_tab(zoo_models, d["video_prompt"], tmp_path, frames=5, steps=2, top_p=1.0)
    assert r.extras["dense_frames"].shape[1:3] == zoo_models.video_shape()


# ------------------------------------------------------------------------------------------
# Issue #20: warm timings, measured defaults, realistic-shape figures
# ------------------------------------------------------------------------------------------


def test_warm_compare_warms_up_interleaves_and_patches_outside_the_timed_span():
    import time
    from contextlib import contextmanager

    from mmaccel.apps.demo_timing import warm_compare

    log, state = [], {"patched": False}

    @contextmanager
    def patch():
        state["patched"] = True
        time.sleep(0.03)  # a slow patch set-up: must not count against the accelerated path
        try:
            yield
        finally:
            state["patched"] = False

    def dense():
        log.append(("dense", state["patched"]))
        time.sleep(0.02)
        return "d"

    def fast():
        log.append(("accelerated", state["patched"]))
        time.sleep(0.004)
        return "a"

    timing, d, a = warm_compare(dense, fast, repeats=3, patch=patch)
    assert (d, a) == ("d", "a") and timing.repeats == 3
    # one warm-up call of each, then 3 rounds with the order rotated each round
    assert [name for name, _ in log] == ["dense", "accelerated"] + ["dense", "accelerated", "accelerated", "dense"] + [
        "dense", "accelerated"]  # fmt: skip
    assert all(patched == (name == "accelerated") for name, patched in log)
    assert timing.ratio > 2 and timing.ratio_min <= timing.ratio <= timing.ratio_max and not timing.overlaps
    rows = timing.rows()
    assert "warm-up excluded" in rows["timing"] and "median of 3 interleaved repeats" in rows["timing"]
    import torch

    assert rows["timing"].endswith(f"; torch threads: {torch.get_num_threads()}")


def test_interleaved_times_checks_its_arguments():
    from mmaccel.runtime.timing import interleaved_times, ratio_spread

    with pytest.raises(ValueError, match="baseline and at least one variant"):
        interleaved_times({"a": lambda: None}, repeats=1)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        interleaved_times({"a": lambda: None, "b": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match=r"around names \['c'\]"):
        interleaved_times({"a": lambda: None, "b": lambda: None}, repeats=1, around={"c": None})
    assert ratio_spread([2.0, 4.0, 3.0], [1.0, 1.0, 3.0]) == (2.0, 1.0, 4.0, True)
    assert ratio_spread([2.0, 2.0], [1.0, 1.0])[3] is False


def _timing(ratio, overlaps):
    from mmaccel.apps.demo_timing import WarmTiming

    return WarmTiming((1.0,) * 3, (1.0 / ratio,) * 3, ratio, ratio, ratio, overlaps)


def test_words_say_when_the_toy_model_is_too_small_for_a_gain():
    from mmaccel.apps.demo_realistic import LABEL, RealisticFigure
    from mmaccel.apps.demo_timing import gain_words

    assert "too small for a gain" in gain_words(_timing(0.97, True), "64 image tokens")
    assert "64 image tokens" in gain_words(_timing(0.97, True), "64 image tokens")
    assert "faster here" in gain_words(_timing(2.0, False), "x")
    assert "within noise" in gain_words(_timing(1.3, True), "x")  # overlapping times: no clear gain
    fig = RealisticFigure("a shape", _timing(1.6, False), "forward", whole_run=1.25, schedule="4 of 8 steps reduced")
    text = fig.markdown(toy_ratio=0.97)
    assert text.startswith(f"**{LABEL}: 1.25x** over the whole run (4 of 8 steps reduced)")
    assert "toy model is too small for a gain (0.97x)" in text and "1.60x" in text and "a shape" in text
    slow = RealisticFigure("s", _timing(0.7, False), "attention call").markdown(toy_ratio=0.9)
    assert f"**{LABEL}: 0.70x** per attention call" in slow and "no gain at this shape either" in slow


def test_word_agreement():
    from mmaccel.apps.demo_tabs import word_agreement

    assert word_agreement("one red circle", "one red circle") == 1.0
    assert word_agreement("one red circle", "two blue stars") == 0.0
    assert 0 < word_agreement("one red circle and one blue star", "one red circle and one blue square") < 1


def test_tab_results_show_warm_timings_and_the_setting(models, image, tmp_path):
    r = run_dit_tab(models, "dog", steps=2, keep_ratio=0.5, dense_from=0.5)
    assert "warm-up excluded" in r.markdown() and "speed-up (warm)" in r.stats
    assert r.stats["setting"] == "keep 0.5 of the 256 tokens until progress 0.5, dense after; 2 steps"
    assert r.extras["labels"] is None and "label unchanged" not in r.stats  # no classifier for random models
    assert r.extras["notes"] in r.markdown()
    r = run_video_tab(models, "a car", tmp_path, frames=5, steps=2, top_p=0.5, dense_steps=0.5)
    assert "PSNR vs dense (dB)" in r.stats and "warm-up excluded" in r.stats["timing"]
    assert r.stats["setting"].endswith("; 48 video tokens")  # 2 latent frames of 4 x 6
    r = run_ar_tab(models, class_id=2, out_dir=tmp_path, grid=4)
    assert "time raster / NAR (s, warm)" in r.stats and r.extras["timing"].repeats == 3
    r = run_vlm_tab(models, image, "What is it?", budget=0.3, max_new_tokens=2)
    assert r.stats["answer ends"].startswith("at max new tokens")  # random weights never stop early
    assert "TTFT speed-up (warm)" in r.stats and "word agreement (1 = same answer)" in r.stats


def test_zoo_defaults_keep_outputs_recognisable(zoo_models, tmp_path):
    from mmaccel.apps.demo_tabs import DIT_DEFAULTS, VLM_DEFAULTS

    d = zoo_models.defaults()
    r = run_dit_tab(zoo_models, d["dit_label"])  # the tab's defaults
    dense_label, fast_label = r.extras["labels"]
    assert dense_label == d["dit_label"]  # the trained model draws the requested digit...
    assert fast_label == dense_label and r.stats["label unchanged"] is True  # ...and so does the accelerated run
    assert r.stats["digit classifier label dense / accelerated"] == f"{dense_label} / {fast_label}"
    assert f"keep {DIT_DEFAULTS['keep_ratio']:g} of the 64 tokens" in r.stats["setting"]
    r = run_vlm_tab(zoo_models, d["vlm_image"], d["vlm_question"])
    assert r.stats["answer ends"] == "at the end-of-sequence token"  # not cut mid-sentence
    assert r.dense.endswith(".") and r.accelerated.endswith(".")
    assert r.stats["answers agree"] == (r.dense == r.accelerated)
    assert f"budget {VLM_DEFAULTS['budget']:g}" in r.stats["setting"]
    r = run_video_tab(zoo_models, d["video_prompt"], tmp_path)
    assert float(r.stats["PSNR vs dense (dB)"]) > 15


def test_realistic_figures_run_the_tab_settings_on_given_shapes():
    from mmaccel.apps.demo_realistic import (
        LABEL,
        realistic_ar,
        realistic_dit,
        realistic_video,
        realistic_vlm,
        step_progress,
    )
    from mmaccel.testing import tiny_dit_pipeline

    progress = step_progress(tiny_dit_pipeline().scheduler, 8)
    assert len(progress) == 8 and progress == sorted(progress) and 0 <= progress[0] < 0.2
    small = dict(num_attention_heads=2, attention_head_dim=16, sample_size=16)
    fig = realistic_dit(0.5, 0.5, progress, blocks=3, shape=small)
    reduced = sum(p < 0.5 for p in progress)
    assert fig.schedule == f"{reduced} of 8 steps reduced, the rest dense"
    expected = 8 / (reduced / fig.timing.ratio + 8 - reduced)
    assert fig.whole_run == pytest.approx(expected)
    assert "64 tokens, width 32" in fig.shape and "1 pooled, 1 sparse, 1 dense" in fig.shape
    assert fig.markdown().startswith(f"**{LABEL}: ")
    fig = realistic_video(0.9, 0.5, 4, grid=(2, 8, 8))
    assert fig.schedule == "attention only: 2 of 4 steps sparse" and "128 video tokens" in fig.shape
    fig = realistic_video(0.9, 0.5, 4, grid=(2, 8, 8), model="wan2.2-ti2v-5b")
    assert fig.shape.startswith("Wan2.2-TI2V-5B at 1280x704, 41 frames attention") and "of its 24 heads" in fig.shape
    fig = realistic_ar(grid=4, layers=1)
    assert "16 raster / 7 NAR" in fig.shape and fig.whole_run is None
    fig = realistic_vlm(0.2, True, False, vision_layers=2, width_scale=1 / 16)
    before, after = (int(n.replace(",", "")) for n in fig.shape.split(": ")[1].split(" visual")[0].split(" -> "))
    assert before > 2880 and 0.15 * before < after < 0.25 * before  # 5 partitions of 576 (+ newlines), 20% kept
