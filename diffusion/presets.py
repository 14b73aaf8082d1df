"""The ``fast`` preset: our token technique stacked with the diffusers cache that wins per family.

Token reduction and step caching save different work (tokens inside a forward, whole forwards
across steps), so they stack. The preset applies token density first (on the full-resolution
residual stream) and then a diffusers block cache, the order that composes (a cache installed
first would see reduced tokens; `apply_token_density` refuses it). The cache per family is the one
that won the same-run peers comparison (``benchmarks/bench_peers_dit.py``): MagCache (Ma et al.,
"MagCache: Fast Video Generation with Magnitude-Aware Cache", arXiv:2506.09045) on the DiT,
PixArt and Wan shapes and on the zoo ``digits-dit``, at diffusers' default threshold (the same
cache as the ToMe + MagCache peer, so the comparison isolates the token technique). MagCache
needs magnitude ratios calibrated on the model for the step count (``MagCacheConfig(calibrate=True)``
over one dense run; ratios calibrated with token density applied made MagCache skip fewer steps
at the same PSNR on the PixArt shape, so the dense calibration is the one to pass).

The token density of the preset (`fast_token_density`) differs from `TokenDensityConfig`'s
defaults; it was chosen per family on a development setting (other noise, text, seed and samples
than the benchmark's; issue #28):

- PixArt and Wan (random-weight shapes, PSNR vs dense): reducing only the first sampling step
  costs more PSNR than reducing any later one (PixArt, 10 DPM-Solver++ steps: 62.4 dB for step 0
  alone, 70.6 dB for step 1, > 86 dB from step 2 on), the opposite of the default schedule. So the
  preset keeps the noisiest steps dense (progress < 0.05) and then runs every block on a quarter
  of the tokens (2x2 pooling, whole blocks pooled: one pooled forward cost 0.35x of a dense one on
  the PixArt shape vs 0.48x for the auto layout's sparse_q and 0.58x for ToMe at ratio 0.5; with
  MagCache 68.4 dB vs 69.1 dB; keeping the top block dense: 0.40x, 68.8 dB). On the Wan shape a
  dense first step leaves the preset behind ToMe + MagCache (MagCache runs 2 of its 6 steps, one
  of them the dense first), but every setting that reduced the first step fell below the peer's
  PSNR (56.3-57.9 dB vs 58.4 dB): the same rule is kept there (59.3 dB). By FLOPs the dense first
  step puts the preset at 0.86x of ToMe + MagCache at 512 tokens and 0.74x at 4,032; a ToMe-merged
  first step (keep 0.75) followed by pooling reaches the peer's PSNR only at the peer's cost
  (``bench_peers_dit --breakdown``, benchmarks/results/cpu_fast_preset_wan_2026-12-07.md).
- DiT (chosen on the trained zoo ``digits-dit``, 64 tokens, classifier accuracy): every token
  reduction cost accuracy there; the mildest that kept it within 0.01 of dense (with MagCache:
  accuracy 0.94 vs 0.95, FD 21.7 vs 23.8) is sparse_q at half the tokens from progress 0.7 on,
  the auto layout (sparse_kv from 0.7: 0.95 but FD 32.4; sparse_q 0.25 from 0.7: 0.92).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from mmaccel.diffusion.token_density import TokenDensityConfig, TokenDensityHandle, apply_token_density
from mmaccel.runtime.adapters import dit, wan
from mmaccel.runtime.budget import StepSchedule
from mmaccel.runtime.patching import PatchHandle

__all__ = ["FAST_CACHES", "FAST_DENSE_UNTIL", "FastConfig", "FastHandle", "apply_fast", "fast_token_density"]

#: the cache each family's ``fast`` preset stacks (the same-run winner, benchmarks/results/peers_dit.md)
FAST_CACHES = {**dict.fromkeys(dit.TRANSFORMERS, "mag"), **dict.fromkeys(wan.TRANSFORMERS, "mag")}
#: PixArt and Wan: denoising progress before which the preset's token density stays dense
FAST_DENSE_UNTIL = 0.05
_CACHES = ("mag", "first_block")
_HOOKS = {"mag": ("mag_cache_leader_block_hook", "mag_cache_block_hook"),
          "first_block": ("fbc_leader_block_hook", "fbc_block_hook")}  # fmt: skip


@dataclass(frozen=True)
class FastConfig:
    """The ``fast`` preset.

    Args:
        num_inference_steps: sampling steps (MagCache's ratios are per step); int >= 2.
        mag_ratios: MagCache's calibrated magnitude ratios, one per step (``cache="mag"``).
        token_density: the token reduction; ``None`` = the family's `fast_token_density`.
        cache: ``None`` = the family's winner (`FAST_CACHES`), ``"mag"`` or ``"first_block"``.
        first_block_threshold: FirstBlockCache's threshold (``cache="first_block"``).
    """

    num_inference_steps: int = 20
    mag_ratios: tuple[float, ...] | None = None
    token_density: TokenDensityConfig | None = None
    cache: str | None = None
    first_block_threshold: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int >= 2, got {self.num_inference_steps!r}")
        if self.num_inference_steps < 2:
            raise ValueError(f"num_inference_steps must be an int >= 2, got {self.num_inference_steps}")
        if self.cache is not None and self.cache not in _CACHES:
            raise ValueError(f"cache must be None or one of {_CACHES}, got {self.cache!r}")
        if self.mag_ratios is not None:
            if not isinstance(self.mag_ratios, tuple) or len(self.mag_ratios) != self.num_inference_steps:
                raise ValueError(
                    f"mag_ratios must be a tuple of num_inference_steps={self.num_inference_steps} floats "
                    f"(MagCacheConfig(calibrate=True) prints them), got {self.mag_ratios!r}"
                )
        if self.token_density is not None and not isinstance(self.token_density, TokenDensityConfig):
            raise TypeError(f"token_density must be a TokenDensityConfig or None, got {type(self.token_density).__name__}")
        if not 0.0 < self.first_block_threshold < 1.0:
            raise ValueError(f"first_block_threshold must be in (0, 1), got {self.first_block_threshold!r}")


def fast_token_density(transformer: torch.nn.Module) -> TokenDensityConfig:
    """The token density the ``fast`` preset applies to ``transformer`` (see the module docstring
    for how each family's setting was chosen). ``NotImplementedError`` outside `FAST_CACHES`."""
    name = type(transformer).__name__
    if name not in FAST_CACHES:
        raise NotImplementedError(f"the fast preset supports {sorted(FAST_CACHES)}, not {name}")
    if name == "DiTTransformer2DModel":
        return TokenDensityConfig(factor=(2, 2), schedule=StepSchedule(boundaries=(0.7,), ratios=(1.0, 0.5)))
    video = name in wan.TRANSFORMERS
    depth = len(wan.blocks(transformer) if video else dit.blocks(transformer))
    return TokenDensityConfig(factor=(1, 2, 2) if video else (2, 2), pooled_blocks=(0, depth), sparse_blocks=None,
                              schedule=StepSchedule(boundaries=(FAST_DENSE_UNTIL,), ratios=(1.0, 0.25)))  # fmt: skip


class FastHandle(PatchHandle):
    """What `apply_fast` returns: removes the cache, then token density. ``stats`` is token
    density's; ``cache`` names the cache installed."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__(model, name)
        self.cache = ""
        self.token_density: TokenDensityHandle | None = None

    @property
    def stats(self) -> Any:
        return self.token_density.stats  # type: ignore[union-attr]


def apply_fast(
    transformer: torch.nn.Module,
    config: FastConfig | None = None,
    current_timestep_callback: Callable[[], Any] | None = None,
    *,
    scheduler: Any = None,
) -> FastHandle:
    """Token density, then the family's cache, on ``transformer``; ``.remove()`` undoes both.

    The cache context is set to one ``"cond"`` context (DiT and PixArt have no ``CacheMixin`` in
    diffusers, so their pipelines set none). ``scheduler`` lets token density read the timestep on
    the host (`apply_token_density`). ``ValueError`` when MagCache is chosen without ``mag_ratios``.
    """
    config = FastConfig() if config is None else config
    if not isinstance(config, FastConfig):
        raise TypeError(f"config must be a FastConfig or None, got {type(config).__name__}")
    name = type(transformer).__name__
    if name not in FAST_CACHES:
        raise NotImplementedError(f"the fast preset supports {sorted(FAST_CACHES)}, not {name}")
    cache = config.cache or FAST_CACHES[name]
    if cache == "mag" and config.mag_ratios is None:
        raise ValueError(
            "the fast preset's MagCache needs mag_ratios calibrated on this model for num_inference_steps "
            "(run one dense sampling with MagCacheConfig(calibrate=True))"
        )
    td = config.token_density or fast_token_density(transformer)
    handle = FastHandle(transformer, "fast")
    try:
        handle.token_density = apply_token_density(transformer, td, current_timestep_callback, scheduler=scheduler)
        handle.on_remove(handle.token_density.remove)
        if cache == "mag":
            apply_mag_cache(transformer, MagCacheConfig(num_inference_steps=config.num_inference_steps,
                                                        mag_ratios=list(config.mag_ratios)))  # type: ignore[arg-type]
        else:
            apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=config.first_block_threshold))
        handle.cache = cache

        def remove_cache() -> None:
            _set_cache_context(transformer, None)
            registry = HookRegistry.check_if_exists_or_initialize(transformer)
            for hook in _HOOKS[cache]:
                registry.remove_hook(hook, recurse=True)

        handle.on_remove(remove_cache)
        _set_cache_context(transformer, CacheContext("cond"))
    except BaseException:
        handle.remove()
        raise
    return handle
