import torch

from mmaccel.benchmarks.harness import append_results, measure
from mmaccel.runtime.environment import machine_description
from mmaccel.runtime.tables import markdown_table


def test_measure_counts_calls_and_memory():
    calls = []

    def work():
        calls.append(1)
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        return x.sum()

    m = measure(work, repeats=3, warmup=2)
    assert len(calls) == 6 and len(m.times_s) == 3  # + one untimed memory pass
    assert m.median_s > 0
    assert m.peak_bytes == 64 * 1024 * 1024 + 4  # the live buffer + its float32 sum


def test_markdown_and_results(tmp_path):
    table = markdown_table(["setting", "speed-up"], [["dense", 1.0], ["sparse", 2.345]])
    assert table.splitlines()[0] == "| setting | speed-up |" and "2.35" in table
    path = tmp_path / "RESULTS.md"
    append_results("demo", table, notes="a note", path=path)
    text = path.read_text()
    assert "## demo" in text and "torch" in text and machine_description().split(",")[0] in text


def test_compare_interleaves_rotates_and_reports_spread():
    import time

    import pytest

    from mmaccel.benchmarks.harness import compare

    order = []

    def sleeper(name, seconds):
        def fn():
            order.append(name)
            time.sleep(seconds)

        return fn

    out = compare({"slow": sleeper("slow", 0.02), "fast": sleeper("fast", 0.005)}, repeats=5, warmup=1)
    assert order[:2] == ["slow", "fast"]  # per-variant warm-up first
    rounds = [tuple(order[2 + 2 * r : 4 + 2 * r]) for r in range(5)]
    assert rounds == [("slow", "fast"), ("fast", "slow")] * 2 + [("slow", "fast")]  # rotated each round
    fast = out["fast"]
    assert len(fast.times_s) == 5 and 2.5 < fast.ratio < 4.5
    assert fast.ratio_min <= fast.ratio <= fast.ratio_max and not fast.overlaps
    assert out["slow"].ratio == 1.0 and not out["slow"].overlaps  # the baseline is not "within noise" of itself
    assert fast.ratio_text().startswith(f"{fast.ratio:.2f}x (") and "noise" not in fast.ratio_text()
    with pytest.raises(ValueError, match="repeats must be >= 5"):
        compare({"a": lambda: None, "b": lambda: None}, repeats=3)
    with pytest.raises(ValueError, match="baseline and at least one variant"):
        compare({"a": lambda: None})
