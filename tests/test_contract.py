"""The technique registry: every technique the packages export follows the contract
(docs/architecture.md). Each ``apply_*`` is checked end to end on a tiny model by
``mmaccel.testing.check_technique_contract`` in the test named here; this file checks the
registry is complete and the exported pieces have the contract's shape."""

import dataclasses
import importlib
from pathlib import Path

import pytest

from mmaccel.runtime.patching import PatchHandle
from mmaccel.runtime.stats import Stats

PACKAGES = ["mmaccel.vlm", "mmaccel.diffusion", "mmaccel.sparse_attn", "mmaccel.parallel_video", "mmaccel.tokenizers_img"]

# apply_* -> (its config class, the contract test that runs check_technique_contract on it)
REGISTRY = {
    "apply_hired": ("HiREDConfig", "tests/test_contract_vlm.py::test_technique_contract"),
    "apply_vista": ("VISTAConfig", "tests/test_contract_vlm.py::test_technique_contract"),
    "apply_attention_balance": ("AttentionBalanceConfig", "tests/test_contract_vlm.py::test_technique_contract"),
    "apply_fastv": ("FastVConfig", "tests/test_contract_vlm.py::test_technique_contract"),
    "apply_token_density": ("TokenDensityConfig", "tests/test_contract_diffusion.py::test_token_density_contract"),
    "apply_svg2": ("SVG2Config", "tests/test_contract_diffusion.py::test_svg2_contract_wan"),
    "apply_clip_parallel": ("ClipParallelConfig", "tests/test_contract_video.py::test_clip_parallel_contract_one_rank"),
}
# exported names that look like the contract's but are no technique
NOT_TECHNIQUES = {
    "apply_cfg": "classifier-free guidance on logits (tokenizers_img.sampling), a function",
    "apply_fast": "the fast preset (diffusion.presets): token density + a diffusers cache, not a technique; its "
    "MagCache needs ratios calibrated on the model, so config=None cannot run "
    "(tests/test_fast_preset.py::test_fast_preset_needs_mag_ratios_and_a_config)",
    "SampleStats": "one generate() call's per-sample record (vlm.api), not a handle's statistics",
}
ROOT = Path(__file__).resolve().parent.parent


def _exported(suffix: str = "", prefix: str = "") -> dict[str, object]:
    found = {}
    for name in PACKAGES:
        module = importlib.import_module(name)
        for public in module.__all__:
            if public.startswith(prefix) and public.endswith(suffix) and public not in NOT_TECHNIQUES:
                found[f"{name}.{public}"] = getattr(module, public)
    return found


def test_every_apply_is_in_the_registry_and_its_contract_test_exists():
    applies = {key.rsplit(".", 1)[1] for key in _exported(prefix="apply_")}
    assert applies == set(REGISTRY), f"unregistered: {applies - set(REGISTRY)}, stale: {set(REGISTRY) - applies}"
    configs = {key.rsplit(".", 1)[1] for key in _exported(suffix="Config")}
    for config, test in REGISTRY.values():
        assert config in configs, config
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test
        assert "check_technique_contract(" in (ROOT / path).read_text()


@pytest.mark.parametrize("key", sorted(_exported(suffix="Config")))
def test_configs_are_frozen_validated_dataclasses_whose_defaults_construct(key):
    cls = _exported(suffix="Config")[key]
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, key
    required = [f for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if not required:
        config = cls()
        field = dataclasses.fields(cls)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, field, getattr(config, field))


@pytest.mark.parametrize("key", sorted(_exported(suffix="Handle")))
def test_handles_are_patch_handles(key):
    assert issubclass(_exported(suffix="Handle")[key], PatchHandle), key


@pytest.mark.parametrize("key", sorted(_exported(suffix="Stats")))
def test_stats_share_one_vocabulary(key):
    cls = _exported(suffix="Stats")[key]
    assert issubclass(cls, Stats), key
    assert not hasattr(cls, "clear"), f"{key}: reset(), not clear()"
