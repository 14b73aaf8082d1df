"""Model knowledge, one module per model family, shared by every technique.

Each family module says which classes it covers (``TRANSFORMERS`` / ``MODELS``) and how to get
q/k/v, apply the rotary embedding and project out, so no technique writes a model's attention
again. Techniques ask :func:`family_of` / :func:`require_family` which family a model is.

====================  ===================================================  ===================
family module         classes                                              used by
====================  ===================================================  ===================
``wan``               ``WanTransformer3DModel``                            token density, SVG2,
                                                                           clip parallelism,
                                                                           layer pipeline
``cogvideox``         ``CogVideoXTransformer3DModel``                      token density, SVG2
``dit``               ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``  token density, FlexDiT
``llava``             ``LlavaForConditionalGeneration``,                   HiRED, VISTA,
                      ``LlavaNextForConditionalGeneration``                attention rebalancing
``hunyuan_video``     ``HunyuanVideoTransformer3DModel``                   token density, SVG2
``flux``              ``FluxTransformer2DModel``                           token density
====================  ===================================================  ===================

Wan 2.2 (A14B: ``transformer`` + ``transformer_2``; TI2V-5B) uses ``wan``; a pipeline holding
several transformers goes through `mmaccel.runtime.pipelines`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["FAMILIES", "family_of", "require_family"]

#: model class name -> family module name (``mmaccel.runtime.adapters.<family>``).
FAMILIES: dict[str, str] = {
    "WanTransformer3DModel": "wan",
    "CogVideoXTransformer3DModel": "cogvideox",
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "dit",
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "FluxTransformer2DModel": "flux",
}


def family_of(model: torch.nn.Module) -> str | None:
    """The family of ``model``'s class, or None if no adapter covers it."""
    return FAMILIES.get(type(model).__name__)


def require_family(model: object, supported: Iterable[str], technique: str) -> str:
    """``TypeError`` naming the supported classes unless ``model``'s class is one of ``supported``."""
    supported = tuple(supported)
    name = type(model).__name__
    if name not in supported:
        raise TypeError(f"{technique} supports {', '.join(supported)}; got {name}")
    return FAMILIES[name]
