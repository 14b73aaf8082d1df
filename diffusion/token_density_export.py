"""``torch.export`` of token density under a schedule that reads the timestep (issue 32).

FlexDiT (Chang et al., arXiv:2412.06028) takes a token density per denoising step. Eagerly the
plan is picked on the host in the transformer's forward pre-hook; an exported program is traced
once, so there the decision becomes data:

- at export time, on the host, `plan_starts` enumerates the progress intervals over ``[0, 1]`` on
  which the plan stays the same (exactly, by bisection over floats on the schedule's monotone
  pieces, `mmaccel.runtime.budget.monotone_pieces`), at most `MAX_PLANS` of them;
- in the traced forward `progress_tensor` computes the progress from the timestep input with tensor
  ops (the formula and batch rule of `mmaccel.runtime.timesteps`), and `PlanChoice.run` selects each
  hooked block's plan with ``torch.cond`` (nested for more than two), every branch returning the
  block's full-size output. No branch reads a tensor value on the host.

The branches are traced with the ``cond`` operator itself (``torch.ops.higher_order.cond``), not
through ``torch.cond``'s dynamo pass: a token density block talks to its attention through shared
host state (`mmaccel.diffusion.token_density._Shared`), a side effect that dynamo refuses inside a
branch and that tracing runs once per branch, restoring it. The block's parameters and buffers are
the branches' operands (``torch.func``-style reparametrisation), as dynamo would lift them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["MAX_PLANS", "PlanChoice", "plan_starts", "progress_tensor"]

#: the most plans (progress intervals) one exported forward selects among; each is a branch per block
MAX_PLANS = 4


def _bits(p: float) -> int:
    """The IEEE-754 bits of a double >= 0 as an int: ordered like the doubles themselves."""
    return struct.unpack("<q", struct.pack("<d", p))[0]


def _double(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def plan_starts(key: Callable[[float], Hashable], pieces: tuple[float, ...], limit: int = MAX_PLANS) -> tuple[float, ...]:
    """The starts ``0 = s_0 < s_1 < ...`` of the maximal progress intervals ``[s_i, s_{i+1})`` (the
    last one closed at 1) on which ``key(progress)`` (a plan's identity) is the same.

    ``pieces`` are the starts of the intervals on which ``key`` is monotone (a monotone function of
    a schedule's keep ratio on `mmaccel.runtime.budget.monotone_pieces`): on each, every change of
    ``key`` is found by bisection over the doubles, so ``s_i`` is the first double at which the new
    key holds. More than ``limit`` intervals raise ``NotImplementedError``.
    """
    if not pieces or pieces[0] != 0.0:
        raise ValueError(f"pieces must start at progress 0.0, got {pieces!r}")
    starts: list[float] = []
    ends = (*pieces[1:], None)
    for lo, end in zip(pieces, ends):
        hi = 1.0 if end is None else _double(_bits(end) - 1)  # the last double of the piece
        a = lo
        if not starts or key(a) != key(starts[-1]):
            _append(starts, a, limit)
        while key(a) != key(hi):  # key(a) holds at a, not at hi: bisect for the first double where it stops
            i, j = _bits(a), _bits(hi)
            while j - i > 1:
                mid = (i + j) // 2
                if key(_double(mid)) == key(a):
                    i = mid
                else:
                    j = mid
            a = _double(j)
            _append(starts, a, limit)
    return tuple(starts)


def _append(starts: list[float], start: float, limit: int) -> None:
    if len(starts) == limit:
        raise NotImplementedError(
            f"the schedule gives more than {limit} different plans over progress [0, 1]; torch.export selects "
            f"among at most {limit} (one torch.cond branch each per hooked block): use a schedule with fewer "
            "steps, or reducer='pool' (one plan per pooling window)"
        )
    starts.append(start)


def progress_tensor(timestep: torch.Tensor, num_train_timesteps: int, source: str) -> torch.Tensor:
    """The forward's denoising progress as a 0-d float64 tensor, from the timestep input with tensor
    ops only: the timestep is the largest element (the noisiest sample of a per-sample or per-token
    timestep decides, `mmaccel.runtime.timesteps.read_timestep`), progress ``1 - t / num_train_timesteps``
    clamped to [0, 1] (`timestep_progress`), in float64 as the host computes it, so it is the same
    double. A value that is not a timestep fails an in-graph assertion (``RuntimeError``) when the
    program runs."""
    if not isinstance(timestep, torch.Tensor):
        raise NotImplementedError(
            f"torch.export of token density under a schedule that reads the timestep needs {source} to be a "
            f"tensor input of the forward, got {type(timestep).__name__}: an exported program would keep its value"
        )
    if timestep.numel() == 0:
        raise ValueError(f"{source} is an empty tensor")
    flat = timestep.detach().flatten().float()
    t = flat.amax().double()
    n = num_train_timesteps
    valid = (flat >= 0).all() & (t <= n)  # NaN fails both comparisons
    torch._assert_async(valid, f"{source} holds a value that is not a timestep in [0, {n}]")
    return (1.0 - t / n).clamp(0.0, 1.0)


@dataclass(frozen=True)
class PlanChoice:
    """One traced forward's plans, one per progress interval, and which holds.

    ``plans[i]`` holds from progress ``starts[i]`` on; ``preds[i]`` is the traced ``progress >=
    starts[i + 1]``. A plan is any object the block forward takes (None: dense).
    """

    preds: tuple[torch.Tensor, ...]
    plans: tuple[Any, ...]

    @classmethod
    def build(cls, progress: torch.Tensor, starts: tuple[float, ...], plans: tuple[Any, ...]) -> PlanChoice:
        if len(starts) != len(plans) or len(plans) < 2:
            raise ValueError(f"need one plan per interval start and at least 2, got {len(plans)} for {starts}")
        return cls(tuple(progress >= s for s in starts[1:]), plans)

    def run(
        self,
        module: torch.nn.Module,
        forward: Callable[[Any, tuple, dict], Any],
        args: tuple,
        kwargs: dict,
    ) -> Any:
        """``forward(plan, args, kwargs)`` of ``module`` under the plan that holds, as nested
        ``cond``s. Every branch must return the same structure of tensors (the block's full-size output)."""
        from torch._higher_order_ops.cond import cond_op  # private: imported only where an export needs it
        from torch.nn.utils.stateless import _reparametrize_module

        state = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        names = [name for name, _ in state]
        leaves, spec = pytree.tree_flatten((args, kwargs))
        where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        n_pred, n_state = len(self.preds), len(names)

        def branch(plan: Any) -> Callable[..., Any]:
            def run_plan(*operands: torch.Tensor) -> Any:
                rebuilt = list(leaves)
                for i, tensor in zip(where, operands[n_pred + n_state :]):
                    rebuilt[i] = tensor
                a, k = pytree.tree_unflatten(rebuilt, spec)
                with _reparametrize_module(module, dict(zip(names, operands[n_pred : n_pred + n_state]))):
                    return forward(plan, a, k)

            return run_plan

        def select(i: int) -> Callable[..., Any]:
            """The plans of intervals i, i + 1, ...: the traced predicates come in as operands."""
            if i == len(self.plans) - 1:
                return branch(self.plans[i])
            later, this = select(i + 1), branch(self.plans[i])
            return lambda *operands: cond_op(operands[i], later, this, operands)

        operands = (*self.preds, *(tensor for _, tensor in state), *(leaves[i] for i in where))
        return select(0)(*operands)
