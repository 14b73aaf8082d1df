"""Ranks: process-group setup and the communication helpers every parallel module uses.

:func:`init_distributed` reads the environment that ``torchrun`` and ``accelerate launch`` set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and returns a
:class:`DistContext`. With world size 1 there is no process group at all and every helper
degenerates to the single-process case, so parallel code paths also run (and are tested) on one
process.

Helpers: :func:`exchange_neighbours` (halo exchange with ranks ``r - 1`` and ``r + 1``),
:func:`all_gather_varlen` and :func:`gather_to_main` (tensors whose first dim differs per rank),
and :class:`PipeChannel` (fixed-shape pipeline stream with preallocated receive buffers).

Nothing waits forever: every wait is bounded by ``DistContext.timeout_s`` and a failure surfaces
as :class:`CommError` naming the rank, the operation and the peer. Wrap each rank's work in
``with ctx.guard():`` so that an exception on any rank aborts the group and exits non-zero, which
makes the launcher tear the other ranks down.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CommError",
    "CommHandle",
    "DistContext",
    "PipeChannel",
    "all_gather_varlen",
    "destroy_distributed",
    "exchange_neighbours",
    "exchange_neighbours_async",
    "gather_to_main",
    "init_distributed",
]

_BACKENDS = ("gloo", "nccl")
_MAX_NDIM = 8  # dims exchanged by the shape handshake of the variable-length gathers
_ABORT_GRACE_S = 10.0  # longest the abort path waits for the group to shut down

T = TypeVar("T")


class CommError(RuntimeError):
    """A collective or point-to-point operation failed or timed out; the group is unusable."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank, the group, the device it computes on.

    ``group`` is ``None`` when ``world_size == 1``: no process group exists and every helper
    takes its single-process path. ``backend`` is ``None`` in that case too.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: dist.ProcessGroup | None
    backend: str | None
    timeout_s: float

    @classmethod
    def single(cls, device: torch.device | str = "cpu", timeout_s: float = 120.0) -> DistContext:
        """A one-process context on ``device`` (no process group), whatever the environment says:
        every helper takes its single-process path. For tests and single-device runs."""
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from exc
        return cls(0, 1, 0, device, None, None, float(timeout_s))

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs, saves and receives :func:`gather_to_main`."""
        return self.rank == 0

    @contextmanager
    def guard(self, command: str = "mmaccel", hint: str | None = None) -> Iterator[DistContext]:
        """Run a rank's work so that any exception brings the whole group down.

        ``command`` prefixes the one-line reports (``mmaccel video: error: ...``); ``hint`` is
        added to the one line a lost peer (:class:`CommError`) prints, e.g. the resume command.

        On an exception the traceback and a one-line summary go to stderr, the process group is
        destroyed (waiting at most ``min(timeout_s, 10)`` seconds) and the process exits with
        status 1, so ``torchrun`` terminates the other ranks and the peers blocked in a collective
        fail fast instead of waiting for their timeout. With world size 1 the exception simply
        propagates.
        """
        try:
            yield self
        except Exception as exc:
            if self.group is None:
                raise
            _abort(self, exc, command, hint)


def init_distributed(backend: str | None = None, timeout_s: float = 120.0) -> DistContext:
    """Join the process group described by the launcher's environment, or run single-process.

    ``backend`` defaults to NCCL when CUDA is available (the CUDA device is then set to
    ``LOCAL_RANK``) and gloo otherwise. Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) no group
    is created. An already initialised default group is reused as is. ``timeout_s`` bounds the
    rendezvous, every collective and every wait in this module.
    """
    if backend not in (None, *_BACKENDS):
        raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {backend!r}")
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not (math.isfinite(timeout_s) and timeout_s > 0)
    ):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, but torch.cuda.is_available() is False")
    timeout_s = float(timeout_s)

    if dist.is_available() and dist.is_initialized():
        existing = dist.get_backend()
        if backend is not None and backend not in existing:
            raise ValueError(f"backend={backend!r}, but the process group already uses {existing!r}")
        rank = dist.get_rank()
        local_rank = _env_int("LOCAL_RANK", rank)
        return DistContext(
            rank=rank,
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            device=_pick_device("nccl" in existing, local_rank),
            group=dist.group.WORLD,
            backend=existing,
            timeout_s=timeout_s,
        )

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid launcher environment: RANK={rank}, WORLD_SIZE={world_size}")
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = _pick_device(chosen == "nccl", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistContext(0, 1, local_rank, device, None, None, timeout_s)

    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; "
            "launch with torchrun or accelerate launch"
        )
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(
            chosen,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    except Exception as exc:
        raise CommError(
            f"rank {rank}: joining the {world_size}-rank {chosen} group at {address} failed "
            f"(timeout {timeout_s:g}s): {_first_line(exc)}"
        ) from exc
    return DistContext(rank, world_size, local_rank, device, dist.group.WORLD, chosen, timeout_s)


def destroy_distributed(ctx: DistContext) -> None:
    """Destroy the process group (a no-op for world size 1 or when it is already gone)."""
    if ctx.group is not None and dist.is_initialized():
        dist.destroy_process_group()


class CommHandle(Generic[T]):
    """Communication in flight. ``wait()`` blocks (at most ``timeout_s``) and returns the result.

    Overlap compute with communication by doing the work between posting and ``wait()``.
    Waiting again returns the same result immediately.
    """

    def __init__(self, ctx: DistContext, works: Sequence[dist.Work], what: str, result: T) -> None:
        self._ctx = ctx
        self._works = list(works)
        self._what = what
        self._result = result

    def wait(self) -> T:
        if self._works:
            _wait(self._ctx, self._works, self._what)
            self._works = []
        return self._result


def exchange_neighbours_async(
    ctx: DistContext,
    send_left: Tensor | None,
    send_right: Tensor | None,
    *,
    recv_left: Tensor | None = None,
    recv_right: Tensor | None = None,
    tag: int = 0,
) -> CommHandle[tuple[Tensor | None, Tensor | None]]:
    """Post a halo exchange with ranks ``rank - 1`` (left) and ``rank + 1`` (right).

    ``send_left`` goes to the left neighbour, which receives it as its ``from_right``;
    ``send_right`` goes to the right neighbour as its ``from_left``. ``wait()`` returns
    ``(from_left, from_right)``; rank 0 has no left neighbour and the last rank no right one, so
    those entries are ``None`` (as are both with world size 1).

    Call it the same way on every rank: a direction carries data when its tensor is not ``None``.
    A rank receives ``from_left`` shaped like its own ``send_right`` and ``from_right`` shaped like
    its own ``send_left`` (so the edge ranks pass the outward tensor too; it is not sent, it only
    describes what arrives). When neighbours send differently shaped tensors, or to receive into
    preallocated memory, pass ``recv_left`` / ``recv_right`` buffers; they are filled and returned.
    Sent tensors must not be modified before ``wait()`` returns.
    """
    left = ctx.rank - 1 if ctx.rank > 0 else None
    right = ctx.rank + 1 if ctx.rank < ctx.world_size - 1 else None
    from_left = _recv_buffer(recv_left, send_right, "recv_left") if left is not None else None
    from_right = _recv_buffer(recv_right, send_left, "recv_right") if right is not None else None

    ops: list[dist.P2POp] = []
    for peer, outgoing, incoming in ((left, send_left, from_left), (right, send_right, from_right)):
        if peer is None:
            continue
        if outgoing is not None:
            ops.append(dist.P2POp(dist.isend, outgoing.contiguous(), peer, ctx.group, tag))
        if incoming is not None:
            ops.append(dist.P2POp(dist.irecv, incoming, peer, ctx.group, tag))
    peers = " and ".join(f"rank {p}" for p in (left, right) if p is not None)
    what = f"neighbour exchange with {peers}"
    works: list[dist.Work] = []
    if ops:
        with _comm_errors(ctx, what):
            works = dist.batch_isend_irecv(ops)
    return CommHandle(ctx, works, what, (from_left, from_right))


def exchange_neighbours(
    ctx: DistContext,
    send_left: Tensor | None,
    send_right: Tensor | None,
    *,
    recv_left: Tensor | None = None,
    recv_right: Tensor | None = None,
    tag: int = 0,
) -> tuple[Tensor | None, Tensor | None]:
    """Blocking :func:`exchange_neighbours_async`: returns ``(from_left, from_right)``."""
    return exchange_neighbours_async(
        ctx, send_left, send_right, recv_left=recv_left, recv_right=recv_right, tag=tag
    ).wait()


def all_gather_varlen(ctx: DistContext, tensor: Tensor) -> list[Tensor]:
    """Every rank's ``tensor``, in rank order, on every rank; first dims may differ per rank.

    All other dims and the dtype must match across ranks (checked on every rank, so a mismatch
    raises the same ``ValueError`` everywhere instead of hanging). With world size 1 the result
    is ``[tensor]`` (the input itself, not a copy).
    """
    if ctx.group is None:
        return [tensor]
    lengths = _exchange_shapes(ctx, tensor, "all_gather_varlen")
    padded, buffers = _padded(ctx, tensor, max(lengths), ctx.world_size)
    with _comm_errors(ctx, "all_gather_varlen"):
        work = dist.all_gather(buffers, padded, group=ctx.group, async_op=True)
    _wait(ctx, [work], "all_gather_varlen")
    return [buffer[:length].to(tensor.device) for buffer, length in zip(buffers, lengths)]


def gather_to_main(ctx: DistContext, tensor: Tensor) -> list[Tensor] | None:
    """Rank 0 gets every rank's ``tensor`` in rank order, the other ranks ``None``.

    Same rules as :func:`all_gather_varlen`: the first dim may differ per rank, the rest must
    match. With world size 1 the result is ``[tensor]``. A tensor on another device than
    ``ctx.device`` (frames on the CPU under NCCL) travels through ``ctx.device`` and comes back
    on its own device.
    """
    if ctx.group is None:
        return [tensor]
    lengths = _exchange_shapes(ctx, tensor, "gather_to_main")
    padded, buffers = _padded(ctx, tensor, max(lengths), ctx.world_size if ctx.is_main else 0)
    with _comm_errors(ctx, "gather_to_main"):
        work = dist.gather(
            padded, gather_list=buffers if ctx.is_main else None, dst=0, group=ctx.group, async_op=True
        )
    _wait(ctx, [work], "gather_to_main")
    if not ctx.is_main:
        return None
    return [buffer[:length].to(tensor.device) for buffer, length in zip(buffers, lengths)]


class PipeChannel:
    """Fixed-shape tensor stream from each rank to the next: the hand-off between pipeline stages.

    Rank ``r`` sends to ``r + 1`` and receives from ``r - 1``; with ``ring=True`` the last rank
    also sends to rank 0 (e.g. a finished block going back for its next denoising step). Every
    rank must build the channel with the same ``shape``, ``dtype`` and ``tag``; use distinct
    tags for channels whose messages may interleave.

    Receives land in ``num_buffers`` buffers allocated once on ``ctx.device`` and used
    round-robin. :meth:`recv_prev` returns the buffer itself, not a copy: it stays valid until
    ``num_buffers`` further receives have been posted, so clone it to keep it longer. With
    ``num_buffers=2`` the next receive can be posted while the current buffer is being computed
    on. Sent tensors are not copied and must not be modified before the send completes.

    In a ring every rank sends and receives, so post the receive (or the send) asynchronously
    before blocking on the other, or the ranks wait on each other. With world size 1 a ring
    channel loops back to the same process.
    """

    def __init__(
        self,
        ctx: DistContext,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        *,
        ring: bool = False,
        num_buffers: int = 2,
        tag: int = 0,
    ) -> None:
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"shape must be a sequence of non-negative ints, got {tuple(shape)!r}")
        if isinstance(num_buffers, bool) or not isinstance(num_buffers, int) or num_buffers < 1:
            raise ValueError(f"num_buffers must be an int >= 1, got {num_buffers!r}")
        last = ctx.world_size - 1
        self.ctx = ctx
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.tag = tag
        self.next_rank: int | None = ctx.rank + 1 if ctx.rank < last else (0 if ring else None)
        self.prev_rank: int | None = ctx.rank - 1 if ctx.rank > 0 else (last if ring else None)
        self._buffers = [torch.empty(self.shape, dtype=dtype, device=ctx.device) for _ in range(num_buffers)]
        self._slot = 0
        self._loopback: deque[Tensor] = deque()

    def send_next_async(self, tensor: Tensor) -> CommHandle[None]:
        """Post a send of ``tensor`` to the next rank; ``wait()`` on the handle completes it."""
        if self.next_rank is None:
            raise RuntimeError(f"rank {self.ctx.rank} is the last pipeline stage: no next rank (ring=False)")
        if tensor.shape != self.shape or tensor.dtype != self.dtype or tensor.device != self.ctx.device:
            raise ValueError(
                f"PipeChannel expects {tuple(self.shape)} {self.dtype} on {self.ctx.device}, "
                f"got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
            )
        if self.next_rank == self.ctx.rank:
            if len(self._loopback) == len(self._buffers):
                raise RuntimeError(f"single-process ring: more than {len(self._buffers)} sends not received")
            self._loopback.append(self._take_buffer().copy_(tensor))
            return CommHandle(self.ctx, [], "", None)
        what = f"pipeline send to rank {self.next_rank}"
        with _comm_errors(self.ctx, what):
            work = dist.isend(tensor.contiguous(), self.next_rank, group=self.ctx.group, tag=self.tag)
        return CommHandle(self.ctx, [work], what, None)

    def recv_prev_async(self) -> CommHandle[Tensor]:
        """Post a receive from the previous rank; ``wait()`` returns the filled buffer."""
        if self.prev_rank is None:
            raise RuntimeError(
                f"rank {self.ctx.rank} is the first pipeline stage: no previous rank (ring=False)"
            )
        if self.prev_rank == self.ctx.rank:
            if not self._loopback:
                raise RuntimeError("single-process ring: receive posted before any send")
            return CommHandle(self.ctx, [], "", self._loopback.popleft())
        buffer = self._take_buffer()
        what = f"pipeline receive from rank {self.prev_rank}"
        with _comm_errors(self.ctx, what):
            work = dist.irecv(buffer, self.prev_rank, group=self.ctx.group, tag=self.tag)
        return CommHandle(self.ctx, [work], what, buffer)

    def send_next(self, tensor: Tensor) -> None:
        """Send ``tensor`` to the next rank and wait until the transfer completes."""
        self.send_next_async(tensor).wait()

    def recv_prev(self) -> Tensor:
        """Receive from the previous rank into the next preallocated buffer and return it."""
        return self.recv_prev_async().wait()

    def _take_buffer(self) -> Tensor:
        buffer = self._buffers[self._slot]
        self._slot = (self._slot + 1) % len(self._buffers)
        return buffer


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _pick_device(cuda: bool, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    # drop the C++ source location gloo puts first, e.g. "[/.../gloo/transport/tcp/pair.cc:553] "
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:300]}"


def _one_line(exc: BaseException) -> str:
    return "; ".join(part.strip() for part in str(exc).strip().splitlines() if part.strip()) or type(exc).__name__


def _comm_error(ctx: DistContext, what: str, elapsed: float, exc: BaseException) -> CommError:
    verb = "timed out" if elapsed >= 0.99 * ctx.timeout_s else "failed"
    return CommError(
        f"rank {ctx.rank}: {what} {verb} after {elapsed:.1f}s (timeout {ctx.timeout_s:g}s); "
        f"a peer process probably died or hung, so the group is unusable and must be aborted "
        f"(ctx.guard() does this). Cause: {_first_line(exc)}"
    )


@contextmanager
def _comm_errors(ctx: DistContext, what: str) -> Iterator[None]:
    """Turn a failure while posting communication into a :class:`CommError`."""
    start = time.monotonic()
    try:
        yield
    except Exception as exc:
        raise _comm_error(ctx, what, time.monotonic() - start, exc) from exc


def _wait(ctx: DistContext, works: Sequence[dist.Work], what: str) -> None:
    """Wait for all ``works`` within one ``ctx.timeout_s`` deadline."""
    start = time.monotonic()
    deadline = start + ctx.timeout_s
    try:
        for work in works:
            # At least 1 ms: c10d reads a zero timeout as "no timeout" and would fall back to the group's.
            remaining = max(deadline - time.monotonic(), 1e-3)
            if work.wait(timeout=timedelta(seconds=remaining)) is False:
                raise TimeoutError("work still pending at the deadline")
    except Exception as exc:
        raise _comm_error(ctx, what, time.monotonic() - start, exc) from exc


def _exchange_shapes(ctx: DistContext, tensor: Tensor, what: str) -> list[int]:
    """All-gather every rank's dtype and shape, check they agree past dim 0, return the lengths."""
    meta = torch.full((2 + _MAX_NDIM,), -1, dtype=torch.int64)
    meta[0] = zlib.crc32(str(tensor.dtype).encode())
    meta[1] = tensor.dim()
    meta[2 : 2 + min(tensor.dim(), _MAX_NDIM)] = torch.tensor(tensor.shape[:_MAX_NDIM], dtype=torch.int64)
    meta = meta.to(ctx.device)
    gathered = [torch.empty_like(meta) for _ in range(ctx.world_size)]
    with _comm_errors(ctx, f"{what} shape handshake"):
        work = dist.all_gather(gathered, meta, group=ctx.group, async_op=True)
    _wait(ctx, [work], f"{what} shape handshake")
    rows = [row.tolist() for row in gathered]
    ndims = [row[1] for row in rows]
    if min(ndims) < 1 or max(ndims) > _MAX_NDIM:
        raise ValueError(f"{what} needs tensors with 1 to {_MAX_NDIM} dims; ranks have {ndims} dims")
    shapes = [tuple(row[2 : 2 + row[1]]) for row in rows]
    dtype_differs = any(row[0] != rows[0][0] for row in rows)
    if dtype_differs or any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(
            f"{what} needs the same dtype and trailing dims on every rank; got shapes {shapes}"
            + (" and different dtypes" if dtype_differs else "")
        )
    return [s[0] for s in shapes]


def _padded(ctx: DistContext, tensor: Tensor, length: int, count: int) -> tuple[Tensor, list[Tensor]]:
    """``tensor`` on ``ctx.device`` (NCCL moves CUDA tensors only), zero-padded along dim 0 to
    ``length``, and ``count`` receive buffers of that shape there."""
    shape = (length, *tensor.shape[1:])
    padded = tensor.to(ctx.device).contiguous()
    if tensor.shape[0] < length:
        padded = padded.new_zeros(shape)
        padded[: tensor.shape[0]] = tensor
    return padded, [padded.new_empty(shape) for _ in range(count)]


def _recv_buffer(buffer: Tensor | None, like: Tensor | None, name: str) -> Tensor | None:
    if buffer is None:
        return None if like is None else torch.empty_like(like, memory_format=torch.contiguous_format)
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor")
    return buffer


_REPORTED_KEY = "mmaccel/user_error_reported"
_REPORT_WAIT_S = 1.0
#: Exceptions that are the user's mistake: one line, no traceback, exit status 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def _first_to_report(ctx: DistContext) -> bool:
    """Whether this rank prints a user error, marking it in the launcher's store: rank 0 always;
    another rank only if no rank has marked one within ``_REPORT_WAIT_S`` (an error every rank
    hits is printed once; one that only this rank hits is still printed)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        deadline = time.monotonic() + (0 if ctx.is_main else _REPORT_WAIT_S)
        while time.monotonic() < deadline:
            if store.check([_REPORTED_KEY]):
                return False
            time.sleep(0.05)
        store.set(_REPORTED_KEY, str(ctx.rank))
    except Exception:  # no store (or it is gone): print rather than lose the message
        pass
    return True


def _peer_reported_user_error() -> bool:
    """Whether a peer already printed the user error that brought the group down."""
    try:
        return bool(dist.distributed_c10d._get_default_store().check([_REPORTED_KEY]))
    except Exception:
        return False


def _abort(ctx: DistContext, exc: Exception, command: str = "mmaccel", hint: str | None = None) -> NoReturn:
    """Report ``exc``, shut the group down within a bounded time, and exit.

    A user error (``ValueError``, ``TypeError``, ``FileNotFoundError``) is one line, printed once
    (see :func:`_first_to_report`), and exit status 2, as the CLI reports it; anything else prints
    its traceback on every rank and exits with status 1. A lost peer (:class:`CommError`) is one
    line per rank with ``hint``, exit status 1. ``MMACCEL_DEBUG=1`` treats both like the rest.
    """
    debug = bool(os.environ.get("MMACCEL_DEBUG"))
    user_error = isinstance(exc, USER_ERRORS) and not debug
    if user_error:
        if _first_to_report(ctx):
            where = "" if ctx.is_main else f" (rank {ctx.rank}/{ctx.world_size})"
            print(f"{command}: error{where}: {_one_line(exc)}", file=sys.stderr, flush=True)
    elif isinstance(exc, CommError) and _peer_reported_user_error():
        pass  # the group broke because a peer stopped on a user error, which it printed
    elif isinstance(exc, CommError) and not debug:
        print(f"{command}: error: {_one_line(exc)}" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
    else:
        traceback.print_exception(exc)
        print(
            f"[mmaccel] rank {ctx.rank}/{ctx.world_size}: {type(exc).__name__}: {exc}\n"
            f"[mmaccel] rank {ctx.rank}: aborting the process group and exiting with status 1",
            file=sys.stderr,
            flush=True,
        )
    sys.stdout.flush()

    def destroy() -> None:
        with suppress(Exception):  # the group is already broken; exiting is all that is left
            destroy_distributed(ctx)

    closer = threading.Thread(target=destroy, daemon=True)
    closer.start()
    closer.join(min(ctx.timeout_s, _ABORT_GRACE_S))
    os._exit(2 if user_error else 1)
