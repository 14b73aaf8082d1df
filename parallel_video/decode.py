"""Decode one clip's latents with the causal video VAE, on the rank that owns the clip.

A causal VAE (Wan: temporal stride 4) decodes ``n`` latent frames into ``1 + 4 (n - 1)`` video
frames, treating the first latent frame as a still image. A clip in the middle of the video is
therefore decoded with ``overlap`` latent frames of left context from its neighbour, and the
frames those produce are dropped: the clip yields exactly its ``4 n`` frames (the first clip its
``1 + 4 (n - 1)``), and the clips concatenate to the whole video.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["decode_clip"]


@torch.no_grad()
def decode_clip(pipe: Any, latents: Tensor, left_context: Tensor | None) -> np.ndarray:
    """Video frames ``(frames, H, W, 3)`` float in [0, 1] for ``latents`` ``(1, C, n, h, w)``.

    ``left_context`` is ``None`` for the first clip, else the previous clip's last latent frames.
    """
    vae = pipe.vae
    stride = pipe.vae_scale_factor_temporal
    context = 0 if left_context is None else left_context.shape[2]
    if context:
        latents = torch.cat([left_context.to(latents), latents], dim=2)
    latents = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    if context:
        video = video[:, :, 1 + stride * (context - 1) :]
    return pipe.video_processor.postprocess_video(video, output_type="np")[0]
