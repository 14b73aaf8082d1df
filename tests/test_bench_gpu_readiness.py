"""`mmaccel bench gpu_readiness`: the instrument counts a toy technique exactly, the SVG2 tile
count is exact on a hand-made layout, and the quick benchmark measures every technique."""

from __future__ import annotations

import pytest
import torch

from mmaccel.benchmarks import bench_gpu_readiness as bench


class _Toy(torch.nn.Module):
    """A 'technique' with 2 syncs (item, nonzero), 3 ops more than dense and 1 graph break."""

    def forward(self, x: torch.Tensor, accelerated: bool) -> torch.Tensor:
        y = x * 2  # 1 op
        if not accelerated:
            return y
        if y.sum() > 0:  # sum, gt; 1 sync (item), 1 graph break
            y = y + 1  # 1 op
        torch.nonzero(y)  # 1 op; 1 sync (nonzero)
        return y


def test_a_toy_is_counted_exactly() -> None:
    toy, x = _Toy(), torch.ones(4)
    case = bench.Case("toy", "toy", lambda: toy(x, True), lambda: toy(x, False), lambda x: toy(x, True),
                      [((x,), {})] * 3)  # fmt: skip
    row = bench.measure(case)
    assert row["syncs"] == 2 and row["sync_kinds"] == {"item": 1, "nonzero": 1} and row["dense_syncs"] == 0
    assert (row["dense_ops"], row["ops"]) == (1, 6)  # + sum, gt, the value read's copy, add, nonzero
    assert row["graph_breaks"] == 1 and row["compiles"] == 2  # the graph before and after the break
    assert bench._met(row) == "missed: syncs, ops, breaks"
    assert "| 2 (item 1, nonzero 1) | 0 | 6 / 1 = 6.00x | 1 (" in bench.readiness_table([row])
    assert f"| 2 over 3 steps (one call: {row['graphs']} graphs) | missed: syncs, ops, breaks |" in bench.readiness_table([row])


def test_per_call_divides_a_decode_into_forwards() -> None:
    x = torch.ones(3)

    def four_forwards() -> None:
        for _ in range(4):
            float(x.sum())

    case = bench.Case("toy", "toy", four_forwards, lambda: x.sum().neg(), None, [], per_call=4)
    row = bench.measure(case)
    assert row["syncs"] == 1 and row["sync_kinds"] == {"item": 1} and row["graph_breaks"] is None
    assert row["ops"] == row["dense_ops"] == 2  # sum + the value read's copy, per forward
    assert bench._met(row) == "missed: syncs; compile not measured"


def test_tile_density_on_a_known_layout() -> None:
    # 256 queries: cluster 0 = 128 tokens, cluster 1 = 128; 256 keys: clusters of 64, 64, 128
    q = torch.tensor([0] * 128 + [1] * 128)[None]
    k = torch.tensor([2] * 128 + [0] * 64 + [1] * 64)[None].flip(1)  # order does not matter: sorted
    selected = torch.zeros(1, 2, 3, dtype=torch.bool)
    selected[0, 0, 0] = True  # q tile 0 x keys 0-63
    selected[0, 1, 2] = True  # q tile 1 x keys 128-255
    assert bench.tile_density(q, k, selected, 128, 64) == pytest.approx(3 / 8)  # 1 + 2 of 2 x 4 tiles
    assert bench.tile_density(q, k, selected, 128, 128) == pytest.approx(2 / 4)


def test_quick_benchmark_measures_every_technique(tmp_path) -> None:
    torch.set_num_threads(1)
    rows, tiles = bench.run(quick=True, compile_=False)
    assert [r["technique"] for r in rows] == list(bench.BUILDERS)
    for r in rows:
        assert r["syncs"] >= 0 and r["ops"] > 0 and r["dense_ops"] > 0, r
        assert r["graph_breaks"] is None  # quick: no compile figures
    dense = {r["technique"]: r["dense_syncs"] for r in rows}
    for name in ("token density", "FlexDiT", "DyDiT", "SVG2", "clip parallelism", "DualParal stage"):
        assert dense[name] == 0, name  # the dense diffusers forwards never read a value on the host
    assert {t["min_kc_ratio"] for t in tiles} == {0.1, 0.02}
    for t in tiles:  # a tile holds whole clusters' worth of pairs or more: never below the exact density
        assert t["exact"] <= t["tiles_128x64"] <= t["tiles_128x128"] <= 1
    table = bench.readiness_table(rows)
    assert table.count("\n") == len(rows) + 1
    results = tmp_path / "RESULTS.md"
    results.write_text("# x\n\n## A\n\na\n\n## GPU: one\n\ng\n")
    bench.write_section(f"{bench.SECTION}\n\nfirst\n", results)
    bench.write_section(f"{bench.SECTION}\n\nsecond\n", results)  # replaced in place, not appended
    text = results.read_text()
    assert text.count(bench.SECTION) == 1 and "second" in text and "first" not in text
    assert text.index(bench.SECTION) < text.index("## GPU: one") and text.endswith("g\n")


def test_unknown_technique_is_refused() -> None:
    with pytest.raises(ValueError, match="only: unknown technique"):
        bench.run(quick=True, only=["ToMe"])
