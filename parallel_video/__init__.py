"""Multi-GPU long-video denoising for Wan: clip parallelism with dual-scope attention
(Video-Infinity, ``mode="clip"``) and the block-wise layer pipeline (DualParal, ``mode="pipeline"``).

Launch every rank with ``torchrun``/``accelerate``; gloo on CPU and NCCL on GPU alike.
"""

if __name__ != "mmaccel.parallel_video":  # installed as mmaccel.parallel_video; a second copy must never load
    raise ImportError("import mmaccel.parallel_video, not the bare folder name 'parallel_video'")

from mmaccel.parallel_video.clip_parallel import (
    SUPPORTED_TRANSFORMERS,
    ClipParallelConfig,
    ClipParallelHandle,
    ClipParallelState,
    ClipParallelStats,
    DualScopeAttnProcessor,
    apply_clip_parallel,
)
from mmaccel.parallel_video.decode import decode_clip
from mmaccel.parallel_video.generate import (
    LongVideoConfig,
    LongVideoOutput,
    VideoGeometry,
    check_long_video,
    generate_long_video,
)
from mmaccel.parallel_video.layer_pipeline import (
    BlockContext,
    CachedContextAttnProcessor,
    LayerPipelineConfig,
    LayerStage,
    block_noise,
    block_sizes,
    context_frames,
    run_layer_pipeline,
)
from mmaccel.parallel_video.noise import frame_noise, frame_seed
from mmaccel.parallel_video.plan import ClipPlan, latent_frame_count
from mmaccel.parallel_video.schedule import BlockSchedule, split_stages

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "BlockContext",
    "BlockSchedule",
    "CachedContextAttnProcessor",
    "ClipParallelConfig",
    "ClipParallelHandle",
    "ClipParallelState",
    "ClipParallelStats",
    "ClipPlan",
    "DualScopeAttnProcessor",
    "LayerPipelineConfig",
    "LayerStage",
    "LongVideoConfig",
    "LongVideoOutput",
    "VideoGeometry",
    "apply_clip_parallel",
    "block_noise",
    "block_sizes",
    "check_long_video",
    "context_frames",
    "decode_clip",
    "frame_noise",
    "frame_seed",
    "generate_long_video",
    "latent_frame_count",
    "run_layer_pipeline",
    "split_stages",
]
