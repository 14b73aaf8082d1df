"""Token sampling for image-token decoders: CFG, temperature, top-k, top-p (nucleus), greedy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmaccel.runtime.budget import top_p_mask

__all__ = ["SamplingConfig", "apply_cfg", "sample_logits"]


@dataclass(frozen=True)
class SamplingConfig:
    """How logits become tokens.

    ``temperature`` > 0 divides the logits; ``top_k`` keeps the k best (0 = all); ``top_p`` in
    (0, 1] keeps the smallest set reaching that mass; ``greedy`` takes the argmax instead of
    sampling. ``cfg_scale`` >= 1 is classifier-free guidance, ``uncond + s * (cond - uncond)``
    (1 = off). LlamaGen's defaults for class-to-image are ``cfg_scale=4, top_k=2000``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "cfg_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not self.temperature > 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no top-k), got {self.top_k!r}")
        if not isinstance(self.greedy, bool):
            raise TypeError(f"greedy must be a bool, got {type(self.greedy).__name__}")
        if not 1.0 <= self.cfg_scale < math.inf:
            raise ValueError(
                f"cfg_scale must be a finite number >= 1 (1 = no guidance), got {self.cfg_scale}"
            )

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0


def apply_cfg(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Combine ``[cond; uncond]`` halves of the batch: ``uncond + scale * (cond - uncond)``."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def sample_logits(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample one token per row of ``logits [..., V]`` -> ``LongTensor [...]`` (CFG is not applied here)."""
    if config.greedy:
        return logits.argmax(-1)
    logits = logits.float() / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if config.top_p < 1.0:
        logits = logits.masked_fill(~top_p_mask(logits, config.top_p), -math.inf)
    probs = logits.softmax(-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(logits.shape[:-1])
