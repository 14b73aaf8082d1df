"""The diffusers-suite plugin (`mmaccel.benchmarks.diffusers_suite`) applies its technique to every
transformer a test creates, and its summary finds the tests that pass unpatched only (issue #32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel, ModelMixin, Transformer2DModel, WanTransformer3DModel

from mmaccel.benchmarks.contract_budgets import token_density_at_budget
from mmaccel.benchmarks.diffusers_suite import ENV, HANDLE_ATTR, ModelPatcher, SuiteSetting, summarize
from mmaccel.diffusion.token_density import TokenDensityHandle
from mmaccel.sparse_attn.svg2 import SVG2Handle
from mmaccel.testing import TINY_WAN_TRANSFORMER

torch.set_num_threads(1)

#: diffusers' own DiT test config (tests/models/transformers/test_models_dit_transformer2d.py)
DIT = dict(in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2, attention_head_dim=4,
           attention_bias=True, num_layers=2, norm_type="ada_norm_zero", num_embeds_ada_norm=8, patch_size=2,
           sample_size=8)  # fmt: skip


@pytest.fixture
def patcher(request: pytest.FixtureRequest):
    p = ModelPatcher(SuiteSetting.parse(request.param))
    p.install()
    yield p
    p.uninstall()


def _dit_forward(model: torch.nn.Module, t: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return model(x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 2]), return_dict=False)[0]


@pytest.mark.parametrize("patcher", ["token_density-reducing"], indirect=True)
def test_models_built_by_the_class_from_config_and_from_pretrained_carry_the_handle(patcher, tmp_path: Path) -> None:
    built = DiTTransformer2DModel(**DIT)
    remapped = Transformer2DModel.from_config(DIT)  # diffusers remaps to DiTTransformer2DModel
    built.save_pretrained(tmp_path)
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    handles = patcher.drain()
    assert [h.model for h in handles] == [built, remapped, loaded]
    for model, handle in zip((built, remapped, loaded), handles):
        assert type(model) is DiTTransformer2DModel and model.__dict__[HANDLE_ATTR] is handle
        assert isinstance(handle, TokenDensityHandle) and model._mmaccel_patches == {"token_density"}
    with torch.no_grad():
        _dit_forward(loaded, 900.0)  # reducing: keep 0.325 at t = 900
    assert loaded.__dict__[HANDLE_ATTR].stats.summary()["reduced_forwards"] == 1
    assert patcher.drain() == []


@pytest.mark.parametrize("patcher", ["token_density-full"], indirect=True)
def test_full_budget_output_equals_the_unpatched_model(patcher) -> None:
    torch.manual_seed(0)
    patched = DiTTransformer2DModel(**DIT).eval()
    torch.manual_seed(0)
    dense = DiTTransformer2DModel(**DIT).eval()
    dense.__dict__.pop(HANDLE_ATTR).remove()
    with torch.no_grad():
        torch.testing.assert_close(_dit_forward(patched, 900.0), _dit_forward(dense, 900.0))
    assert patched.__dict__[HANDLE_ATTR].stats.summary()["forwards"] == 1


@pytest.mark.parametrize("patcher", ["svg2-full"], indirect=True)
def test_svg2_applies_to_wan_and_not_to_dit(patcher) -> None:
    wan = WanTransformer3DModel(**TINY_WAN_TRANSFORMER)
    dit = DiTTransformer2DModel(**DIT)
    assert isinstance(wan.__dict__[HANDLE_ATTR], SVG2Handle)
    assert HANDLE_ATTR not in dit.__dict__
    assert [h.model for h in patcher.drain()] == [wan]


def test_uninstall_restores_the_classes_and_none_patches_nothing() -> None:
    init, load = DiTTransformer2DModel.__dict__["__init__"], ModelMixin.__dict__["from_pretrained"]
    p = ModelPatcher(SuiteSetting.parse("token_density-full"))
    p.install()
    assert DiTTransformer2DModel.__dict__["__init__"] is not init
    with pytest.raises(RuntimeError, match="already installed"):
        p.install()
    p.uninstall()
    assert DiTTransformer2DModel.__dict__["__init__"] is init and ModelMixin.__dict__["from_pretrained"] is load
    assert HANDLE_ATTR not in DiTTransformer2DModel(**DIT).__dict__
    none = ModelPatcher(SuiteSetting.parse("none"))
    none.install()
    assert HANDLE_ATTR not in DiTTransformer2DModel(**DIT).__dict__ and none.drain() == []
    none.uninstall()


def test_settings_are_validated() -> None:
    assert SuiteSetting.parse("svg2-reducing") == SuiteSetting("svg2", "reducing")
    assert SuiteSetting.parse("token_density-every_step").name == "token_density-every_step"
    assert SuiteSetting.parse("none").name == "none"
    with pytest.raises(ValueError, match=ENV):
        SuiteSetting.parse("svg2")
    with pytest.raises(ValueError, match="technique"):
        SuiteSetting("dydit")
    with pytest.raises(ValueError, match="budget"):
        SuiteSetting("svg2", "every_step")
    with pytest.raises(TypeError, match="setting"):
        ModelPatcher("svg2-full")  # type: ignore[arg-type]


def _junit(path: Path, cases: dict[str, str]) -> None:
    body = {"passed": "", "skipped": '<skipped message="needs a GPU"/>',
            "failed": '<failure message="AssertionError: outputs differ&#10;second line">trace</failure>'}  # fmt: skip
    rows = "".join(f'<testcase classname="m.C" name="{n}">{body[o]}</testcase>' for n, o in cases.items())
    path.write_text(f'<testsuites><testsuite name="pytest">{rows}</testsuite></testsuites>')


def test_summary_lists_the_tests_that_pass_unpatched_only(tmp_path: Path) -> None:
    _junit(tmp_path / "none.xml", {"a": "passed", "b": "passed", "c": "failed", "d": "skipped"})
    _junit(tmp_path / "svg2-full.xml", {"a": "passed", "b": "failed", "c": "failed", "d": "skipped"})
    text = summarize(tmp_path)
    assert "| svg2-full | 1 | 2 | 1 | 1 | 0 | 0 |" in text
    assert "- m.C::b [failed]: AssertionError: outputs differ" in text and "m.C::c" not in text
    (tmp_path / "none.xml").unlink()
    with pytest.raises(ValueError, match="none.xml"):
        summarize(tmp_path)


@pytest.mark.parametrize(("layers", "blocks"), [(1, [(4, 4)]), (2, [(4, 4), (4, 16)]), (3, [(4, 4), (4, 16), (16, 16)])])
def test_token_density_layout_of_models_shallower_than_auto_allows(layers: int, blocks: list) -> None:
    """diffusers' DiT test model has one block: block 0 pooled, block 1 sparse, 3+ blocks "auto"."""
    model = DiTTransformer2DModel(**{**DIT, "num_layers": layers}).eval()
    handle = token_density_at_budget(model, True)
    with torch.no_grad():
        _dit_forward(model, 900.0)  # keep 0.325: 2x2 pooling of the 4x4 token grid
    assert handle.stats.steps[0].block_tokens == blocks


@pytest.mark.parametrize(("patcher", "reduced"), [("token_density-reducing", 0), ("token_density-every_step", 1)],
                         indirect=["patcher"])  # fmt: skip
def test_every_step_reduces_at_the_low_noise_timesteps_of_diffusers_inputs(patcher, reduced: int) -> None:
    """diffusers' Wan/CogVideoX/HunyuanVideo inputs draw t = 44: the reducing schedule is dense there."""
    model = DiTTransformer2DModel(**DIT).eval()
    with torch.no_grad():
        _dit_forward(model, 44.0)
    assert model.__dict__[HANDLE_ATTR].stats.summary()["reduced_forwards"] == reduced
