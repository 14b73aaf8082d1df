"""Block-sparse attention over (query cluster, key cluster) pairs.

Every backend takes Q (B, H, Sq, D), K/V (B, H, Sk, D) in their original token order, the
cluster labels of each token and ``selected`` (B, H, Cq, Ck): which key clusters each query
cluster attends to. A query whose row selects no non-empty key cluster outputs zeros.

* ``reference``: pure torch, one SDPA call per (batch, head, query cluster) over the gathered
  tokens of its selected key clusters. Exact; for tests and small sizes.
* ``masked``: one SDPA call with the token-level boolean mask; exact and vectorised, but
  O(Sq Sk) memory and no saving in compute, so only for small sizes (tiny models).
* ``flex``: permutes tokens so that each cluster is contiguous and padded to whole blocks
  (`PaddedLayout`), then runs ``torch.nn.attention.flex_attention`` under ``torch.compile``
  (compiled once per shape and cached) with a ``BlockMask`` in which a (query block, key block)
  pair is computed iff its clusters are selected, and un-permutes the output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "ClusterLayout",
    "PaddedLayout",
    "compiled_flex",
    "flex_attention_available",
    "flex_block_sparse",
    "flex_tiles",
    "masked_block_sparse",
    "reference_block_sparse",
]


@dataclass(frozen=True)
class ClusterLayout:
    """Cluster labels of the tokens, (B, H, Sq) and (B, H, Sk), and counts (B, H, Cq) / (B, H, Ck)."""

    q_labels: torch.Tensor
    k_labels: torch.Tensor
    q_counts: torch.Tensor
    k_counts: torch.Tensor


def reference_block_sparse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ClusterLayout, selected: torch.Tensor
) -> torch.Tensor:
    """Exact sparse attention: each query cluster attends to the tokens of its selected key clusters."""
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    b_, h_ = q.shape[:2]
    for b in range(b_):
        for h in range(h_):
            for i in torch.nonzero(layout.q_counts[b, h]).flatten().tolist():
                keys = selected[b, h, i][layout.k_labels[b, h]]  # (Sk,) bool: token-level key mask
                if not keys.any():
                    continue
                rows = torch.nonzero(layout.q_labels[b, h] == i).flatten()
                out[b, h, rows] = F.scaled_dot_product_attention(q[b, h, rows], k[b, h, keys], v[b, h, keys])
    return out


def masked_block_sparse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ClusterLayout, selected: torch.Tensor
) -> torch.Tensor:
    """Exact sparse attention as dense SDPA under the token-level mask ``selected[lq, lk]``."""
    b, h = q.shape[:2]
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    hi = torch.arange(h, device=q.device).view(1, h, 1, 1)
    mask = selected[bi, hi, layout.q_labels.unsqueeze(-1), layout.k_labels.unsqueeze(-2)]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # rows with no key: zeros, not NaN


@functools.cache
def flex_attention_available() -> bool:
    """True when this torch ships ``flex_attention`` and ``torch.compile`` can run."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch, "compile")


@functools.cache
def compiled_flex():
    """``flex_attention`` under ``torch.compile(dynamic=False)``, built once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class PaddedLayout:
    """Every cluster padded to a multiple of ``block`` tokens, so each block holds one cluster.

    ``length`` is a fixed upper bound, ``ceil((S + C (block - 1)) / block) * block``, so the
    compiled kernel sees one shape per (S, C, block) whatever the cluster sizes; the tail past
    the last cluster is padding. ``positions`` (N, S): padded slot of each token (clusters in
    label order, tokens in their original order within a cluster);
    ``block_cluster`` (N, nblocks): cluster of each block (C for tail blocks); ``valid`` (N, length).
    """

    def __init__(self, labels: torch.Tensor, counts: torch.Tensor, block: int) -> None:
        n, c = counts.shape
        s = labels.shape[1]
        self.length = -(-(s + c * (block - 1)) // block) * block
        padded = -(-counts // block) * block
        order = labels.argsort(dim=-1, stable=True)  # the permutation making clusters contiguous
        sorted_labels = labels.gather(1, order)
        rank = torch.arange(s, device=labels.device) - (counts.cumsum(-1) - counts).gather(1, sorted_labels)
        slots = (padded.cumsum(-1) - padded).gather(1, sorted_labels) + rank
        self.positions = torch.empty_like(slots).scatter_(1, order, slots)  # token -> padded slot
        block_starts = torch.arange(0, self.length, block, device=labels.device).expand(n, -1).contiguous()
        self.block_cluster = torch.searchsorted(padded.cumsum(-1), block_starts, right=True)
        self.valid = torch.zeros(n, self.length, dtype=torch.bool, device=labels.device)
        self.valid.scatter_(1, self.positions, True)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Permute (N, S, D) tokens into their (N, length, D) padded slots; padding is zero."""
        out = x.new_zeros(x.shape[0], self.length, x.shape[-1])
        return out.scatter_(1, self.positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `scatter`: (N, length, D) -> (N, S, D) in the original token order."""
        return torch.gather(x, 1, self.positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def flex_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ClusterLayout,
    selected: torch.Tensor,
    block: int,
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """Sparse attention with compiled ``flex_attention``; returns the output and the computed
    fraction ``(blocks x block^2) / (Sq Sk)`` (padding included; a 0-dim tensor when traced).

    Q and K/V clusters are padded to multiples of ``block`` (`PaddedLayout`), so a block pair is
    selected or not as a whole: blocks without key padding are *full* (no masking), a cluster's
    last key block, when it holds padding, is *partial* with the cheap mask ``valid[kv]``.
    Padded query rows are computed and dropped.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, h, sq, d = q.shape
    sk = k.shape[2]
    n = b * h
    pq = PaddedLayout(layout.q_labels.reshape(n, sq), layout.q_counts.reshape(n, -1), block)
    pk = PaddedLayout(layout.k_labels.reshape(n, sk), layout.k_counts.reshape(n, -1), block)
    sel = F.pad(selected.reshape(n, *selected.shape[2:]), (0, 1, 0, 1))  # tail cluster: never selected
    rows = torch.arange(n, device=q.device).view(n, 1, 1)
    pairs = sel[rows, pq.block_cluster.unsqueeze(-1), pk.block_cluster.unsqueeze(-2)]  # (N, nq, nk)
    kv_full = pk.valid.view(n, -1, block).all(-1)  # (N, nk): key block without padding
    full = (pairs & kv_full.unsqueeze(1)).view(b, h, *pairs.shape[1:])
    partial = (pairs & ~kv_full.unsqueeze(1)).view(b, h, *pairs.shape[1:])
    valid = pk.valid.view(b, h, -1)

    def mask_mod(b, h, q_idx, kv_idx):
        return valid[b, h, kv_idx]

    num, idx = _to_kv_blocks(partial)
    full_num, full_idx = _to_kv_blocks(full)
    block_mask = BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(pq.length, pk.length)
    )
    qp = pq.scatter(q.reshape(n, sq, d)).view(b, h, pq.length, d)
    kp = pk.scatter(k.reshape(n, sk, d)).view(b, h, pk.length, d)
    vp = pk.scatter(v.reshape(n, sk, -1)).view(b, h, pk.length, -1)
    out = compiled_flex()(qp, kp, vp, block_mask=block_mask, kernel_options=flex_tiles(block, q.device))
    out = pq.gather(out.reshape(n, pq.length, -1)).view(b, h, sq, -1)
    computed = (num + full_num).sum() * (block * block / (n * sq * sk))
    return out, computed if torch.compiler.is_compiling() else computed.item()  # a tensor when compiled


def flex_tiles(block: int, device: torch.device) -> dict[str, int] | None:
    """Triton tile sizes that divide a ``block``-token BlockMask on CUDA: inductor's default tiles
    (128 x 64 on Hopper) refuse smaller blocks ("Q and KV block size must be divisible by BLOCK_M
    and BLOCK_N"); ``None`` (its own choice) from 128 up and off CUDA."""
    if device.type != "cuda" or block >= 128:
        return None
    return {"BLOCK_M": block, "BLOCK_N": min(block, 64)}


def _to_kv_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx.contiguous()


BACKENDS = ("auto", "flex", "masked", "reference")
