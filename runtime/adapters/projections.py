"""q/k/v projections of a diffusers attention whether ``fuse_qkv_projections()`` fused them or not.

diffusers' ``fuse_projections`` adds ``to_qkv`` (self-attention: query, key and value weights
stacked) next to ``to_q`` / ``to_k`` / ``to_v``, and its fused processors then project through
``to_qkv``; ``unfuse_projections`` deletes it again. Techniques project through here, so the
same weights as the model's own processor are used in both states, and queries may come from
other tokens than keys/values (token density's sparse blocks) even when fused.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["is_fused", "qkv"]


def is_fused(attn: Any) -> bool:
    """Whether ``attn`` projects through a fused self-attention ``to_qkv``."""
    return bool(getattr(attn, "fused_projections", False)) and getattr(attn, "to_qkv", None) is not None


def qkv(attn: Any, hidden_states: Tensor, kv_states: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, S, inner)`` query from ``hidden_states``, key and value from ``kv_states`` (default the
    same tokens): through ``to_qkv`` when fused (split by rows when the token sets differ), else
    through ``to_q`` / ``to_k`` / ``to_v``."""
    kv_states = hidden_states if kv_states is None else kv_states
    if not is_fused(attn):
        return attn.to_q(hidden_states), attn.to_k(kv_states), attn.to_v(kv_states)
    if kv_states is hidden_states:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return query, key, value
    weight, bias = attn.to_qkv.weight, attn.to_qkv.bias
    d = weight.shape[0] // 3
    query = F.linear(hidden_states, weight[:d], None if bias is None else bias[:d])
    key, value = F.linear(kv_states, weight[d:], None if bias is None else bias[d:]).chunk(2, dim=-1)
    return query, key, value
