"""The prepared GPU check: the offline wheel bundle (``bundle.py``), the benchmark steps
(``steps.py``) and ``run.sh`` that drives them on the GPU machine (docs/gpu.md)."""
