"""parallel_video: clip parallelism with dual-scope attention on the tiny Wan pipeline.

* pure checks of the clip plan, the seed scheme and the configs;
* one process: ``generate_long_video`` equals the plain ``WanPipeline`` output exactly;
* two gloo ranks (``torchrun``, CPU): the final latents equal a single-process simulation of the
  same algorithm (the whole video through the plain pipeline, each query frame attending to the
  key frames the plan gives it: its band, zero K/V frames at the video ends, the global frames
  with duplicates, with the same phase bias); a rank killed mid-run
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
from mmaccel.parallel_video.layer_pipeline import (
    LayerPipelineConfig,
    LayerStage,
    block_sizes,
    context_frames,
    run_layer_pipeline,
)
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
PIPELINE_ITERATIONS = 5 + PIPELINE_STEPS - 1
# the CLI run with FULL_DRIVER's first layer-pipeline config (its video is written there too)
PIPELINE_CLI_ARGS = [
    "video", "--prompt", PROMPT, "--quiet", "--max-sequence-length", "32", "--frames", str(RUN["frames"]),
    "--steps", str(PIPELINE_STEPS), "--height", str(RUN["height"]), "--width", str(RUN["width"]),
    "--seed", str(RUN["seed"]), "--mode", "pipeline", "--frames-per-block", str(PIPELINE["frames_per_block"]),
    "--num-cat", str(PIPELINE["num_cat"]),
]  # fmt: skip
FULL_DRIVER = textwrap.dedent(
    f"""
    import sys, torch
    from mmaccel.testing import load_tiny
    from mmaccel.parallel_video import LongVideoConfig, generate_long_video
    from mmaccel.apps.cli import main
    from mmaccel.apps.video import write_video
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
        pipe = load_tiny("wan", sys.argv[1])
        out = generate_long_video(pipe, config, ctx, progress=False)
        if ctx.is_main:
            torch.save(out.latents, sys.argv[2])
            write_video(out.frames, sys.argv[2] + ".mp4", 16)  # the uninterrupted run of PIPELINE_CLI_ARGS
        lagged = LongVideoConfig(**{{**config.__dict__, "pipeline": LayerPipelineConfig(**{PIPELINE!r}, tail_lag=1)}})
        out = generate_long_video(pipe, lagged, ctx, progress=False)
        if ctx.is_main:
            torch.save(out.latents, sys.argv[2] + ".lag1")
        # both modes with their defaults at Wan-style lengths (9 and 21 latent frames), 2 steps
        for frames in (33, 81):
            for mode in ("clip", "pipeline"):
                config = LongVideoConfig(
                    prompt={PROMPT!r}, num_frames=frames, num_inference_steps=2, height=32, width=48,
                    max_sequence_length=32, seed={RUN["seed"]}, mode=mode,
                )
                out = generate_long_video(pipe, config, ctx, progress=False)
                if ctx.is_main:
                    torch.save((tuple(out.frames.shape), out.latents), sys.argv[2] + f".{{mode}}{{frames}}")
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

PIPELINE_KILL_DRIVER = textwrap.dedent(
    """
    import os, sys
    import mmaccel.parallel_video.checkpoint as checkpoint
    save_iteration = checkpoint.save_iteration

    def dying_save_iteration(directory, rank, world_size, iteration, *args, **kwargs):
        path = save_iteration(directory, rank, world_size, iteration, *args, **kwargs)
        if rank == 1 and iteration == int(os.environ["DIE_AFTER"]):
            os._exit(9)  # the last stage dies abruptly after checkpointing this iteration
        return path

    checkpoint.save_iteration = dying_save_iteration
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
    """Our options: whole-clip window, no keys at the ends, uniform deduplicated global frames."""
    options = dict(local_scope="window", end_keys="none", global_sampling="uniform")
    plan = ClipPlan.build(num_frames=10, world_size=3, padding=2, global_frames=4, **options)
    assert plan.clips == ((0, 4), (4, 7), (7, 10))
    assert plan.global_indices == (0, 3, 6, 9)
    assert [plan.window(r) for r in range(3)] == [(0, 6), (2, 9), (5, 10)]
    assert plan.owned_globals(1) == (6,)
    assert (
        plan.extra_globals(0) == (6, 9)
        and plan.extra_globals(1) == (0, 9)
        and plan.extra_globals(2) == (0, 3)
    )
    single = ClipPlan.build(num_frames=5, world_size=1, padding=3, global_frames=5, **options)
    assert single.window(0) == (0, 5) and single.extra_globals(0) == ()


def test_reference_local_band_per_query_frame():
    """Video-Infinity's mask: query frame i sees padded keys i .. i + 2p, i.e. frames i - p .. i + p,
    with p zero frames at each video end and the neighbours' halos in between."""
    plan = ClipPlan.build(num_frames=8, world_size=2, padding=1, global_frames=0)
    assert plan.clips == ((0, 4), (4, 8))
    assert plan.local_keys(0) == (-1, 0, 1, 2, 3, 4) and plan.local_keys(1) == (3, 4, 5, 6, 7, 8)
    for rank in range(2):
        expected = torch.zeros(4, 6, dtype=torch.bool)
        for i in range(4):  # the reference loop: everything outside [i, i + 2p] is -inf
            expected[i, i : i + 3] = True
        assert torch.equal(plan.local_mask(rank), expected)
    assert plan.visible_frames(0) == [-1, 0, 1]  # a zero frame at the start takes softmax weight
    assert plan.visible_frames(3) == [2, 3, 4]  # across the clip boundary through the halo
    assert plan.visible_frames(7) == [6, 7, 8]
    wide = ClipPlan.build(num_frames=12, world_size=2, padding=2, global_frames=0)
    assert wide.visible_frames(5) == [3, 4, 5, 6, 7] and len(wide.visible_frames(0)) == 5
    # options: the whole clip + halos, and no keys at the video ends
    window = ClipPlan.build(8, 2, 1, 0, local_scope="window", end_keys="none")
    assert window.visible_frames(0) == [0, 1, 2, 3, 4] and window.visible_frames(7) == [3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    ("frames", "ranks", "top_k", "expected"),
    [
        (48, 2, 16, tuple(range(0, 48, 3))),  # the shipped config: 24 frames per GPU, top_k 16, stride 3
        (10, 3, 4, (0, 4, 7)),  # share 1 per clip: each clip's first frame
        (10, 2, 4, (0, 2, 4, 5)),  # clips of 5, share 2, stride 2: (0, 2, 4) + (5, 7, 9) cut to 4
        (8, 4, 2, (0, 2)),  # top_k < ranks: frame 0 of every clip, the first 2 kept
        (6, 2, 0, ()),
    ],
)
def test_reference_global_frames_per_clip_stride(frames, ranks, top_k, expected):
    plan = ClipPlan.build(frames, ranks, 1, top_k)
    assert plan.global_indices == expected
    # every query sees every global frame, even one already in its band (a duplicate key)
    assert plan.global_keys(ranks - 1) == expected


def test_dualparal_context_frames():
    """DualParal: block b's input starts with block b-1's last num_cat latents, and its queries also
    see the cached K/V of block b+1's first num_cat frames (Num_C = 2 num_cat)."""
    config = LayerPipelineConfig(frames_per_block=4, num_cat=2)
    sizes = block_sizes(12, 4)
    assert sizes == (4, 4, 4)
    assert context_frames(sizes, config, 0) == {"input": (), "cached_kv": (4, 5)}
    assert context_frames(sizes, config, 1) == {"input": (2, 3), "cached_kv": (8, 9)}
    assert context_frames(sizes, config, 2) == {"input": (6, 7), "cached_kv": ()}
    prev = LayerPipelineConfig(frames_per_block=4, num_cat=2, context="prev_kv")
    assert context_frames(sizes, prev, 1) == {"input": (), "cached_kv": (2, 3)}
    # every frame count works: balanced blocks of at most frames_per_block, context capped by a short block
    assert block_sizes(21, 10) == (7, 7, 7) and block_sizes(9, 10) == (9,) and block_sizes(5, 2) == (2, 2, 1)
    short = LayerPipelineConfig(frames_per_block=3, num_cat=3)
    assert context_frames((3, 1), short, 0)["cached_kv"] == (3,)
    assert (LayerPipelineConfig().frames_per_block, LayerPipelineConfig().num_cat) == (10, 5)


def test_layer_stage_chain_equals_transformer_forward(pipe):
    """Two stages over all blocks (embed, blocks 0-1, blocks 2-3, head) are the transformer's forward."""
    tr = pipe.transformer
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 3, 4, 6, generator=generator)
    text = torch.randn(2, 8, tr.config.text_dim, generator=generator)
    timestep = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        reference = tr(latents, timestep, text, return_dict=False)[0]
        stages = [LayerStage(tr, 0, 2), LayerStage(tr, 2, 4)]
        cond = stages[0].conditions(timestep, text)
        rotary = stages[0].rotary(latents.shape, 0)
        hidden = stages[0].embed(latents)
        for stage in stages:
            hidden = stage(hidden, cond, rotary)
        out = stages[-1].head(hidden, cond, latents.shape)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="lo < hi"):
        LayerStage(tr, 2, 2)


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
        ClipPlan.build(frames, ranks, padding, globals_, global_sampling="uniform")


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
    assert LongVideoConfig(prompt=PROMPT, mode="pipeline", checkpoint_dir="x", resume=True).resume  # both modes resume
    with pytest.raises(ValueError, match="checkpoint_every"):
        LongVideoConfig(prompt=PROMPT, mode="pipeline", checkpoint_dir="x", checkpoint_every=0)
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
    assert cli_main([*CLI_ARGS, "--model", "tiny", "--mode", "pipeline", "--checkpoint-every", "0"]) == 2
    assert "checkpoint_every must be an int >= 1" in capsys.readouterr().err
    blocks = LongVideoConfig(prompt=PROMPT, num_frames=17, height=32, width=48, mode="pipeline")
    for frames in (17, 33, 81, 85):  # every valid frame count works with the pipeline's defaults
        check_long_video(pipe, LongVideoConfig(**{**blocks.__dict__, "num_frames": frames}), 2)
    with pytest.raises(ValueError, match="more ranks"):
        check_long_video(pipe, LongVideoConfig(**{**blocks.__dict__, "num_frames": 21}), 5)


def test_cli_maps_arguments_to_config():
    import argparse

    from mmaccel.apps.video import _config, add_video_parser

    parser = argparse.ArgumentParser()
    add_video_parser(parser.add_subparsers())
    args = parser.parse_args([*CLI_ARGS, "--mode", "pipeline", "--frames-per-block", "5", "--num-cat", "0"])
    config = _config(args)
    assert config.mode == "pipeline" and config.decode_overlap is None
    assert config.checkpoint_dir == "video.mp4.parts" and config.checkpoint_every == 1  # pipeline mode checkpoints too
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
    dense_options = dict(local_scope="window", end_keys="none", global_sampling="uniform")
    config = LongVideoConfig(
        prompt=PROMPT, num_frames=9, num_inference_steps=2, height=32, width=48, max_sequence_length=32,
        seed=RUN["seed"], clip=ClipParallelConfig(padding=2, global_frames=3, phase_bias=10.0, **dense_options),
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
    with apply_clip_parallel(pipe.transformer, ClipParallelConfig(), ctx=ctx, num_latent_frames=4):
        with pytest.raises(ValueError, match=r"owns latent frames \[0, 4\)"):
            pipe.transformer(torch.zeros(1, 16, 3, 4, 6), torch.tensor([500.0]), torch.zeros(1, 8, 32))
        with pytest.raises(ValueError, match="already applied"):
            apply_clip_parallel(pipe.transformer, ClipParallelConfig(), ctx=ctx, num_latent_frames=4)


# ---------------------------------------------------------------- single-process simulation


class _MaskedDualScope:
    """Reference: attention over the whole video where each query frame attends to exactly the key
    frames the plan lists for it (band or window, zero K/V frames at the video ends, the global
    frames with duplicates), with the phase bias added to one scope."""

    def __init__(self, plan: ClipPlan, config: ClipParallelConfig, timestep: list[float]) -> None:
        self.plan, self.config, self.timestep = plan, config, timestep

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from mmaccel.runtime.adapters.wan import apply_rotary as apply_wan_rotary

        def heads(x):
            return x.unflatten(2, (attn.heads, -1))

        q = apply_wan_rotary(heads(attn.norm_q(attn.to_q(hidden_states))), *rotary_emb)
        k = apply_wan_rotary(heads(attn.norm_k(attn.to_k(hidden_states))), *rotary_emb)
        v = heads(attn.to_v(hidden_states))
        n = self.plan.num_frames
        q, k, v = (x.unflatten(1, (n, -1)) for x in (q, k, v))  # (B, frames, tokens, H, D)
        to_global = self.timestep[0] >= self.config.phase_boundary
        outs = []
        for frame in range(n):
            visible = self.plan.visible_frames(frame)
            rank = self.plan.owner(frame)
            n_local = len(visible) - len(self.plan.global_keys(rank))
            keys = [k[:, f] if 0 <= f < n else torch.zeros_like(k[:, 0]) for f in visible]
            values = [v[:, f] if 0 <= f < n else torch.zeros_like(v[:, 0]) for f in visible]
            per_frame = keys[0].shape[1]
            bias = torch.zeros(len(visible))
            bias[n_local:] = self.config.phase_bias if to_global else 0.0
            bias[:n_local] = 0.0 if to_global else self.config.phase_bias
            if n_local == len(visible):
                bias.zero_()
            mask = bias.repeat_interleave(per_frame).view(1, 1, 1, -1)
            out = F.scaled_dot_product_attention(
                q[:, frame].transpose(1, 2), torch.cat(keys, 1).transpose(1, 2), torch.cat(values, 1).transpose(1, 2),
                attn_mask=mask,
            )  # fmt: skip
            outs.append(out.transpose(1, 2))
        out = torch.cat(outs, dim=1)
        return attn.to_out[1](attn.to_out[0](out.flatten(2)))


def _simulate(pipe, world_size: int, frames: int = RUN["frames"], steps: int = RUN["steps"], config=None) -> torch.Tensor:
    if config is None:
        config = ClipParallelConfig(
            padding=RUN["padding"], global_frames=RUN["global_frames"], phase_bias=RUN["phase_bias"]
        )
    latent_frames = latent_frame_count(frames, 4)
    plan = config.plan(latent_frames, world_size)
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
            prompt=PROMPT, negative_prompt="", height=RUN["height"], width=RUN["width"], num_frames=frames,
            num_inference_steps=steps, guidance_scale=5.0, max_sequence_length=32, output_type="latent",
            latents=frame_noise(RUN["seed"], range(latent_frames), (16, 4, 6)),
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
    from mmaccel.runtime.checkpoint_io import load_verified  # checkpoints carry a checksum header

    clips = [load_verified(parts / f"clip{r}of2_step{steps:05d}.pt")["latents"] for r in range(2)]
    return torch.cat(clips, dim=2)


@pytest.fixture(scope="module", autouse=True)
def _two_rank_launches(tmp_path_factory, tiny_dir):
    """Start the 2-rank launches when the module starts, so the in-process tests overlap them:
    the layer pipeline + an uninterrupted clip-mode CLI run (one launch), and, concurrently, a
    clip-mode CLI run whose rank 1 dies after step 2."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    (tmp / "full_driver.py").write_text(FULL_DRIVER)
    (tmp / "kill_driver.py").write_text(KILL_DRIVER)
    (tmp / "pipeline_kill_driver.py").write_text(PIPELINE_KILL_DRIVER)
    args = [*CLI_ARGS, "--model", str(tiny_dir)]
    full_args = [str(tiny_dir), str(tmp / "pipeline.pt"), *args, "--out", str(tmp / "full.mp4")]
    kill_args = [*args, "--out", str(tmp / "resumed.mp4")]
    procs = {
        "full": _torchrun([str(tmp / "full_driver.py")], full_args),
        "killed": _torchrun([str(tmp / "kill_driver.py")], kill_args, DEATH_FILE=str(tmp / "death")),
        "pipeline_killed": _torchrun(
            [str(tmp / "pipeline_kill_driver.py")],
            [*PIPELINE_CLI_ARGS, "--model", str(tiny_dir), "--out", str(tmp / "pipe_resumed.mp4")],
            DIE_AFTER="6",
        ),
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


def _pipeline_latents(
    pipe, frames_per_block: int, num_cat: int, steps: int = RUN["steps"], tail_lag: int = 0
) -> torch.Tensor:
    """The layer pipeline in this process (world size 1): the single-process block-wise schedule."""
    cond, uncond = pipe.encode_prompt(PROMPT, "", max_sequence_length=32)
    config = LayerPipelineConfig(frames_per_block, num_cat, tail_lag=tail_lag)
    latents, stats = run_layer_pipeline(
        pipe, init_distributed(), config, text=torch.cat([cond, uncond]),
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
    # tail_lag=1: the previous block's prefix one update older, the same on 2 ranks as on 1
    lagged = _pipeline_latents(pipe, PIPELINE["frames_per_block"], PIPELINE["num_cat"], PIPELINE_STEPS, tail_lag=1)
    torch.testing.assert_close(torch.load(tmp / "pipeline.pt.lag1", weights_only=True), lagged, rtol=1e-5, atol=1e-5)
    assert (lagged - single).abs().max() > 1e-4


@pytest.mark.parametrize("frames", [33, 81])
def test_both_modes_run_at_wan_lengths_with_defaults(pipe, two_rank_runs, frames):
    """2 ranks, default configs, 33 and 81 frames: clip mode equals its single-process simulation,
    the pipeline equals its single-process schedule (uneven 21 = 7 + 7 + 7 blocks included)."""
    tmp, (rc, out, _), *_ = two_rank_runs
    assert rc == 0, out
    latent_frames = latent_frame_count(frames, 4)
    shape, clip = torch.load(tmp / f"pipeline.pt.clip{frames}", weights_only=True)
    assert tuple(shape) == (frames, RUN["height"], RUN["width"], 3)
    simulated = _simulate(pipe, 2, frames=frames, steps=2, config=ClipParallelConfig())
    torch.testing.assert_close(clip, simulated, rtol=1e-4, atol=1e-4)
    shape, pipelined = torch.load(tmp / f"pipeline.pt.pipeline{frames}", weights_only=True)
    assert tuple(shape) == (frames, RUN["height"], RUN["width"], 3)
    cond, uncond = pipe.encode_prompt(PROMPT, "", max_sequence_length=32)
    single, stats = run_layer_pipeline(
        pipe, init_distributed(), None, text=torch.cat([cond, uncond]), guidance_scale=5.0,
        num_latent_frames=latent_frames, latent_hw=(4, 6), steps=2, seed=RUN["seed"], progress=False,
    )  # fmt: skip
    assert sum(stats["block_sizes"]) == latent_frames
    torch.testing.assert_close(pipelined, single, rtol=1e-5, atol=1e-5)


def test_cli_errors_are_one_line_before_any_model_loads(monkeypatch, capsys):
    import mmaccel.apps.video as video

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(video, "_load", no_loading)
    base = ["video", "--model", "tiny", "--prompt", PROMPT, "--quiet", "--steps", "2"]
    cases = [
        (["--frames", "34"], "frames - 1 must be divisible"),
        (["--frames", "33", "--padding", "9"], "padding=9"),
        (["--frames", "33", "--width", "40"], "width must be a multiple of 16"),
        (["--frames", "33", "--mode", "pipeline", "--num-cat", "11"], "num_cat"),
        (["--frames", "33", "--model", "/nonexistent/wan"], "neither 'tiny'"),
    ]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for extra, message in cases:
        assert cli_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setenv("RANK", "1")  # the other ranks stay silent: the error is printed once
    assert cli_main([*base, "--frames", "34"]) == 2
    assert capsys.readouterr().err == ""


def test_cli_options_default_to_the_reference():
    import argparse

    from mmaccel.apps.video import _config, add_video_parser

    parser = argparse.ArgumentParser()
    add_video_parser(parser.add_subparsers())
    base = ["video", "--prompt", PROMPT, "--frames", "81"]
    config = _config(parser.parse_args(base))
    assert config.clip == ClipParallelConfig() and config.pipeline == LayerPipelineConfig()
    options = _config(parser.parse_args([
        *base, "--local-scope", "window", "--end-keys", "none", "--global-sampling", "uniform",
        "--phase-boundary", "800", "--context", "prev_kv", "--order", "oldest_first", "--tail-lag", "1",
    ]))  # fmt: skip
    assert (options.clip.local_scope, options.clip.end_keys, options.clip.global_sampling) == (
        "window", "none", "uniform",
    )
    assert options.clip.phase_boundary == 800.0
    assert (options.pipeline.context, options.pipeline.order, options.pipeline.tail_lag) == ("prev_kv", "oldest_first", 1)


# ---------------------------------------------------------------- layer pipeline: checkpoint and resume


@pytest.fixture(scope="module")
def pipeline_resume_run(_two_rank_launches, two_rank_runs):
    """The 2-rank pipeline CLI run whose last rank died after iteration 6 of 12, then its ``--resume``."""
    tmp, args, procs = _two_rank_launches
    killed = _finish(procs["pipeline_killed"])
    model = args[args.index("--model") + 1]
    resume_args = [*PIPELINE_CLI_ARGS, "--model", model, "--out", str(tmp / "pipe_resumed.mp4"), "--resume"]
    return tmp, killed, _finish(_torchrun(["-m", "mmaccel.apps.cli"], resume_args))


def _pipeline_files(parts: Path) -> list[str]:
    return sorted(p.name for p in parts.glob("pipe*.pt"))


def test_two_rank_pipeline_resume_writes_the_uninterrupted_video(two_rank_runs, pipeline_resume_run):
    """Rank 1 dies right after checkpointing iteration 6; ``--resume`` continues from the last
    iteration both ranks saved and writes the MP4 of the uninterrupted run byte for byte."""
    from mmaccel.runtime.checkpoint_io import load_verified

    _, (full_rc, full_out, _), *_ = two_rank_runs
    tmp, (killed_rc, killed_out, _), (rc, out, _) = pipeline_resume_run
    assert full_rc == 0, full_out
    assert killed_rc != 0 and re.search(r"exitcode\s*:\s*9", killed_out), killed_out
    assert rc == 0, out
    resumed_from = int(re.search(r"resumed from iteration (\d+)", out).group(1))
    assert resumed_from in (5, 6)  # rank 0 saves an iteration once the last rank's updates of it arrived
    assert (tmp / "pipe_resumed.mp4").read_bytes() == (tmp / "pipeline.pt.mp4").read_bytes()
    parts = tmp / "pipe_resumed.mp4.parts"
    final = load_verified(parts / f"pipe0of2_iter{PIPELINE_ITERATIONS:05d}.pt")["state"]
    latents = torch.cat([final["latents"][b] for b in range(5)], dim=2)
    assert torch.equal(latents, torch.load(tmp / "pipeline.pt", weights_only=True))
    # after 11 iterations only block 4 is in flight: rank 0 holds every block's latents and their
    # versions, the last rank block 4's latents and scheduler; the reference K/V cache is not kept
    first, last = (load_verified(parts / f"pipe{r}of2_iter00011.pt")["state"] for r in range(2))
    assert sorted(first["latents"]) == [0, 1, 2, 3, 4] and first["schedulers"] == {} and first["done"][4] == 7
    assert sorted(last["latents"]) == [4] and sorted(last["schedulers"]) == [4] and last["versions"] == {}
    assert first["kv"] == last["kv"] == []
    # each rank keeps its last three pipeline checkpoints
    names = _pipeline_files(parts)
    assert [n for n in names if n.startswith("pipe0of2")][-1] == f"pipe0of2_iter{PIPELINE_ITERATIONS:05d}.pt"
    assert len([n for n in names if n.startswith("pipe0of2")]) == 3 and len(names) == 6


def _pipeline_cli(out: Path, *extra: str, steps: int = 4) -> list[str]:
    """One process with the built-in tiny model (the same weights each time, no loading bars)."""
    args = [*PIPELINE_CLI_ARGS, "--model", "tiny", "--out", str(out), *extra]
    args[args.index("--steps") + 1] = str(steps)
    return args


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize(
    "options", [(), ("--context", "prev_kv", "--order", "oldest_first"), ("--tail-lag", "1", "--checkpoint-every", "2")],
    ids=["reference", "prev_kv", "tail_lag-every2"],
)
def test_one_rank_pipeline_resume_is_identical(tmp_path, monkeypatch, capsys, options):
    """One process, killed by an exception right after checkpointing iteration 4 of 8: ``--resume``
    writes the same MP4 (bytes) and final latents (``torch.equal``) as an uninterrupted run;
    ``prev_kv`` also carries the cached context K/V across the restart."""
    import mmaccel.parallel_video.checkpoint as checkpoint
    from mmaccel.runtime.checkpoint_io import load_verified

    full, resumed = tmp_path / "full.mp4", tmp_path / "resumed.mp4"
    assert cli_main(_pipeline_cli(full, *options)) == 0
    save_iteration = checkpoint.save_iteration

    def dying(directory, rank, world_size, iteration, *args, **kwargs):
        path = save_iteration(directory, rank, world_size, iteration, *args, **kwargs)
        if iteration == 4:
            raise _Killed("killed after iteration 4")
        return path

    monkeypatch.setattr(checkpoint, "save_iteration", dying)
    with pytest.raises(_Killed):
        cli_main(_pipeline_cli(resumed, *options))
    monkeypatch.setattr(checkpoint, "save_iteration", save_iteration)
    parts = tmp_path / "resumed.mp4.parts"
    kept = _pipeline_files(parts)
    assert kept[-1] == "pipe0of1_iter00004.pt" and len(kept) == (2 if "--checkpoint-every" in options else 3)
    state = load_verified(parts / kept[-1])["state"]
    assert (len(state["kv"]) > 0) == ("prev_kv" in options)  # (layer, block, K, V) of the blocks still read
    assert sorted(state["schedulers"]) == [1, 2, 3]  # blocks in flight at iteration 4 (block 0 finished)
    capsys.readouterr()
    assert cli_main([*_pipeline_cli(resumed, *options), "--resume"]) == 0
    assert "resumed from iteration 4" in capsys.readouterr().out
    assert resumed.read_bytes() == full.read_bytes()
    final = [load_verified(d / "pipe0of1_iter00008.pt")["state"]["latents"] for d in (parts, tmp_path / "full.mp4.parts")]
    assert all(torch.equal(final[0][b], final[1][b]) for b in range(5))


def test_pipeline_resume_with_other_settings_names_them(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert cli_main(_pipeline_cli(out, steps=2)) == 0
    capsys.readouterr()
    changed = _pipeline_cli(out, "--resume", steps=2)
    changed[changed.index("--prompt") + 1] = "a dog"
    assert cli_main(changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"prompt: {PROMPT!r} -> 'a dog'" in err and "pipe0of1_iter00006.pt" in err, err
    assert cli_main([*_pipeline_cli(out, "--resume", steps=2), "--num-cat", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pipeline.num_cat: 1 -> 0" in err and "prompt" not in err, err


def test_pipeline_resume_falls_back_from_a_truncated_checkpoint(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert cli_main(_pipeline_cli(out, steps=2)) == 0
    written = out.read_bytes()
    newest = tmp_path / "v.mp4.parts" / "pipe0of1_iter00006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    assert cli_main(_pipeline_cli(out, "--resume", steps=2)) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if newest.name in line]
    assert len(warnings) == 1 and "truncated" in warnings[0] and "falling back to pipe0of1_iter00005.pt" in warnings[0]
    assert "Traceback" not in captured.err and "resumed from iteration 5" in captured.out
    assert out.read_bytes() == written
