"""The decoding engine shared by raster, NAR and PAR-style orders.

:func:`decode` runs a :class:`~mmaccel.tokenizers_img.orders.Schedule` on a :class:`~mmaccel.tokenizers_img.gpt.GPT`:
each step is one forward pass that writes the fed tokens' keys/values into a static KV cache at
their raster positions, attends under the schedule's group mask, assembles each target's
logits from the row head, the column head or their mean, applies CFG and samples. With
``use_cache=False`` every step recomputes the whole fed sequence instead (reference path for
tests); both paths see exactly the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mmaccel.tokenizers_img.gpt import GPT
from mmaccel.tokenizers_img.orders import Schedule, Step
from mmaccel.tokenizers_img.sampling import SamplingConfig, apply_cfg, sample_logits

__all__ = ["Decoded", "decode"]


@dataclass(frozen=True)
class Decoded:
    """Token indices ``[B, H, W]`` and how many forward passes produced them."""

    tokens: torch.Tensor
    forward_passes: int
    order: str


def _assemble(model: GPT, h_row: torch.Tensor, h_col: torch.Tensor | None, step: Step) -> torch.Tensor:
    """Per-target logits: row head, column head, or the mean of both where both exist."""
    device = h_row.device
    logits = torch.zeros(h_row.shape[0], step.targets.numel(), model.config.vocab_size, device=device)
    count = torch.zeros(step.targets.numel(), device=device)
    for src, head, h in ((step.row_src, model.row_logits, h_row), (step.col_src, model.column_logits, h_col)):
        valid = src >= 0
        if bool(valid.any()):
            valid_d = valid.to(device)
            logits[:, valid_d] += head(h[:, src[valid].to(device)])
            count[valid_d] += 1
    return logits / count[:, None]


@torch.no_grad()
def decode(
    model: GPT,
    cond: torch.Tensor,
    schedule: Schedule,
    sampling: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Decoded:
    """Generate a ``B x H x W`` token grid for conditions ``cond`` in ``schedule``'s order.

    ``cond``: class labels ``[B]`` or caption features ``[B, T, caption_dim]``; ``sampling``
    defaults to plain multinomial sampling without CFG.
    """
    sampling = sampling or SamplingConfig()
    cfg = model.config
    column = schedule.uses_column_head
    if column and not cfg.column_blocks:
        raise ValueError(f"{schedule.name} decoding needs the column head; this GPT has column_blocks=0")
    cond_emb = model.embed_condition(cond)
    batch = cond_emb.shape[0]
    if batch < 1:
        raise ValueError("cond must hold at least one condition")
    if sampling.uses_cfg:
        cond_emb = torch.cat([cond_emb, model.embed_condition(model.null_condition(batch))])
    device = model.output.weight.device
    height, width, n_cond = schedule.height, schedule.width, cfg.cls_token_num
    grid = (height, width)
    mask = schedule.mask(n_cond)
    tokens = torch.full((batch, height * width), -1, dtype=torch.long, device=device)
    cache = model.new_cache(cond_emb.shape[0], height, width) if use_cache else None
    fed = torch.zeros(n_cond + height * width, dtype=torch.bool)
    fed[:n_cond] = True

    for i, step in enumerate(tqdm(schedule.steps, desc=f"{schedule.name} decoding", disable=not progress)):
        positions = torch.arange(n_cond) if i == 0 else n_cond + step.inputs
        if use_cache:
            rows = mask[positions]
            kv_len = int(rows.any(0).nonzero().max()) + 1
            if i == 0:
                x = cond_emb
            else:
                x = model.tok_embeddings(tokens[:, step.inputs.to(device)])
                x = torch.cat([x, x]) if sampling.uses_cfg else x
            h_row, h_col = model.hidden(
                x, positions.to(device), rows[:, :kv_len].to(device), grid, cache, kv_len, column
            )
        else:
            fed[positions] = True
            seq = fed.nonzero().squeeze(1)
            x = model.tok_embeddings(tokens[:, (seq[n_cond:] - n_cond).to(device)])
            x = torch.cat([cond_emb, torch.cat([x, x]) if sampling.uses_cfg else x], dim=1)
            h_row, h_col = model.hidden(
                x, seq.to(device), mask[seq][:, seq].to(device), grid, None, None, column
            )
            pick = torch.searchsorted(seq, positions).to(device)
            h_row, h_col = h_row[:, pick], (h_col[:, pick] if column else None)
        if i == 0:  # the first targets come from the last condition token
            h_row, h_col = h_row[:, -1:], (h_col[:, -1:] if column else None)
        logits = _assemble(model, h_row, h_col, step)
        if sampling.uses_cfg:
            logits = apply_cfg(logits, sampling.cfg_scale)
        tokens[:, step.targets.to(device)] = sample_logits(logits, sampling, generator)
    return Decoded(tokens.view(batch, height, width), schedule.forward_passes, schedule.name)
