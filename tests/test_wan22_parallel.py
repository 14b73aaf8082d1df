"""Clip parallelism and the DualParal layer pipeline on a tiny Wan 2.2 A14B pipeline: both experts,
switched at ``boundary_ratio``; one process against the stock pipeline, and the ``mmaccel video``
CLI on 2 gloo ranks (torchrun) against the one-process results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmaccel.parallel_video import (
    ClipParallelConfig,
    LongVideoConfig,
    VideoGeometry,
    frame_noise,
    generate_long_video,
)
from mmaccel.parallel_video.layer_pipeline import LayerPipelineConfig
from mmaccel.runtime.checkpoint_io import load_verified
from mmaccel.testing import load_tiny, save_tiny, tiny_wan22_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red car on a street"
# 4 steps of UniPC: 999, 900 (transformer, t >= 875) then 750, 500 (transformer_2)
RUN = dict(prompt=PROMPT, num_frames=17, num_inference_steps=4, height=32, width=48, max_sequence_length=32, seed=3)
DENSE_CLIP = ClipParallelConfig(padding=2, global_frames=3, local_scope="window", end_keys="none",
                                global_sampling="uniform")  # fmt: skip
CLI = ["video", "--prompt", PROMPT, "--quiet", "--max-sequence-length", "32", "--frames", "17", "--steps", "4",
       "--height", "32", "--width", "48", "--seed", "3", "--decode-overlap", "all"]  # fmt: skip
DENSE_CLIP_ARGS = ["--padding", "2", "--global-frames", "3", "--local-scope", "window", "--end-keys", "none",
                   "--global-sampling", "uniform", "--phase-bias", "0"]  # fmt: skip
PIPELINE_ARGS = ["--frames-per-block", "2", "--num-cat", "1"]


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory) -> Path:
    return save_tiny("wan22", tmp_path_factory.mktemp("tiny_wan22"))


@pytest.fixture(scope="module")
def pipe(wan22_dir):
    return load_tiny("wan22", wan22_dir)


def _torchrun(args: list[str]) -> subprocess.Popen:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "mmaccel.apps.cli", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def cli_runs(wan22_dir, tmp_path_factory):
    """Both modes on 2 ranks, launched at once so the one-process tests below overlap them."""
    tmp = tmp_path_factory.mktemp("wan22_two_ranks")
    procs = {
        mode: _torchrun([*CLI, "--model", str(wan22_dir), "--mode", mode, "--out", str(tmp / f"{mode}.mp4"),
                         *(PIPELINE_ARGS if mode == "pipeline" else DENSE_CLIP_ARGS)])
        for mode in ("clip", "pipeline")
    }  # fmt: skip
    outs = {mode: proc.communicate(timeout=300) for mode, proc in procs.items()}
    return tmp, {mode: (procs[mode].returncode, outs[mode][0]) for mode in procs}


def test_folder_geometry_names_both_experts(wan22_dir, pipe):
    geometry = VideoGeometry.from_folder(wan22_dir)
    assert geometry.experts == ("transformer", "transformer_2") and geometry.boundary_ratio == 0.875
    assert VideoGeometry.of(pipe) == geometry
    assert "transformer (high noise, t >= 875)" in geometry.describe()
    one = VideoGeometry.from_folder(save_tiny("wan", wan22_dir.parent / "wan21"))
    assert one.experts == ("transformer",) and "one transformer" in one.describe()
    i2v = wan22_dir.parent / "wan22_i2v"
    tiny_wan22_pipeline(task="i2v").save_pretrained(i2v)
    with pytest.raises(ValueError, match="text-to-video WanPipeline folder, got a WanImageToVideoPipeline"):
        VideoGeometry.from_folder(i2v)


def test_one_rank_clip_mode_with_dense_options_is_the_stock_two_expert_pipeline(pipe, tmp_path):
    reference = _reference(pipe)
    config = LongVideoConfig(**RUN, clip=DENSE_CLIP, checkpoint_dir=str(tmp_path))
    out = generate_long_video(pipe, config, progress=False)
    torch.testing.assert_close(out.latents, reference, rtol=1e-5, atol=1e-5)
    assert out.stats["expert_calls"] == {"transformer": 2 * 2 * 4, "transformer_2": 2 * 2 * 4}  # steps x CFG x blocks
    # resume after step 2 (the last 3 checkpoints are kept): the remaining steps are the low-noise
    # expert's, as in the pipeline
    for step in (3, 4):
        (tmp_path / f"clip0of1_step{step:05d}.pt").unlink()
    resumed = generate_long_video(pipe, LongVideoConfig(**RUN, clip=DENSE_CLIP, checkpoint_dir=str(tmp_path),
                                                        resume=True), progress=False)  # fmt: skip
    assert resumed.stats["resumed_from_step"] == 2
    torch.testing.assert_close(resumed.latents, out.latents, rtol=1e-6, atol=1e-6)


def test_one_rank_pipeline_one_block_is_the_stock_two_expert_pipeline(pipe):
    reference = _reference(pipe)
    config = LongVideoConfig(**RUN, mode="pipeline", pipeline=LayerPipelineConfig(frames_per_block=5, num_cat=0))
    out = generate_long_video(pipe, config, progress=False)
    torch.testing.assert_close(out.latents, reference, rtol=1e-4, atol=1e-4)
    assert out.stats["expert_steps"] == {"transformer": 2, "transformer_2": 2}
    # one module under both names is refused
    experts = pipe.transformer_2
    pipe.transformer_2 = pipe.transformer
    try:
        with pytest.raises(ValueError, match="same module"):
            generate_long_video(pipe, config, progress=False)
    finally:
        pipe.transformer_2 = experts


def _reference(pipe) -> torch.Tensor:
    noise = frame_noise(RUN["seed"], range(5), (16, 4, 6))
    return pipe(prompt=PROMPT, negative_prompt="", height=32, width=48, num_frames=17, num_inference_steps=4,
                guidance_scale=5.0, max_sequence_length=32, latents=noise, output_type="latent").frames  # fmt: skip


def test_two_rank_cli_runs_both_experts_in_both_modes(pipe, cli_runs):
    tmp, results = cli_runs
    for mode, (rc, out) in results.items():
        assert rc == 0, out
        assert "model: Wan 2.2 experts: transformer (high noise, t >= 875) and transformer_2 (low noise)" in out
        assert "wrote" in out and "2 rank(s)" in out and (tmp / f"{mode}.mp4").is_file()
    # clip mode, clips [0, 3) and [3, 5) with options under which every query sees every frame
    # once and no bias: the stock two-expert pipeline
    parts = tmp / "clip.mp4.parts"
    clips = [load_verified(parts / f"clip{r}of2_step00004.pt")["latents"] for r in range(2)]
    torch.testing.assert_close(torch.cat(clips, dim=2), _reference(pipe), rtol=1e-4, atol=1e-4)
    # pipeline mode on 2 ranks (3 blocks, 4 steps: 6 iterations) = the same schedule in one process
    config = LongVideoConfig(**RUN, mode="pipeline", pipeline=LayerPipelineConfig(frames_per_block=2, num_cat=1))
    single = generate_long_video(pipe, config, progress=False)
    assert single.stats["expert_steps"] == {"transformer": 2, "transformer_2": 2}
    state = load_verified(tmp / "pipeline.mp4.parts" / "pipe0of2_iter00006.pt")["state"]
    parallel = torch.cat([state["latents"][b] for b in range(3)], dim=2)
    torch.testing.assert_close(parallel, single.latents, rtol=1e-5, atol=1e-5)


def test_ti2v_5b_one_rank_both_modes_are_the_stock_pipeline():
    """TI2V-5B (48 channels, 16x VAE, per-token timesteps in the stock pipeline): clip mode with
    dense options and one DualParal block give the stock pipeline's latents."""
    from mmaccel.testing import tiny_wan22_ti2v_pipeline

    ti2v = tiny_wan22_ti2v_pipeline()
    geometry = VideoGeometry.of(ti2v)
    assert geometry.spatial_stride == 16 and geometry.experts == ("transformer",)
    run = dict(RUN, height=64, width=96, num_inference_steps=3)
    noise = frame_noise(RUN["seed"], range(5), (48, 4, 6))
    reference = ti2v(prompt=PROMPT, negative_prompt="", height=64, width=96, num_frames=17, num_inference_steps=3,
                     guidance_scale=5.0, max_sequence_length=32, latents=noise, output_type="latent").frames  # fmt: skip
    clip = generate_long_video(ti2v, LongVideoConfig(**run, clip=DENSE_CLIP), progress=False)
    torch.testing.assert_close(clip.latents, reference, rtol=1e-5, atol=1e-5)
    one_block = LayerPipelineConfig(frames_per_block=5, num_cat=0)
    pipelined = generate_long_video(ti2v, LongVideoConfig(**run, mode="pipeline", pipeline=one_block), progress=False)
    torch.testing.assert_close(pipelined.latents, reference, rtol=1e-4, atol=1e-4)
