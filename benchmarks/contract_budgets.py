"""The two budgets at which issue #32's model contracts are checked, for the training-free techniques.

**Full budget** computes what dense computes (token density keeps every token; SVG2 keeps every
cluster pair). **Reducing** drops work on a noisy step: token density keeps a linear 0.25..1 over
progress (2x2 pooling at t = 900, dense at t = 100), SVG2 keeps the top 50 % of attention mass.
Token density's ``"auto"`` block layout needs 3 blocks; a shallower model (diffusers' own test
models have 1 or 2) pools block 0 and runs block 1 sparse (pooled only on `POOLED_ONLY`).
`tests/test_model_contracts.py` and the diffusers-suite plugin
(:mod:`mmaccel.benchmarks.diffusers_suite`) share these settings.
"""

from __future__ import annotations

import importlib

import torch

from mmaccel.diffusion.token_density import TokenDensityConfig, TokenDensityHandle, apply_token_density
from mmaccel.runtime.adapters import family_of
from mmaccel.runtime.budget import ConstantSchedule, LinearSchedule
from mmaccel.sparse_attn.svg2 import SVG2Config, SVG2Handle, apply_svg2

__all__ = ["POOLED_ONLY", "svg2_at_budget", "token_density_at_budget", "token_density_at_every_step"]

#: families whose token density runs pooled blocks only
POOLED_ONLY = ("CogVideoXTransformer3DModel", "FluxTransformer2DModel", "HunyuanVideoTransformer3DModel")


def _check_reducing(reducing: object) -> None:
    if not isinstance(reducing, bool):
        raise TypeError(f"reducing must be a bool, got {type(reducing).__name__}")


def svg2_at_budget(model: torch.nn.Module, reducing: bool) -> SVG2Handle:
    """SVG2 (4 query / 6 key clusters, no dense warm-up, masked backend) at full budget
    (``top_p=1``, ``min_kc_ratio=1``) or reducing (``top_p=0.5``, ``min_kc_ratio=0``)."""
    _check_reducing(reducing)
    cfg = SVG2Config(num_q_clusters=4, num_k_clusters=6, dense_steps=0.0, dense_layers=0.0, backend="masked",
                     top_p=0.5 if reducing else 1.0, min_kc_ratio=0.0 if reducing else 1.0)  # fmt: skip
    return apply_svg2(model, cfg)


def _shallow_layout(model: torch.nn.Module, pooled_only: bool) -> dict[str, tuple[int, int] | None]:
    """Explicit block ranges where the ``"auto"`` layout needs more blocks than ``model`` has."""
    family = family_of(model)
    if family is None:  # apply_token_density says which classes it supports
        return {}
    depth = len(importlib.import_module(f"mmaccel.runtime.adapters.{family}").blocks(model))
    if depth >= 3:
        return {}
    return {"pooled_blocks": (0, 1), "sparse_blocks": None if pooled_only or depth < 2 else (1, 2)}


def _token_density(model: torch.nn.Module, schedule: ConstantSchedule | LinearSchedule) -> TokenDensityHandle:
    name = type(model).__name__
    pooled_only = name in POOLED_ONLY
    cfg: dict[str, object] = {"sparse_blocks": None} if pooled_only else {}
    if pooled_only:  # Flux's timestep is in [0, 1]
        cfg["num_train_timesteps"] = 1 if name == "FluxTransformer2DModel" else 1000
    cfg.update(_shallow_layout(model, pooled_only))
    return apply_token_density(model, TokenDensityConfig(schedule=schedule, **cfg))


def token_density_at_budget(model: torch.nn.Module, reducing: bool) -> TokenDensityHandle:
    """Token density at full budget (keep 1 at every step) or reducing (keep linear 0.25..1 over
    progress); pooled blocks only on the `POOLED_ONLY` families."""
    _check_reducing(reducing)
    return _token_density(model, LinearSchedule(0.25, 1.0) if reducing else ConstantSchedule(1.0))


def token_density_at_every_step(model: torch.nn.Module) -> TokenDensityHandle:
    """Token density keeping 0.25 (2x2 pooling) at every timestep, low-noise ones included."""
    return _token_density(model, ConstantSchedule(0.25))
