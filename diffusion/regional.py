"""Regional compilation (diffusers' ``compile_repeated_blocks``) for every transformer family we patch.

diffusers compiles "only the frequently repeated sub-modules" of a model whose class lists them in
``_repeated_blocks`` (Wan, FlexDiT); DiT, PixArt and CogVideoX do not list theirs. This compiles
the blocks of those families too, from the adapters' tables (`mmaccel.runtime.adapters`), so a
model carrying token density's block hooks compiles block by block: identical blocks share one
graph (``torch._dynamo.config.inline_inbuilt_nn_modules``), and compile time no longer grows with
the depth. DyDiT runs its blocks through the model's own per-block methods, so it has no region:
compile the whole model (its kept widths are symbolic: one compile per sampling run).
"""

from __future__ import annotations

from typing import Any

import torch

from mmaccel.runtime.adapters import cogvideox, dit, wan

__all__ = ["compile_repeated_blocks"]

_BLOCKS = {name: adapter.BLOCKS for adapter in (dit, cogvideox, wan) for name in adapter.TRANSFORMERS}


def compile_repeated_blocks(model: torch.nn.Module, **compile_kwargs: Any) -> int:
    """``module.compile(**compile_kwargs)`` on every repeated block of ``model``; returns how many.

    Uses the model's ``_repeated_blocks`` when diffusers (or FlexDiT) lists them, else the block
    list of its family (DiT, PixArt, CogVideoX, Wan). ``ValueError`` for a model without
    repeated blocks (DyDiT, an unsupported class).
    """
    name = type(model).__name__
    if name == "DyDiTTransformer2DModel":
        raise ValueError(
            "DyDiT has no repeated blocks to compile (its blocks run through the model's pruned methods); "
            "compile the whole model: torch.compile(model)"
        )
    if getattr(model, "_repeated_blocks", None):
        classes = set(model._repeated_blocks)
        blocks = [m for m in model.modules() if type(m).__name__ in classes]
    elif name in _BLOCKS:
        blocks = list(getattr(model, _BLOCKS[name]))
    else:
        raise ValueError(f"compile_repeated_blocks supports {sorted(_BLOCKS)} and models with _repeated_blocks, not {name}")
    if not blocks:
        raise ValueError(f"{name} has no blocks to compile")
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
