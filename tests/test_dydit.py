"""DyDiT: routers, pruned == masked execution, exact dense equivalence, training, save/load."""

from __future__ import annotations

import pytest
import torch
from torch.utils import flop_counter

from mmaccel.diffusion.dydit import (
    BlockRouter,
    DyDiTConfig,
    DyDiTTransformer2DModel,
    convert_to_dydit,
    gumbel_sigmoid,
)
from mmaccel.diffusion.dydit_train import DyDiTTrainConfig, train_dydit
from mmaccel.diffusion.train import LatentDataset
from mmaccel.runtime.stats import Stats, check_summary
from mmaccel.testing import tiny_dit_pipeline, tiny_pixart_pipeline

torch.set_num_threads(1)


def _inputs(kind: str, batch: int = 2, t: float = 500.0, size: int = 32) -> dict:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, size, size, generator=gen)
    ts = torch.full((batch,), t)
    if kind == "dit":
        return {"hidden_states": x, "timestep": ts, "class_labels": torch.arange(batch)}
    return {"hidden_states": x, "timestep": ts, "encoder_hidden_states": torch.randn(batch, 8, 32, generator=gen),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}  # fmt: skip


def _dense(kind: str):
    return (tiny_dit_pipeline() if kind == "dit" else tiny_pixart_pipeline()).transformer


@torch.no_grad()
def _randomise(model: DyDiTTransformer2DModel, seed: int = 0) -> None:
    """Routers that drop some heads, channel groups and tokens; non-zero TD-LoRA."""
    gen = torch.Generator().manual_seed(seed)
    for r in model.routers:
        r.head.bias.copy_(torch.randn(r.head.bias.shape, generator=gen) * 3)
        r.mlp.bias.copy_(torch.randn(r.mlp.bias.shape, generator=gen) * 3)
        r.token[2].bias.fill_(-0.05)
    for adapters in model.lora:
        for name, module in adapters.items():
            if name == "gate":
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
            else:
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.1)
    model.clear_cache()


def _flops(fn) -> int:
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: flop_counter.sdpa_flop_count(q, k, v)
    }  # fmt: skip
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


# -- config and errors -------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, -0.1, 1.01])
def test_lambda_outside_range_raises(value):
    with pytest.raises(ValueError, match="target_flops_ratio"):
        DyDiTConfig(target_flops_ratio=value)


def test_bad_config_values_raise():
    with pytest.raises(TypeError, match="target_flops_ratio"):
        DyDiTConfig(target_flops_ratio="half")
    with pytest.raises(ValueError, match="head_groups"):
        DyDiTConfig(head_groups=0)
    with pytest.raises(ValueError, match="threshold"):
        DyDiTConfig(threshold=1.0)
    with pytest.raises(ValueError, match="lora_targets"):
        DyDiTConfig(lora_targets=("to_x",))
    with pytest.raises(TypeError, match="dynamic_tokens"):
        DyDiTConfig(dynamic_tokens=1)
    with pytest.raises(ValueError, match="mode"):
        DyDiTTrainConfig(mode="half")
    assert DyDiTConfig(target_flops_ratio=1.0).target_flops_ratio == 1.0


def test_groups_must_divide_width():
    dense = _dense("dit")  # 4 heads, MLP width 256
    with pytest.raises(ValueError, match="head_groups=3 must divide"):
        convert_to_dydit(dense, DyDiTConfig(head_groups=3))
    with pytest.raises(ValueError, match="mlp_groups=6 must divide"):
        convert_to_dydit(dense, DyDiTConfig(mlp_groups=6))
    model = convert_to_dydit(dense, DyDiTConfig(head_groups=2, mlp_groups=8))
    assert model.routers[0].head.out_features == 2 and model.routers[0].mlp.out_features == 8


def test_unsupported_model_raises():
    from diffusers import UNet2DModel

    with pytest.raises(TypeError, match="DyDiT supports"):
        convert_to_dydit(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))  # fmt: skip
    with pytest.raises(TypeError, match="DyDiTConfig"):
        convert_to_dydit(_dense("dit"), {"target_flops_ratio": 0.5})


# -- routers -----------------------------------------------------------------------------------
def test_router_output_shapes_and_straight_through():
    router = BlockRouter(64, 4, 8, 16)
    router.reset(15.0, 35.0, torch.Generator().manual_seed(0))
    temb, x = torch.randn(3, 64), torch.randn(3, 10, 64)
    assert router.head(temb).shape == (3, 4) and router.mlp(temb).shape == (3, 8)
    assert router.token(x).shape == (3, 10, 1)
    logits = torch.randn(5, 7, requires_grad=True)
    hard = gumbel_sigmoid(logits, tau=5.0, threshold=0.5, noise=True)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    hard.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    det = gumbel_sigmoid(logits.detach(), tau=5.0, threshold=0.5, noise=False)
    assert torch.equal(det, (logits.detach() > 0).float())


# -- inference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_all_active_routers_reproduce_dense_exactly(kind):
    dense = _dense(kind)
    model = convert_to_dydit(dense, DyDiTConfig(lora_rank=2))  # LoRA B = 0 at init
    inputs = _inputs(kind)
    with torch.no_grad():
        ref = dense(**inputs).sample
        out = model(**inputs).sample
        model.set_execution("masked")
        masked = model(**inputs).sample
    assert torch.equal(ref, convert_to_dydit(dense)(**inputs).sample.detach())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked, ref, rtol=0, atol=1e-5)
    summary = model.stats.summary()
    assert summary["active_head_fraction"] == 1.0 and summary["active_token_fraction"] == 1.0


@pytest.mark.parametrize("kind,lora", [("dit", 0), ("dit", 2), ("pixart", 2)])
def test_pruned_weights_equal_masked_computation_with_real_savings(kind, lora):
    dense = _dense(kind)
    model = convert_to_dydit(dense, DyDiTConfig(lora_rank=lora))
    _randomise(model)
    inputs = _inputs(kind)
    with torch.no_grad():
        counted = _flops(lambda: model(**inputs)) / 2
        pruned = model(**inputs).sample
        model.set_execution("masked")
        masked = model(**inputs).sample
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)
    step = model.stats.steps[-2]  # the pruned call
    assert min(step["heads"]) < model.heads and min(step["channels"]) < model.ff_dim
    assert min(step["tokens"]) < 256
    # the analytic FLOPs the stats report are what the pruned forward really runs
    assert counted == pytest.approx(step["flops"], rel=0.01)
    dense_counted = _flops(lambda: dense(**inputs)) / 2
    assert dense_counted == pytest.approx(step["dense_flops"], rel=1e-6)
    assert counted < 0.8 * dense_counted


def test_precompute_schedule_and_pipeline():
    pipe = tiny_dit_pipeline()
    model = convert_to_dydit(pipe.transformer)
    _randomise(model)
    pipe.scheduler.set_timesteps(4)
    info = model.precompute(pipe.scheduler.timesteps)
    assert info["timesteps"] == 4 and 1 <= info["weight_sets"] <= 4 * 6
    pipe.transformer = model
    images = pipe(class_labels=[1], num_inference_steps=4, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    steps = model.stats.steps
    assert len(steps) == 4 and all(s["flops"] < s["dense_flops"] for s in steps)
    summary = check_summary(model.stats.summary())
    assert isinstance(model.stats, Stats) and summary["steps"] == 4 and 0 < summary["flops_ratio"] < 1
    model.stats.reset()
    assert check_summary(model.stats.summary())["steps"] == 0


def test_pixart_pipeline_runs():
    pipe = tiny_pixart_pipeline()
    pipe.transformer = convert_to_dydit(pipe.transformer)
    _randomise(pipe.transformer)
    images = pipe("a cat", num_inference_steps=2, output_type="np", use_resolution_binning=False,
                  height=64, width=64).images  # fmt: skip
    assert images.shape == (1, 64, 64, 3)


def test_mixed_timesteps_and_timestep_errors():
    model = convert_to_dydit(_dense("dit"))
    _randomise(model)
    inputs = _inputs("dit")
    inputs["timestep"] = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        both = model(**inputs).sample
        for i in range(2):
            one = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            torch.testing.assert_close(both[i : i + 1], model(**one).sample, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="timestep"):
            model(inputs["hidden_states"], None, inputs["class_labels"])
        with pytest.raises(ValueError, match="not a timestep"):
            model(inputs["hidden_states"], torch.tensor([2000.0, 2000.0]), inputs["class_labels"])


def test_widths_are_decided_by_a_pre_hook_once_per_call_and_stats_recorded_by_a_hook():
    """Widths and sliced weights are planned in a forward pre-hook and the stats recorded in a
    forward hook (both outside a compiled forward), one decision per call: ``model.forward(...)``
    bypasses them and is refused, also right after a call, and records nothing."""
    model = convert_to_dydit(_dense("dit"))
    _randomise(model)
    inputs = _inputs("dit")
    with torch.no_grad():
        model(**inputs)
        assert len(model.stats.steps) == 1
        with pytest.raises(RuntimeError, match="call the model, not .forward"):
            model.forward(**inputs)
    assert len(model.stats.steps) == 1


def test_save_pretrained_round_trip(tmp_path):
    model = convert_to_dydit(_dense("dit"), DyDiTConfig(target_flops_ratio=0.7, lora_rank=2))
    _randomise(model)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    loaded = DyDiTTransformer2DModel.from_pretrained(tmp_path / "m")
    assert loaded.dydit == model.dydit
    inputs = _inputs("dit")
    with torch.no_grad():
        # same weights and decisions; float32 kernels may differ in the last bits with memory layout
        torch.testing.assert_close(loaded(**inputs).sample, model(**inputs).sample, rtol=0, atol=1e-5)
    assert loaded.stats.steps[-1]["heads"] == model.stats.steps[-1]["heads"]
    assert loaded.stats.steps[-1]["tokens"] == model.stats.steps[-1]["tokens"]


# -- training ----------------------------------------------------------------------------------
def _small_dit():
    return tiny_dit_pipeline(sample_size=16).transformer  # 8x8 = 64 tokens


def test_training_reduces_loss_and_moves_flops_toward_lambda():
    dense = _small_dit()
    cfg = DyDiTConfig(target_flops_ratio=0.5, router_init_bias=1.0, token_router_init_bias=1.0)
    model = convert_to_dydit(dense, cfg)
    data = LatentDataset.synthetic(dense, 32)
    logs = train_dydit(model, dense, data, DyDiTTrainConfig(steps=24, batch_size=8, learning_rate=1e-3,
                       router_learning_rate=0.1, seed=0), progress=False)  # fmt: skip
    first, last = logs[:4], logs[-4:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss")
    assert abs(mean(last, "flops_ratio") - 0.5) < abs(mean(first, "flops_ratio") - 0.5)
    assert model.execution == "pruned"  # restored after training


def test_lora_mode_trains_only_adapters_and_adapters_save_load(tmp_path):
    dense = _small_dit()
    cfg = DyDiTConfig(router_init_bias=1.0, token_router_init_bias=1.0, lora_rank=2, lora_experts=2)
    model = convert_to_dydit(dense, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = LatentDataset.synthetic(dense, 16)
    train_dydit(model, dense, data, DyDiTTrainConfig(steps=4, batch_size=8, mode="lora", learning_rate=1e-2),
                progress=False)  # fmt: skip
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("routers.", "lora.")) for k in changed)
    assert any(k.startswith("lora.") and "lora_B" in k for k in changed)
    model.save_adapters(tmp_path / "ad")
    fresh = convert_to_dydit(dense, cfg)
    fresh.load_adapters(tmp_path / "ad")
    inputs = _inputs("dit", size=16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).sample, model(**inputs).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapters"):
        convert_to_dydit(dense, DyDiTConfig(lora_rank=4)).load_adapters(tmp_path / "ad")
    with pytest.raises(ValueError, match="lora_rank"):
        train_dydit(convert_to_dydit(dense), dense, data, DyDiTTrainConfig(steps=1, mode="lora"), progress=False)


def test_flow_matching_objective_runs():
    dense = _small_dit()
    model = convert_to_dydit(dense, DyDiTConfig(router_init_bias=1.0))
    logs = train_dydit(model, dense, LatentDataset.synthetic(dense, 8),
                       DyDiTTrainConfig(steps=2, batch_size=4, objective="flow", diffusion_weight=1.0), progress=False)  # fmt: skip
    assert len(logs) == 2 and logs[0]["diffusion"] > 0


# -- zoo ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.5, 0.7])
def test_zoo_digits_dydit_loads_and_saves_flops(target):
    from mmaccel.apps.zoo import digits_dit, digits_dydit
    from mmaccel.apps.zoo.digits import classifier_accuracy, load_digit_classifier

    pipe = digits_dydit.load(target=target)
    assert isinstance(pipe.transformer, DyDiTTransformer2DModel)
    assert pipe.transformer.dydit.target_flops_ratio == target
    samples = digits_dit.generate(pipe, list(range(10)), num_inference_steps=10)
    summary = pipe.transformer.stats.summary()
    assert summary["steps"] == 10 and summary["flops_ratio"] < 0.95
    assert classifier_accuracy(load_digit_classifier(), samples, torch.arange(10)) >= 0.7
    with pytest.raises(ValueError, match="target"):
        digits_dydit.load(target=0.6)


# -- fixed-capacity token skipping ----------------------------------------------------------------

@pytest.mark.parametrize("lora", [0, 2])
def test_fixed_capacity_equals_reference_gather_when_the_kept_tokens_fit(lora):
    """``set_token_capacity(c)``: top-k by router logit (static shape) instead of ``nonzero``. At
    capacity 1 and at any capacity holding every passing token it equals the reference gather;
    the stats and the FLOPs counted follow the capacity."""
    model = convert_to_dydit(_dense("dit"), DyDiTConfig(lora_rank=lora))
    _randomise(model)
    inputs = _inputs("dit")
    with torch.no_grad():
        for r in model.routers:
            r.token[2].bias.fill_(-1.5)  # fewer tokens pass
        reference = model(**inputs).sample
        model.set_execution("masked")
        model(**inputs)
        passing = max(int(m["tokens"].sum(-1).max()) for m in model._last_masks)  # most in one sample and block
        model.set_execution("pruned")
        capacity = passing / 256
        assert capacity < 0.9
        for c in (1.0, capacity):
            model.set_token_capacity(c)
            torch.testing.assert_close(model(**inputs).sample, reference, rtol=1e-5, atol=1e-6)
        assert model.stats.steps[-1]["tokens"] == [float(passing)] * len(model.transformer_blocks)
        counted = _flops(lambda: model(**inputs)) / 2
    assert counted == pytest.approx(model.stats.steps[-1]["flops"], rel=0.01)


def test_small_capacity_skips_more_tokens_and_bad_capacities_raise():
    model = convert_to_dydit(_dense("dit"), DyDiTConfig())
    _randomise(model)
    inputs = _inputs("dit")
    with torch.no_grad():
        reference = model(**inputs).sample
        model.set_token_capacity(0.25)
        reduced = model(**inputs).sample
    assert not torch.allclose(reduced, reference) and torch.isfinite(reduced).all()
    assert model.stats.steps[-1]["tokens"][0] == 64.0 and model.stats.steps[-1]["flops"] < model.stats.steps[-2]["flops"]
    for bad, error in ((0.0, ValueError), (1.5, ValueError), ("half", TypeError), (True, TypeError)):
        with pytest.raises(error, match="token capacity"):
            model.set_token_capacity(bad)
    model.set_token_capacity(None)
    assert model.token_capacity is None
