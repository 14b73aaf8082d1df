"""The hot-path instrument itself: a toy with a known number of syncs, ops and graph breaks is
counted exactly (mmaccel.testing.hotpath)."""

from __future__ import annotations

import torch

from mmaccel.testing.hotpath import HotPathCounter, compile_counts, count_hot_path


def _toy(x: torch.Tensor) -> torch.Tensor:
    y = x * 2  # 1 op
    if y.sum() > 0:  # sum, gt: 2 ops; bool(): 1 sync (item)
        y = y + 1  # 1 op
    scale = float(x.max())  # max: 1 op; 1 sync (item)
    kept = x[x > 0]  # gt + index: 2 ops; 1 sync (bool_index)
    _ = torch.nonzero(x)  # 1 op; 1 sync (nonzero)
    _ = x.tolist()  # 1 sync (tolist), no op
    _ = x.cpu()  # 1 sync (cpu), no op
    return y * scale + kept.sum()  # mul, sum, add: 3 ops


def _free(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.0).view(2, 2).transpose(0, 1).sum(dim=0)


def test_toy_counted_exactly() -> None:
    x = torch.tensor([1.0, -2.0, 3.0, 4.0])
    count = count_hot_path(lambda: _toy(x))
    assert dict(count.sync_counts) == {"item": 2, "bool_index": 1, "nonzero": 1, "tolist": 1, "cpu": 1}
    assert count.syncs == 6
    assert count.ops == 13, count.op_counts  # 11 ops + the 2 value reads (a copy each)
    assert count.sync_sites == {"item test_hotpath.py:_toy": 2, "bool_index test_hotpath.py:_toy": 1,
                                "nonzero test_hotpath.py:_toy": 1, "tolist test_hotpath.py:_toy": 1,
                                "cpu test_hotpath.py:_toy": 1}  # fmt: skip


def test_sync_free_code_counts_zero_and_views_are_free() -> None:
    x = torch.randn(4)
    count = count_hot_path(lambda: _free(x))
    assert count.syncs == 0
    assert count.ops == 4, count.op_counts  # gt, scalar_tensor, where, sum; view and transpose are free
    assert count.summary() == {"syncs": 0, "ops": 4, "sync_kinds": {}}


def test_data_dependent_ops_are_syncs_and_static_forms_are_not() -> None:
    x, r = torch.arange(6.0), torch.tensor([1, 2])
    with HotPathCounter() as count:
        torch.repeat_interleave(r)
        torch.repeat_interleave(torch.arange(2), r, output_size=3)  # static size: no sync
        torch.nonzero_static(x > 2, size=6)  # static size: no sync
        torch.unique(x)
        torch.masked_select(x, x > 1)
        x.numpy()
    assert dict(count.sync_counts) == {"repeat_interleave": 1, "unique": 1, "masked_select": 1, "numpy": 1}


def test_patches_are_undone() -> None:
    before = (torch.Tensor.cpu, torch.Tensor.tolist, torch.cuda.synchronize)
    with HotPathCounter():
        pass
    assert (torch.Tensor.cpu, torch.Tensor.tolist, torch.cuda.synchronize) == before


def test_compile_counts_breaks_and_recompiles() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        y = x.sin()
        if y.sum().item() > 0:  # a graph break
            return y.cos()
        return y

    calls = [((torch.ones(4),), {})] * 3
    counts = compile_counts(broken, calls)
    assert counts.graph_breaks == 1 and counts.compiles >= 2
    assert len(counts.break_reasons) == 1

    def clean(x: torch.Tensor, n: int) -> torch.Tensor:
        return x * n

    # a Python int that changes each call: one graph, then one recompile with n dynamic
    steps = [((torch.ones(4), n), {}) for n in range(1, 6)]
    counts = compile_counts(clean, steps)
    assert counts.graph_breaks == 0 and counts.graphs == 1
    assert counts.compiles == 2
