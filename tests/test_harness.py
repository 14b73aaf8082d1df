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
