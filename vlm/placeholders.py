"""Shrink a batch of token sequences after some ``<image>`` placeholder positions are dropped.

LLaVA-style models scatter image features into the ``<image>`` positions of ``input_ids`` in
row-major order over the flattened batch. Dropping visual tokens therefore means dropping the
matching placeholder positions from every per-token tensor (``input_ids``, ``attention_mask``,
``position_ids``, ``labels``), sample by sample, and re-padding the batch to its new longest
length on the side it was padded on, so generation with a KV cache sees an ordinary padded
batch.
"""

from __future__ import annotations

import torch

__all__ = ["padding_side_of", "shrink_placeholders"]


def padding_side_of(attention_mask: torch.Tensor | None, default: str = "left") -> str:
    """``"left"`` or ``"right"`` from where the zeros of a 2-D attention mask sit."""
    if attention_mask is not None and attention_mask.shape[1] > 0:
        if bool((attention_mask[:, 0] == 0).any()):
            return "left"
        if bool((attention_mask[:, -1] == 0).any()):
            return "right"
    return default


def shrink_placeholders(
    input_ids: torch.Tensor,
    keep: torch.Tensor,
    image_token_id: int,
    *,
    pad_token_id: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    padding_side: str | None = None,
) -> dict[str, torch.Tensor]:
    """Drop the placeholder positions where ``keep`` is False and re-pad the batch.

    ``keep`` is a bool vector with one entry per ``<image>`` position of ``input_ids``
    (row-major order). Returns ``input_ids`` and ``attention_mask`` (ones where none was
    given) and, when given, ``position_ids`` (the kept tokens keep their original positions)
    and ``labels`` (padded with -100). New padding goes on ``padding_side`` (default: the side
    the mask is padded on, else left, as generation needs).
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    placeholders = input_ids == image_token_id
    n = int(placeholders.sum())
    if keep.ndim != 1 or keep.numel() != n:
        raise ValueError(
            f"keep must have one entry per <image> position ({n}), got shape {tuple(keep.shape)}"
        )
    side = padding_side or padding_side_of(attention_mask)
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    # Scatter ``keep`` into the placeholder positions (row-major) and compact each row with
    # gathers and scatters: no boolean indexing, so the only value read is the new length.
    slot = (placeholders.flatten().long().cumsum(0) - 1).clamp_min(0).view_as(input_ids)
    flat_keep = keep.to(input_ids.device, torch.bool)
    token_keep = ~placeholders | (flat_keep[slot] if n else torch.zeros_like(placeholders))
    lengths = token_keep.sum(1)
    new_len = int(lengths.max())
    target = token_keep.long().cumsum(1) - 1  # position of each kept token in its new row
    if side == "left":
        target = target + (new_len - lengths)[:, None]
    target = torch.where(token_keep, target, torch.full_like(target, new_len))  # dropped: a spare column

    def gather(x: torch.Tensor, pad: int) -> torch.Tensor:
        if x.shape != input_ids.shape:
            raise ValueError(
                f"per-token tensors must match input_ids {tuple(input_ids.shape)}, got {tuple(x.shape)}"
            )
        out = x.new_full((x.shape[0], new_len + 1), pad)
        return out.scatter_(1, target, x)[:, :new_len]

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = {"input_ids": gather(input_ids, pad_token_id), "attention_mask": gather(attention_mask, 0)}
    if position_ids is not None:
        out["position_ids"] = gather(position_ids, 0)
    if labels is not None:
        out["labels"] = gather(labels, -100)
    return out
