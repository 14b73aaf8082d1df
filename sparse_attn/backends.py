"""Block-sparse attention over (query cluster, key cluster) pairs.

Every backend takes Q (B, H, Sq, D), K/V (B, H, Sk, D) in their original token order, the
cluster labels of each token and ``selected`` (B, H, Cq, Ck): which key clusters each query
cluster attends to. A query whose row selects no non-empty key cluster outputs zeros.

* ``reference``: pure torch, one SDPA call per (batch, head, query cluster) over the gathered
  tokens of its selected key clusters. Exact; for tests and small sizes.
* ``masked``: one SDPA call with the token-level boolean mask; exact and vectorised, but
  O(Sq Sk) memory and no saving in compute, so only for small sizes (tiny models).
* ``flex``: permutes tokens so that each cluster is contiguous (`TileSide`), runs
  ``torch.nn.attention.flex_attention`` under ``torch.compile`` (compiled once per shape and
  cached) on hardware-sized tiles (128-token query tiles, 64- or 128-token key tiles) with a
  ``BlockMask`` in which a tile is computed iff one of its cluster pairs is selected, and
  un-permutes the output. Everything runs on the device: no host read, no data-dependent loop.
  Two layouts: ``"unpadded"`` (tokens sorted by cluster; a tile spanning several clusters is
  *full* when all its cluster pairs are selected, else *partial* with the token-label mask
  ``selected[label_q, label_k]``) and ``"padded"`` (every cluster padded to whole tiles, so a tile
  holds one cluster; only a key tile with padding is partial, and its mask only drops the
  padding). The ``"tiles"`` layout of `SVG2Config` is the unpadded kernel run on tile groups
  (`mmaccel.sparse_attn.tile_select`): one group per tile, so every tile is full but a short
  last one.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "FLEX_KERNELS",
    "FLEX_RECOMPILE_LIMIT",
    "LAYOUTS",
    "ClusterLayout",
    "TileSide",
    "compiled_flex",
    "flash_kernel_available",
    "flex_attention_available",
    "flex_block_sparse",
    "flex_kernel_options",
    "masked_block_sparse",
    "reference_block_sparse",
    "tile_selection",
]

BACKENDS = ("auto", "flex", "masked", "reference")
LAYOUTS = ("unpadded", "padded", "tiles")
FLEX_KERNELS = ("triton", "flash")


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
def flash_kernel_available() -> bool:
    """True when flex_attention's FLASH backend can run: the ``flash-attn-4`` wheel
    (``flash_attn.cute``) is installed and CUDA is available."""
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:
        found = False
    return found and torch.cuda.is_available()


#: compiled variants of ``flex_attention`` (shapes, tiles, mask functions) a process may hold
FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def compiled_flex() -> Callable[..., torch.Tensor]:
    """``flex_attention`` under ``torch.compile(dynamic=False)``, built once per process.

    Never falls back to eager ``flex_attention`` silently: that one applies only ``mask_mod`` and
    ignores the BlockMask's block selection, where the padded layout keeps SVG2's cluster
    selection. A call outside a compiled region may compile up to `FLEX_RECOMPILE_LIMIT` variants
    (or dynamo's ``recompile_limit`` if higher); one more raises ``RuntimeError``. Inside a compiled
    region the kernel is part of the caller's graph."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return compiled(*args, **kwargs)
        limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
        try:
            with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
                return compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as err:
            raise RuntimeError(
                f"flex_attention has been compiled for {limit} different shapes or masks in this process, "
                "dynamo's recompile limit; eager flex_attention would ignore the block selection. Raise "
                "torch._dynamo.config.recompile_limit, or torch._dynamo.reset() between unrelated models"
            ) from err

    return call


class TileSide:
    """One side (queries or keys) of the tiled layout: tokens sorted by cluster into ``length``
    slots per row, grouped ``block`` at a time into tiles. All on the device, static shapes.

    The permutation is kept as flat row indices over the ``N`` rows: ``rows_in`` (N length,): the
    token row (``n S + t``) each slot reads (an empty slot reads its row's token 0: it is masked
    (keys) or computed and dropped (queries)), ``rows_out`` (N S,): the slot row (``n length +
    j``) of each token; `scatter` / `gather` are one row ``index_select`` each. ``positions`` (N,
    S) / ``tokens`` (N, length) are the same maps per row. ``lo`` / ``hi`` (N, tiles): the range
    of clusters a tile's tokens belong to (C for a tail tile). ``clean`` (N, tiles): the tile holds
    no empty slot that the mask drops. ``valid`` (N, length): the slot holds a token (the padded
    kernel's mask). ``mask_labels`` (N, length): the label the token-level mask reads per slot, C
    for dropped empty slots (the unpadded kernel's mask; built on request in the padded layout).

    * ``padded=False``: clusters contiguous in label order, no gaps; ``length = ceil(S / block)
      * block``, the tail slots empty.
    * ``padded=True``: each cluster padded to whole tiles (one cluster per tile, ``lo == hi``),
      ``length`` the fixed bound ``ceil((S + C (block - 1)) / block) * block``. ``pad_mask`` says
      whether the padding slots are masked (keys) or computed and dropped (queries, label = their
      cluster). ``fill_end`` (N, tiles): the slot where the tile's cluster's tokens end and its
      padding starts (-1 for a tail tile).
    """

    def __init__(
        self, labels: torch.Tensor, counts: torch.Tensor, block: int, padded: bool, pad_mask: bool = True
    ) -> None:
        n, c = counts.shape
        s = labels.shape[1]
        dev = labels.device
        self.block, self.padded, self.pad_mask = block, padded, pad_mask
        self.num_rows, self.num_clusters, self.num_tokens = n, c, s
        self.length = -(-(s + c * (block - 1)) // block) * block if padded else -(-s // block) * block
        row = torch.arange(n, device=dev).unsqueeze(1)
        sorted_labels, order = labels.sort(dim=-1, stable=True)  # per row (a flat 1-D sort is ~300x slower on CPU)
        order = (order + row * s).view(-1)  # flat token rows in slot order
        slot_counts = -(-counts // block) * block if padded else counts
        slot_end = slot_counts.cumsum(-1)
        first_slot = slot_end - slot_counts  # (N, C): slot of each cluster's first token in its row
        shift = first_slot + row * self.length - (counts.cumsum(-1) - counts)  # flat slot - sorted index in the row
        slots = (torch.arange(s, device=dev) + shift.gather(1, sorted_labels)).view(-1)
        empty = (row * s).expand(n, self.length).contiguous().view(-1)  # an empty slot reads its row's token 0
        self.rows_in = empty.scatter_(0, slots, order)
        self.rows_out = torch.empty_like(order).scatter_(0, order, slots)
        if padded:  # a tile's cluster = the clusters ending at or before its start (C: tail tile), as a
            # cumulative count (torch.searchsorted costs ~1000x more on these small CPU tensors)
            tiles = self.length // block
            ends = torch.zeros(n, tiles + 1, dtype=counts.dtype, device=dev)
            ends.scatter_add_(1, slot_end // block, torch.ones_like(slot_end))
            self.lo = self.hi = ends.cumsum(-1)[:, :tiles]
            filled_end = F.pad(first_slot + counts, (0, 1), value=-1)  # the tail cluster C: no token
            self.fill_end = filled_end.gather(1, self.lo)
            starts = torch.arange(0, self.length, block, device=dev)
            self.clean = starts + block <= self.fill_end if pad_mask else self.lo < c
            self._mask_labels = None
        else:
            self._mask_labels = F.pad(sorted_labels, (0, self.length - s), value=c)
            self.lo, self.hi = self._mask_labels[:, ::block], self._mask_labels[:, block - 1 :: block]
            self.clean = self.hi < c
        self._valid = None

    @property
    def positions(self) -> torch.Tensor:
        """(N, S): slot of each token in its row."""
        n = self.num_rows
        return self.rows_out.view(n, -1) - torch.arange(n, device=self.rows_out.device).unsqueeze(1) * self.length

    @property
    def tokens(self) -> torch.Tensor:
        """(N, length): token read by each slot of its row (0 for an empty slot)."""
        n = self.num_rows
        return self.rows_in.view(n, -1) - torch.arange(n, device=self.rows_in.device).unsqueeze(1) * self.num_tokens

    @property
    def valid(self) -> torch.Tensor:
        """(N, length) bool: the slot holds a token (one comparison; built on first use, then kept)."""
        if self._valid is None:
            slot = torch.arange(self.length, device=self.rows_in.device)
            if self.padded:  # one cluster per tile: its tokens first, then its padding
                valid = slot.view(-1, self.block) < self.fill_end.unsqueeze(-1)
            else:
                valid = (slot < self.num_tokens).expand(self.num_rows, -1)
            self._valid = valid.reshape(self.num_rows, self.length)
        return self._valid

    @property
    def mask_labels(self) -> torch.Tensor:
        """(N, length) label per slot that the token-level mask reads (C for dropped empty slots)."""
        if self._mask_labels is None:
            slot_cluster = self.lo.repeat_interleave(self.block, dim=1)
            return slot_cluster.masked_fill(~self.valid, self.num_clusters) if self.pad_mask else slot_cluster
        return self._mask_labels

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Permute (N, S, D) tokens into their (N, length, D) slots (one row gather)."""
        n, s, d = x.shape
        return x.reshape(n * s, d).index_select(0, self.rows_in).view(n, self.length, d)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `scatter`: (N, length, D) -> (N, S, D) in the original token order."""
        n, length, d = x.shape
        return x.reshape(n * length, d).index_select(0, self.rows_out).view(n, -1, d)


def tile_selection(
    selected: torch.Tensor, qs: TileSide, ks: TileSide, one_group_per_tile: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` (N, q tiles, k tiles) bool from ``selected`` (N, Cq, Ck).

    A tile is computed when any (query cluster, key cluster) pair of its cluster ranges is
    selected, and *full* (no token mask) when every pair is and neither side holds an empty
    slot. The pair counts come from a 2-D prefix sum over ``selected``: O(1) per tile, no loop.
    When every tile holds one cluster (both sides padded, or ``one_group_per_tile``: the caller
    guarantees it, as the tiles layout's groups do) a single lookup of its pair.
    """
    n, cq, ck = selected.shape
    if (qs.padded and ks.padded) or one_group_per_tile:
        table = F.pad(selected, (0, 1, 0, 1)).view(n, -1)  # the tail cluster C: never selected
        pair = qs.lo.unsqueeze(-1) * (ck + 1) + ks.lo.unsqueeze(-2)
        computed = table.gather(1, pair.view(n, -1)).view(pair.shape)
        full = computed & qs.clean.unsqueeze(-1) & ks.clean.unsqueeze(-2)
        return computed & ~full, full
    prefix = torch.zeros(n, cq + 2, ck + 2, dtype=torch.int32, device=selected.device)
    prefix[:, 1:-1, 1:-1] = selected.to(torch.int32).cumsum(1).cumsum(2)
    prefix[:, -1, 1:-1] = prefix[:, -2, 1:-1]  # the tail cluster C: a row / column never selected
    prefix[:, :, -1] = prefix[:, :, -2]
    flat, width = prefix.view(n, -1), ck + 2
    r0, r1 = qs.lo.unsqueeze(-1), qs.hi.unsqueeze(-1) + 1
    c0, c1 = ks.lo.unsqueeze(-2), ks.hi.unsqueeze(-2) + 1

    def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        idx = (r * width + c).expand(-1, r0.shape[1], c0.shape[2])
        return flat.gather(1, idx.reshape(n, -1)).view(idx.shape)

    count = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    area = (r1 - r0) * (c1 - c0)
    any_pair = count > 0
    full = any_pair & (count == area) & qs.clean.unsqueeze(-1) & ks.clean.unsqueeze(-2)
    return any_pair & ~full, full


def flex_kernel_options(
    q_block: int, kv_block: int, device: torch.device, kernel: str = "triton"
) -> dict[str, object] | None:
    """``kernel_options`` for ``flex_attention``. Triton (CUDA): tiles that divide the BlockMask's
    blocks (inductor's Hopper default, 128 x 64, is kept whenever it divides them); None (its own
    choice) off CUDA. ``kernel="flash"``: flex's FLASH backend (the ``flash-attn-4`` wheel), which
    needs CUDA and 128 x 128 blocks on Hopper; anything else raises."""
    if kernel not in FLEX_KERNELS:
        raise ValueError(f"flex_kernel must be one of {FLEX_KERNELS}, got {kernel!r}")
    if kernel == "flash":
        if device.type != "cuda" or not flash_kernel_available():
            raise RuntimeError(
                "flex_kernel='flash' needs CUDA and the flash-attn-4 wheel (flash_attn.cute); "
                f"device {device}, flash_attn.cute {'found' if flash_kernel_available() else 'missing'}"
            )
        if (q_block, kv_block) != (128, 128):
            raise ValueError(f"flex_kernel='flash' needs q_block_size = kv_block_size = 128, got {q_block}, {kv_block}")
        return {"BACKEND": "FLASH"}
    if device.type != "cuda" or (q_block % 128 == 0 and kv_block % 64 == 0):
        return None
    return {"BLOCK_M": min(q_block, 128), "BLOCK_N": min(kv_block, 64)}


def _to_kv_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx.contiguous()


def flex_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ClusterLayout,
    selected: torch.Tensor,
    q_block: int = 128,
    kv_block: int = 64,
    padded: bool = False,
    kernel: str = "triton",
    one_group_per_tile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention with compiled ``flex_attention`` on ``q_block`` x ``kv_block`` tiles.

    ``one_group_per_tile`` (unpadded layout only): the labels are tile groups of exactly
    ``q_block`` / ``kv_block`` tokens but the last (`mmaccel.sparse_attn.tile_select`), so a tile's
    selection is one lookup and, when both lengths are multiples of the blocks, no tile is partial.
    Returns the output and the computed tile fraction ``(tiles x q_block x kv_block) / (Sq Sk)``
    as a 0-dim tensor (empty slots and unselected token pairs inside computed tiles included;
    no host read). Exact: each query attends to exactly the keys of its selected clusters.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, h, sq, d = q.shape
    sk = k.shape[2]
    n = b * h
    cq, ck = selected.shape[2:]
    qs = TileSide(layout.q_labels.reshape(n, sq), layout.q_counts.reshape(n, cq), q_block, padded, pad_mask=False)
    ks = TileSide(layout.k_labels.reshape(n, sk), layout.k_counts.reshape(n, ck), kv_block, padded)
    sel = selected.reshape(n, cq, ck)
    if one_group_per_tile and padded:
        raise ValueError("one_group_per_tile needs the unpadded layout (padded=False)")
    partial, full = tile_selection(sel, qs, ks, one_group_per_tile)
    if padded:  # a computed tile is one selected cluster pair: the mask only drops key padding
        kvalid = ks.valid.view(b, h, -1)  # a per-slot lookup: ~10% less kernel time than kv_idx < fill_end[tile]

        def mask_mod(b, h, q_idx, kv_idx):
            return kvalid[b, h, kv_idx]

    else:
        table = F.pad(sel, (0, 1, 0, 1)).view(b, h, cq + 1, ck + 1)  # label C: never selected
        qml, kml = qs.mask_labels.view(b, h, -1), ks.mask_labels.view(b, h, -1)

        def mask_mod(b, h, q_idx, kv_idx):
            return table[b, h, qml[b, h, q_idx], kml[b, h, kv_idx]]

    shape = (b, h, *partial.shape[1:])
    if one_group_per_tile and sq % q_block == 0 and sk % kv_block == 0:  # every tile full: no partial list
        num, idx = partial.new_zeros(shape[:-1], dtype=torch.int32), partial.new_zeros(shape, dtype=torch.int32)
    else:
        num, idx = _to_kv_blocks(partial.view(shape))
    full_num, full_idx = _to_kv_blocks(full.view(shape))
    block_mask = BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod,
        seq_lengths=(qs.length, ks.length), compute_q_blocks=False,
    )  # fmt: skip
    qp = qs.scatter(q.reshape(n, sq, d)).view(b, h, qs.length, d)
    kp = ks.scatter(k.reshape(n, sk, d)).view(b, h, ks.length, d)
    vp = ks.scatter(v.reshape(n, sk, -1)).view(b, h, ks.length, -1)
    options = flex_kernel_options(q_block, kv_block, q.device, kernel)
    out = compiled_flex()(qp, kp, vp, block_mask=block_mask, kernel_options=options)
    out = qs.gather(out.reshape(n, qs.length, -1)).view(b, h, sq, -1)
    computed = (num.sum(dtype=torch.float64) + full_num.sum(dtype=torch.float64)) * (q_block * kv_block / (n * sq * sk))
    return out, computed
