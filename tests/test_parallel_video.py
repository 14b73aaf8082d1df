"""parallel_video: clip parallelism with dual-scope attention on the tiny Wan pipeline.

* pure checks of the clip plan, the seed scheme and the configs;
* one process: ``generate_long_video`` equals the plain ``WanPipeline`` output exactly;
* two gloo ranks (``torchrun``, CPU): the final latents equal a single-process simulation of the
  same algorithm (the whole video through the plain pipeline, each query frame masked to its
  clip's local window plus the global frames, with the same phase bias); a rank killed mid-run
  ends the launch with a clear error in well under 60 s; ``--resume`` then writes a byte-identical
  MP4 and the same latents as the uninterrupted run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmaccel.apps.cli import main as cli_main
from mmaccel.parallel_video import (
    ClipParallelConfig,
    ClipPlan,
    LongVideoConfig,
    apply_clip_parallel,
    check_long_video,
    decode_clip,
    frame_noise,
    generate_long_video,
    latent_frame_count,
)
from mmaccel.parallel_video.layer_pipeline import LayerPipelineConfig, run_layer_pipeline
from mmaccel.runtime.distributed import init_distributed
from mmaccel.runtime.patching import PatchHandle
from mmaccel.testing import load_tiny, save_tiny

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red car on a street"
# 17 frames -> 5 latent frames; 2 ranks own [0, 3) and [3, 5); 32x48 px -> 2x3 tokens per frame
RUN = dict(frames=17, steps=3, height=32, width=48, padding=1, global_frames=2, phase_bias=10.0, seed=3)
CLI_ARGS = [
    "video", "--prompt", PROMPT, "--quiet", "--max-sequence-length", "32",
    "--frames", str(RUN["frames"]), "--steps", str(RUN["steps"]), "--height", str(RUN["height"]),
    "--width", str(RUN["width"]), "--padding", str(RUN["padding"]), "--global-frames", str(RUN["global_frames"]),
    "--phase-bias", str(RUN["phase_bias"]), "--seed", str(RUN["seed"]), "--decode-overlap", "all",
]  # fmt: skip
PIPELINE = dict(frames_per_block=1, num_cat=1)
PIPELINE_STEPS = 8  # 5 blocks x 8 steps: up to 5 blocks in flight, 40 work items
FULL_DRIVER = textwrap.dedent(
    f"""
    import sys, torch
    from mmaccel.testing import load_tiny
    from mmaccel.parallel_video import LongVideoConfig, generate_long_video
    from mmaccel.apps.cli import main
    from mmaccel.parallel_video.layer_pipeline import LayerPipelineConfig, run_layer_pipeline
    from mmaccel.runtime.distributed import init_distributed

    # the 2-rank layer pipeline first, then (same process group) the uninterrupted clip-mode CLI run
    ctx = init_distributed(timeout_s=60)
    with ctx.guard():
        config = LongVideoConfig(
            prompt={PROMPT!r}, num_frames={RUN["frames"]}, num_inference_steps={PIPELINE_STEPS},
            height={RUN["height"]}, width={RUN["width"]}, max_sequence_length=32, seed={RUN["seed"]},
            mode="pipeline", pipeline=LayerPipelineConfig(**{PIPELINE!r}),
        )
        out = generate_long_video(load_tiny("wan", sys.argv[1]), config, ctx, progress=False)
        if ctx.is_main:
            torch.save(out.latents, sys.argv[2])
    sys.exit(main(sys.argv[3:]))
    """
)
KILL_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    import mmaccel.parallel_video.checkpoint as checkpoint
    save_step = checkpoint.save_step

    def dying_save_step(directory, rank, world_size, step, *args, **kwargs):
        path = save_step(directory, rank, world_size, step, *args, **kwargs)
        if rank == 1 and step == 2:
            with open(os.environ["DEATH_FILE"], "w") as f:
                f.write(repr(time.time()))
            os._exit(9)  # rank 1 dies abruptly after checkpointing step 2 of 3
        return path

    checkpoint.save_step = dying_save_step
    from mmaccel.apps.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny Wan pipeline saved once; every process loads it with ``from_pretrained``."""
    return save_tiny("wan", tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load_tiny("wan", tiny_dir)


# ---------------------------------------------------------------- pure checks


def test_plan_balances_clips_and_dedupes_globals():
    plan = ClipPlan.build(num_frames=10, world_size=3, padding=2, global_frames=4)
    assert plan.clips == ((0, 4), (4, 7), (7, 10))
    assert plan.global_indices == (0, 3, 6, 9)
    assert [plan.window(r) for r in range(3)] == [(0, 6), (2, 9), (5, 10)]
    assert plan.owned_globals(1) == (6,)
    assert (
        plan.extra_globals(0) == (6, 9)
        and plan.extra_globals(1) == (0, 9)
        and plan.extra_globals(2) == (0, 3)
    )
    single = ClipPlan.build(num_frames=5, world_size=1, padding=3, global_frames=5)
    assert single.window(0) == (0, 5) and single.extra_globals(0) == ()


@pytest.mark.parametrize(
    ("frames", "ranks", "padding", "globals_", "match"),
    [
        (3, 4, 1, 0, "more ranks"),
        (5, 2, 3, 0, "padding=3 is larger than the shortest clip"),
        (5, 2, 1, 6, "global_frames=6"),
    ],
)
def test_plan_rejects_impossible_splits(frames, ranks, padding, globals_, match):
    with pytest.raises(ValueError, match=match):
        ClipPlan.build(frames, ranks, padding, globals_)


def test_frame_count_must_match_temporal_stride():
    assert latent_frame_count(17, 4) == 5
    with pytest.raises(ValueError, match="use 13 or 17"):
        latent_frame_count(16, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(padding=-1), ValueError, "padding"),
        (dict(global_frames=1.5), TypeError, "global_frames"),
        (dict(phase_bias=-1.0), ValueError, "phase_bias"),
        (dict(phase_boundary=1200.0), ValueError, "phase_boundary"),
    ],
)
def test_clip_config_validates(kwargs, error, match):
    with pytest.raises(error, match=match):
        ClipParallelConfig(**kwargs)


def test_long_video_config_validates():
    with pytest.raises(ValueError, match="mode must be one of"):
        LongVideoConfig(prompt=PROMPT, mode="ring")
    with pytest.raises(ValueError, match="mode='clip' only"):
        LongVideoConfig(prompt=PROMPT, mode="pipeline", checkpoint_dir="x")
    with pytest.raises(ValueError, match="num_inference_steps"):
        LongVideoConfig(prompt=PROMPT, num_inference_steps=0)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        LongVideoConfig(prompt=PROMPT, resume=True)


def test_noise_depends_only_on_seed_and_frame():
    whole = frame_noise(7, range(5), (4, 2, 3))
    split = torch.cat([frame_noise(7, range(3), (4, 2, 3)), frame_noise(7, range(3, 5), (4, 2, 3))], dim=2)
    assert whole.shape == (1, 4, 5, 2, 3) and torch.equal(whole, split)
    assert not torch.equal(whole, frame_noise(8, range(5), (4, 2, 3)))
    assert not torch.equal(whole[:, :, 0], whole[:, :, 1])


def test_bad_inputs_are_clear_errors(pipe, capsys):
    config = LongVideoConfig(prompt=PROMPT, num_frames=16, height=32, width=48, max_sequence_length=32)
    with pytest.raises(ValueError, match="frames - 1 must be divisible"):
        check_long_video(pipe, config, 1)
    config = LongVideoConfig(prompt=PROMPT, num_frames=17, height=32, width=48, max_sequence_length=32)
    with pytest.raises(ValueError, match="more ranks"):
        check_long_video(pipe, config, 6)
    wide = LongVideoConfig(
        prompt=PROMPT, num_frames=17, height=32, width=48, clip=ClipParallelConfig(padding=3)
    )
    with pytest.raises(ValueError, match="padding=3"):
        check_long_video(pipe, wide, 2)
    with pytest.raises(ValueError, match="width must be a multiple of 16"):
        check_long_video(pipe, LongVideoConfig(prompt=PROMPT, num_frames=17, height=32, width=40), 1)
    assert cli_main([*CLI_ARGS, "--model", "tiny", "--mode", "pipeline", "--resume"]) == 2
    assert "--mode clip only" in capsys.readouterr().err
    blocks = LongVideoConfig(prompt=PROMPT, num_frames=17, height=32, width=48, mode="pipeline")
    with pytest.raises(ValueError, match="frames_per_block=2 must divide the video's 5 latent frames"):
        check_long_video(pipe, blocks, 1)
    with pytest.raises(ValueError, match="more ranks"):
        check_long_video(pipe, LongVideoConfig(**{**blocks.__dict__, "num_frames": 21}), 5)


def test_cli_maps_arguments_to_config():
    import argparse

    from mmaccel.apps.video import _config, add_video_parser

    parser = argparse.ArgumentParser()
    add_video_parser(parser.add_subparsers())
    args = parser.parse_args([*CLI_ARGS, "--mode", "pipeline", "--frames-per-block", "5", "--num-cat", "0"])
    config = _config(args)
    assert config.mode == "pipeline" and config.checkpoint_dir is None and config.decode_overlap is None
    assert (config.pipeline.frames_per_block, config.pipeline.num_cat) == (5, 0)
    assert (config.clip.padding, config.clip.global_frames, config.clip.phase_bias) == (1, 2, 10.0)
    clip = _config(parser.parse_args([*CLI_ARGS, "--out", "x/v.mp4"]))
    assert clip.checkpoint_dir == str(Path("x/v.mp4.parts")) and clip.num_frames == 17


# ---------------------------------------------------------------- one process


def test_one_rank_equals_plain_pipeline(pipe, tmp_path):
    """A clip covering the whole video (with padding, globals and phase bias set) is the dense run."""
    noise = frame_noise(RUN["seed"], range(3), (16, 4, 6))
    reference = pipe(
        prompt=PROMPT, negative_prompt="", height=32, width=48, num_frames=9, num_inference_steps=2,
        guidance_scale=5.0, max_sequence_length=32, latents=noise, output_type="np",
    ).frames[0]  # fmt: skip
    processors = [block.attn1.processor for block in pipe.transformer.blocks]
    config = LongVideoConfig(
        prompt=PROMPT, num_frames=9, num_inference_steps=2, height=32, width=48, max_sequence_length=32,
        seed=RUN["seed"], clip=ClipParallelConfig(padding=2, global_frames=3, phase_bias=10.0),
        checkpoint_dir=str(tmp_path),
    )  # fmt: skip
    out = generate_long_video(pipe, config, progress=False)
    assert out.frames.shape == (9, 32, 48, 3)
    np.testing.assert_array_equal(out.frames, reference)
    assert out.stats["attention_calls"] == 2 * 2 * len(pipe.transformer.blocks)  # steps x CFG x layers
    assert [block.attn1.processor for block in pipe.transformer.blocks] == processors  # handle removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip0of1_step00001.pt", "clip0of1_step00002.pt"]


def test_clipwise_decode_with_all_preceding_frames_is_exact(pipe):
    latents = frame_noise(1, range(4), (16, 2, 3)) * 0.5
    whole = decode_clip(pipe, latents, None)
    parts = [
        decode_clip(pipe, latents[:, :, :2], None),
        decode_clip(pipe, latents[:, :, 2:], latents[:, :, :2]),
    ]
    assert [p.shape[0] for p in parts] == [5, 8]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_processor_rejects_wrong_clip(pipe):
    ctx = init_distributed()
    with apply_clip_parallel(pipe.transformer, ClipParallelConfig(), ctx, num_latent_frames=4):
        with pytest.raises(ValueError, match=r"owns latent frames \[0, 4\)"):
            pipe.transformer(torch.zeros(1, 16, 3, 4, 6), torch.tensor([500.0]), torch.zeros(1, 8, 32))
        with pytest.raises(ValueError, match="already applied"):
            apply_clip_parallel(pipe.transformer, ClipParallelConfig(), ctx, num_latent_frames=4)


# ---------------------------------------------------------------- single-process simulation


class _MaskedDualScope:
    """Reference: dense attention over the whole video, each query frame masked to its clip's
    local window and the global frames, with the phase bias added to one scope."""

    def __init__(self, plan: ClipPlan, config: ClipParallelConfig, timestep: list[float]) -> None:
        self.plan, self.config, self.timestep = plan, config, timestep

    def frame_mask(self) -> torch.Tensor:
        n, bias = self.plan.num_frames, self.config.phase_bias
        to_global = self.timestep[0] >= self.config.phase_boundary
        mask = torch.full((n, n), float("-inf"))
        for rank, (start, end) in enumerate(self.plan.clips):
            lo, hi = self.plan.window(rank)
            for key in self.plan.global_indices:
                mask[start:end, key] = bias if to_global else 0.0
            mask[start:end, lo:hi] = 0.0 if to_global else bias
        return mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from mmaccel.runtime.adapters.wan import apply_rotary as apply_wan_rotary

        def heads(x):
            return x.unflatten(2, (attn.heads, -1))

        q = apply_wan_rotary(heads(attn.norm_q(attn.to_q(hidden_states))), *rotary_emb)
        k = apply_wan_rotary(heads(attn.norm_k(attn.to_k(hidden_states))), *rotary_emb)
        v = heads(attn.to_v(hidden_states))
        per_frame = hidden_states.shape[1] // self.plan.num_frames
        mask = self.frame_mask().repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask)
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))


def _simulate(pipe, world_size: int) -> torch.Tensor:
    config = ClipParallelConfig(
        padding=RUN["padding"], global_frames=RUN["global_frames"], phase_bias=RUN["phase_bias"]
    )
    plan = ClipPlan.build(5, world_size, config.padding, config.global_frames)
    timestep: list[float] = [0.0]
    handle = PatchHandle(pipe.transformer, "test_simulation")
    handle.add_torch_hook(
        pipe.transformer.register_forward_pre_hook(
            lambda m, a, kw: timestep.__setitem__(0, float(kw["timestep"][0])), with_kwargs=True
        )
    )
    for block in pipe.transformer.blocks:
        handle.set_processor(block.attn1, _MaskedDualScope(plan, config, timestep))
    with handle:
        return pipe(
            prompt=PROMPT, negative_prompt="", height=RUN["height"], width=RUN["width"], num_frames=RUN["frames"],
            num_inference_steps=RUN["steps"], guidance_scale=5.0, max_sequence_length=32, output_type="latent",
            latents=frame_noise(RUN["seed"], range(5), (16, 4, 6)),
        ).frames  # fmt: skip


# ---------------------------------------------------------------- two ranks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(entry: list[str], args: list[str], **extra_env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *entry, *args]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "GLOO_SOCKET_IFNAME": "lo",
        **extra_env,
    }
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, float]:
    began = time.monotonic()
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, time.monotonic() - began


def _final_latents(parts: Path, steps: int) -> torch.Tensor:
    clips = [
        torch.load(parts / f"clip{r}of2_step{steps:05d}.pt", weights_only=True)["latents"] for r in range(2)
    ]
    return torch.cat(clips, dim=2)


@pytest.fixture(scope="module", autouse=True)
def _two_rank_launches(tmp_path_factory, tiny_dir):
    """Start the 2-rank launches when the module starts, so the in-process tests overlap them:
    the layer pipeline + an uninterrupted clip-mode CLI run (one launch), and, concurrently, a
    clip-mode CLI run whose rank 1 dies after step 2."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    (tmp / "full_driver.py").write_text(FULL_DRIVER)
    (tmp / "kill_driver.py").write_text(KILL_DRIVER)
    args = [*CLI_ARGS, "--model", str(tiny_dir)]
    full_args = [str(tiny_dir), str(tmp / "pipeline.pt"), *args, "--out", str(tmp / "full.mp4")]
    kill_args = [*args, "--out", str(tmp / "resumed.mp4")]
    procs = {
        "full": _torchrun([str(tmp / "full_driver.py")], full_args),
        "killed": _torchrun([str(tmp / "kill_driver.py")], kill_args, DEATH_FILE=str(tmp / "death")),
    }
    yield tmp, args, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def two_rank_runs(_two_rank_launches):
    """Results of the launches above, then the resume of the killed run."""
    tmp, args, procs = _two_rank_launches
    killed_rc, killed_out, _ = _finish(procs["killed"])
    ended = time.time()
    died = float((tmp / "death").read_text()) if (tmp / "death").exists() else float("nan")
    full_result = _finish(procs["full"])
    resumed = _finish(
        _torchrun(["-m", "mmaccel.apps.cli"], [*args, "--out", str(tmp / "resumed.mp4"), "--resume"])
    )
    return tmp, full_result, (killed_rc, killed_out, ended - died), resumed


def test_two_ranks_equal_single_process_simulation(pipe, two_rank_runs):
    tmp, (rc, out, _), _, _ = two_rank_runs
    assert rc == 0, out
    assert "wrote" in out and "2 rank(s)" in out
    parallel = _final_latents(tmp / "full.mp4.parts", RUN["steps"])
    simulated = _simulate(pipe, world_size=2)
    torch.testing.assert_close(parallel, simulated, rtol=1e-4, atol=1e-4)
    # the algorithm is not the dense model: the same simulation with one clip differs
    assert (parallel - _simulate(pipe, world_size=1)).abs().max() > 1e-3
    frames = iio.imread(tmp / "full.mp4")
    assert frames.shape == (RUN["frames"], RUN["height"], RUN["width"], 3)


def test_killed_rank_fails_fast_and_resume_is_identical(two_rank_runs):
    tmp, (full_rc, _, _), (killed_rc, killed_out, killed_s), (rc, out, _) = two_rank_runs
    assert killed_rc != 0
    assert killed_s < 60  # from rank 1's death to the launcher's exit
    assert re.search(r"exitcode\s*:\s*9", killed_out)  # torchrun names the dead rank and its exit code
    assert not (tmp / "resumed.mp4").exists() or rc == 0
    assert full_rc == 0 and rc == 0, out
    assert "resumed from step 2" in out
    assert (tmp / "resumed.mp4").read_bytes() == (tmp / "full.mp4").read_bytes()
    assert torch.equal(
        _final_latents(tmp / "resumed.mp4.parts", 3), _final_latents(tmp / "full.mp4.parts", 3)
    )
    assert not list(tmp.glob(".*.tmp*"))  # the MP4 was written through a temporary file, then renamed


# ---------------------------------------------------------------- DualParal layer pipeline


def _pipeline_latents(pipe, frames_per_block: int, num_cat: int, steps: int = RUN["steps"]) -> torch.Tensor:
    """The layer pipeline in this process (world size 1): the single-process block-wise schedule."""
    cond, uncond = pipe.encode_prompt(PROMPT, "", max_sequence_length=32)
    latents, stats = run_layer_pipeline(
        pipe, init_distributed(), LayerPipelineConfig(frames_per_block, num_cat), text=torch.cat([cond, uncond]),
        guidance_scale=5.0, num_latent_frames=5, latent_hw=(4, 6), steps=steps, seed=RUN["seed"],
        progress=False,
    )  # fmt: skip
    assert stats["items"] == (5 // frames_per_block) * steps
    return latents


def test_pipeline_one_block_without_cache_equals_plain_pipeline(pipe):
    """One block holding the whole video, no feature cache: the plain pipeline (CFG batched, so allclose)."""
    reference = pipe(
        prompt=PROMPT, negative_prompt="", height=RUN["height"], width=RUN["width"], num_frames=RUN["frames"],
        num_inference_steps=RUN["steps"], guidance_scale=5.0, max_sequence_length=32, output_type="latent",
        latents=frame_noise(RUN["seed"], range(5), (16, 4, 6)),
    ).frames  # fmt: skip
    torch.testing.assert_close(_pipeline_latents(pipe, 5, 0), reference, rtol=1e-4, atol=1e-4)


def test_two_rank_pipeline_equals_single_process_schedule(pipe, two_rank_runs):
    tmp, (rc, out, _), *_ = two_rank_runs
    assert rc == 0, out
    parallel = torch.load(tmp / "pipeline.pt", weights_only=True)
    single = _pipeline_latents(pipe, PIPELINE["frames_per_block"], PIPELINE["num_cat"], PIPELINE_STEPS)
    torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-5)
    # the feature cache matters: without it the blocks are denoised independently
    isolated = _pipeline_latents(pipe, PIPELINE["frames_per_block"], 0, PIPELINE_STEPS)
    assert (isolated - single).abs().max() > 1e-3
