"""bench_hired's fidelity section: which zoo entries it judges."""

from __future__ import annotations

import pytest

from mmaccel.apps.zoo import REGISTRY
from mmaccel.benchmarks.bench_hired import SHAPES_ENTRIES, run_fidelity


def test_fidelity_judges_the_shapes_vlm_entries_only():
    assert "shapes-vlm" in SHAPES_ENTRIES and set(SHAPES_ENTRIES) <= set(REGISTRY)
    assert "digits-dit" not in SHAPES_ENTRIES
    with pytest.raises(ValueError, match="zoo must be one of"):
        run_fidelity(True, zoo="digits-dit")
