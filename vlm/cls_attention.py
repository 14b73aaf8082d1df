"""[CLS]-row attention of a ViT layer without materialising the attention matrix.

SDPA / flash attention return no weights, and an eager N x N matrix per layer is what we want
to avoid. The [CLS] row only needs the layer's own query for token 0 and its keys:
``softmax(q_cls @ K^T * scale)`` per head, O(N) per layer. :class:`ClsAttentionRecorder`
captures both from forward hooks on the layer's ``q_proj`` / ``k_proj`` (their outputs are the
exact tensors the attention kernel consumes), so the tower keeps its attention backend and no
projection is recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["cls_attention_row", "ClsAttentionRecorder"]


def cls_attention_row(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Attention paid by token 0 to every token, summed over heads.

    ``q_cls``: (B, D) query of token 0; ``keys``: (B, N, D), D = heads x head_dim. Returns
    (B, N) float32: per head ``softmax(q_h . k_h * scale)`` over the N keys, summed over heads.
    """
    b, n, d = keys.shape
    head_dim = d // num_heads
    q = q_cls.float().view(b, num_heads, 1, head_dim)
    k = keys.float().view(b, n, num_heads, head_dim).transpose(1, 2)  # (B, H, N, hd)
    logits = (q @ k.transpose(-1, -2)).squeeze(-2) * scale  # (B, H, N)
    return logits.softmax(-1).sum(1)


class ClsAttentionRecorder:
    """Records the [CLS] attention row of chosen layers while :attr:`active` is True.

    ``attentions`` are the tower's attention modules (each with ``q_proj``, ``k_proj``,
    ``num_heads``, ``scale``); ``layers`` the indices to record. After a forward,
    ``scores[i]`` is the (B, N) row of layer ``i`` (heads summed). Hooks are returned by
    :meth:`install` for the caller's :class:`~mmaccel.runtime.patching.PatchHandle` to own.
    """

    def __init__(self, attentions: Sequence[nn.Module], layers: Sequence[int]) -> None:
        self.attentions = attentions
        self.layers = sorted(set(layers))
        self.active = False
        self.scores: dict[int, torch.Tensor] = {}
        self._pending: dict[int, dict[str, torch.Tensor]] = {}

    def install(self) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for i in self.layers:
            attn = self.attentions[i]
            handles.append(attn.q_proj.register_forward_hook(self._hook(i, "q")))
            handles.append(attn.k_proj.register_forward_hook(self._hook(i, "k")))
        return handles

    def reset(self) -> None:
        self.scores = {}
        self._pending = {}

    def _hook(self, layer: int, kind: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self.active:
                return
            pending = self._pending.setdefault(layer, {})
            # Only the [CLS] query is needed; keep the keys (already computed) until q arrives.
            pending[kind] = output[:, 0] if kind == "q" else output
            if "q" in pending and "k" in pending:
                attn = self.attentions[layer]
                self.scores[layer] = cls_attention_row(pending["q"], pending["k"], attn.num_heads, attn.scale)
                del self._pending[layer]

        return hook
