"""Benchmarks: one script per technique (``python -m mmaccel.benchmarks.bench_NAME``)."""

if __name__ != "mmaccel.benchmarks":  # installed as mmaccel.benchmarks; a second copy must never load
    raise ImportError("import mmaccel.benchmarks, not the bare folder name 'benchmarks'")
