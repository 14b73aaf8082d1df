"""FlexDiT layout (mmaccel.diffusion.flexdit) and its distillation fine-tuning (mmaccel.diffusion.train)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel, PixArtTransformer2DModel

from mmaccel.diffusion.flexdit import (
    FlexDiTConfig,
    FlexDiTTransformer2DModel,
    PoolingformerBlock,
    RecoveryBlock,
    convert_to_flexdit,
    pool_tokens,
    upsample_tokens,
)
from mmaccel.diffusion.train import DistillConfig, LatentDataset, distill, distillation_loss, main
from mmaccel.runtime.budget import LinearSchedule, StepSchedule
from mmaccel.testing import call_kwargs, tiny_dit_pipeline, tiny_pixart_pipeline

#: 6 blocks: 1 Poolingformer, one SDTM (cross, sparse, recovery, dense), 1 dense on top.
SMALL = FlexDiTConfig(
    pooling_blocks=1, num_modules=1, module_layout=(1, 1, 1, 1), top_dense_blocks=1, sparse_grid=(4, 4)
)


def _dit(num_layers: int = 6, sample_size: int = 16, seed: int = 0) -> DiTTransformer2DModel:
    """A small DiT (8x8 tokens at sample_size 16, learned sigma), eval mode."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=num_layers, sample_size=sample_size, patch_size=2).eval()  # fmt: skip


def _pixart(num_layers: int = 4) -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=num_layers, sample_size=16, patch_size=2, cross_attention_dim=32,
                                    caption_channels=24, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                    norm_eps=1e-6, num_embeds_ada_norm=1000).eval()  # fmt: skip


def _dit_inputs(
    batch: int = 2, size: int = 16, t: int = 500
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, size, size, generator=gen), torch.full((batch,), t), torch.arange(batch) + 3


def _pixart_inputs(batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(batch, 4, 16, 16, generator=gen),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=gen), timestep=torch.full((batch,), 400),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0]] * batch))  # fmt: skip


# -- config validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"pooling_blocks": -1}, ValueError, "pooling_blocks"),
        ({"pooling_blocks": 1.5}, TypeError, "pooling_blocks"),
        ({"num_modules": True}, TypeError, "num_modules"),
        ({"module_layout": (1, 1, 2, 1)}, ValueError, "recovery"),
        ({"module_layout": (1, 1, 1)}, ValueError, "module_layout"),
        ({"module_layout": (-1, 1, 1, 1)}, ValueError, "cross"),
        ({"sparse_grid": (0, 4)}, ValueError, "sparse_grid"),
        ({"sparse_grid": 4}, ValueError, "sparse_grid"),
        ({"schedule": lambda p: 0.5}, TypeError, "schedule"),
        ({"merge_init": "zero"}, ValueError, "merge_init"),
        ({"num_train_timesteps": 0}, ValueError, "num_train_timesteps"),
    ],
)
def test_bad_config_raises_naming_the_parameter(kwargs, error, names):
    with pytest.raises(error, match=names):
        FlexDiTConfig(**kwargs)


def test_bad_schedule_ratio_raises_from_runtime():
    with pytest.raises(ValueError, match="start"):
        FlexDiTConfig(schedule=LinearSchedule(start=0.0))


def test_layout_must_partition_the_blocks_and_fit_the_grid():
    model = _dit(num_layers=6)
    with pytest.raises(ValueError, match="num_layers=6"):
        convert_to_flexdit(model, FlexDiTConfig())  # the paper's 28-block layout
    with pytest.raises(ValueError, match="sparse_grid"):
        convert_to_flexdit(model, FlexDiTConfig(**{**_fields(SMALL), "sparse_grid": (9, 9)}))
    with pytest.raises(TypeError, match="transformer must be one of"):
        convert_to_flexdit(torch.nn.Linear(2, 2), SMALL)
    with pytest.raises(TypeError, match="FlexDiTConfig"):
        convert_to_flexdit(model, {"pooling_blocks": 1})


def _fields(cfg: FlexDiTConfig) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def test_config_dict_round_trip():
    cfg = FlexDiTConfig(
        schedule=StepSchedule(boundaries=(0.3, 0.6), ratios=(0.25, 0.5, 1.0)), merge_init="upsampled"
    )
    assert FlexDiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert FlexDiTConfig().num_layers == 28


# -- token reduction ---------------------------------------------------------------------------
def test_pool_and_upsample_shapes_and_values():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # 4x4 grid
    pooled = pool_tokens(x, (4, 4), (2, 2))
    assert pooled.shape == (2, 4, 3)
    assert torch.allclose(pooled[:, 0], x[:, [0, 1, 4, 5]].mean(1))  # top-left 2x2 cell
    up = upsample_tokens(pooled, (2, 2), (4, 4))
    assert up.shape == (2, 16, 3)
    assert torch.equal(up[:, [0, 1, 4, 5]], pooled[:, :1].expand(2, 4, 3))
    assert pool_tokens(x.reshape(2, 16, 3)[:, :12], (3, 4), (2, 3)).shape == (2, 6, 3)  # non-divisible grid


# -- exactness and semantics -------------------------------------------------------------------
def test_all_dense_layout_reproduces_dense_models_exactly():
    dit = _dit()
    flex = convert_to_flexdit(dit, FlexDiTConfig(pooling_blocks=0, num_modules=0, top_dense_blocks=6))
    x, t, y = _dit_inputs()
    with torch.no_grad():
        assert torch.equal(flex(x, t, y).sample, dit(x, t, y).sample)
    pixart = _pixart()
    flex = convert_to_flexdit(pixart, FlexDiTConfig(pooling_blocks=0, num_modules=0, top_dense_blocks=4))
    with torch.no_grad():
        assert torch.equal(flex(**_pixart_inputs()).sample, pixart(**_pixart_inputs()).sample)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_sdtm_with_full_grid_and_upsampled_merge_is_exactly_dense(family):
    """Pooling to the full grid is the identity, so cross, sparse, recovery and dense blocks
    must reproduce the dense blocks they came from, in the right order."""
    if family == "dit":
        dense, inputs = _dit(), dict(zip(("hidden_states", "timestep", "class_labels"), _dit_inputs()))
        cfg = FlexDiTConfig(pooling_blocks=0, num_modules=2, module_layout=(1, 1, 1, 0), top_dense_blocks=0,
                            sparse_grid=(8, 8), merge_init="upsampled")  # fmt: skip
    else:
        dense, inputs = _pixart(), _pixart_inputs()
        cfg = FlexDiTConfig(pooling_blocks=0, num_modules=1, module_layout=(1, 1, 1, 1), top_dense_blocks=0,
                            sparse_grid=(8, 8), merge_init="upsampled")  # fmt: skip
    flex = convert_to_flexdit(dense, cfg)
    with torch.no_grad():
        assert torch.equal(flex(**inputs).sample, dense(**inputs).sample)


def test_recovery_merge_init_identity_and_zero():
    flex = convert_to_flexdit(_dit(), SMALL)
    rec = flex.sdt_modules[0].recovery
    assert isinstance(rec, RecoveryBlock)
    assert torch.equal(rec.merge_dense.weight, torch.eye(32)) and not rec.merge_dense.bias.any()
    assert not rec.merge_sparse.weight.any() and not rec.merge_sparse.bias.any()
    sparse, dense = torch.randn(2, 16, 32), torch.randn(2, 64, 32)
    with torch.no_grad():
        assert torch.equal(
            rec.merge(sparse, dense, (8, 8), (4, 4)), dense
        )  # the paper's init: the dense input passes through unchanged
    flipped = convert_to_flexdit(_dit(), FlexDiTConfig(**{**_fields(SMALL), "merge_init": "upsampled"}))
    rec = flipped.sdt_modules[0].recovery
    with torch.no_grad():
        assert torch.equal(rec.merge(sparse, dense, (8, 8), (4, 4)), upsample_tokens(sparse, (4, 4), (8, 8)))
        rec.merge_sparse.weight.normal_()  # trained weights: merge_sparse commutes with the upsampling
        want = rec.merge_sparse(upsample_tokens(sparse, (4, 4), (8, 8))) + rec.merge_dense(dense)
        assert torch.allclose(rec.merge(sparse, dense, (8, 8), (4, 4)), want, atol=1e-5)


def test_poolingformer_attention_is_mean_of_v():
    dense = _dit()
    flex = convert_to_flexdit(dense, SMALL)
    block = flex.pooling_blocks[0]
    assert isinstance(block, PoolingformerBlock)
    assert block.block.attn1.to_q is None and block.block.attn1.to_k is None
    assert not any(
        ".attn1.to_q." in k or ".attn1.to_k." in k for k in flex.state_dict() if k.startswith("pooling")
    )
    # With identical tokens every attention row averages identical values: same as dense attention.
    x = torch.randn(2, 1, 32).expand(2, 64, 32).contiguous()
    t, y = torch.tensor([10, 900]), torch.tensor([1, 2])
    from mmaccel.diffusion.flexdit import _Cond

    with torch.no_grad():
        got = block(x, _Cond(t, y, None, None, None))
        want = dense.transformer_blocks[0](x, timestep=t, class_labels=y)
        assert torch.allclose(got, want, atol=1e-5)
        # With distinct tokens the mixer output is one vector shared by all tokens.
        x = torch.randn(2, 64, 32)
        m = block.block.norm1(x, t, y)[0]
        v = block.block.attn1.to_v(m).mean(1, keepdim=True)
        mixed = block.block.attn1.to_out[0](v)
        gate = block.block.norm1.linear(
            block.block.norm1.silu(block.block.norm1.emb(t, y, hidden_dtype=x.dtype))
        )
        gate_msa = gate.chunk(6, dim=1)[2][:, None]
        after_attn = x + gate_msa * mixed
        from mmaccel.diffusion.flexdit import _modulation, _text_and_ff

        cond = _Cond(t, y, None, None, None)
        want = _text_and_ff(block.block, after_attn, _modulation(block.block, cond, x), cond)
        assert torch.allclose(block(x, cond), want, atol=1e-5)


def test_convert_copies_weights_and_leaves_the_input_untouched():
    dense = _dit()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    flex = convert_to_flexdit(dense, SMALL)
    after = dense.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert dense.transformer_blocks[0].attn1.to_q is not None
    for i, prefix in enumerate(flex.original_block_prefixes()):
        got = flex.get_submodule(prefix).ff.net[2].weight
        assert torch.equal(got, dense.transformer_blocks[i].ff.net[2].weight)
        assert got.data_ptr() != dense.transformer_blocks[i].ff.net[2].weight.data_ptr()


def test_converted_model_outputs_are_finite_and_shaped_like_dense():
    dense = _dit()
    flex = convert_to_flexdit(dense, SMALL)
    x, t, y = _dit_inputs()
    with torch.no_grad():
        out, ref = flex(x, t, y).sample, dense(x, t, y).sample
        tup = flex(
            x, t, y, None, False
        )  # positional arguments as DiT's forward: cross_attention_kwargs, return_dict
    assert out.shape == ref.shape == (2, 8, 16, 16) and torch.isfinite(out).all()
    assert isinstance(tup, tuple) and torch.equal(tup[0], out)
    assert not torch.equal(out, ref)  # the SDTM skips the dense path until fine-tuned


# -- temporal density --------------------------------------------------------------------------
def _record_tokens(flex: FlexDiTTransformer2DModel) -> tuple[dict[str, tuple[int, ...]], list]:
    """Pre-hooks recording (query tokens[, key/value tokens]) entering each SDTM block."""
    module, seen = flex.sdt_modules[0], {}
    probes = {
        "cross": (module.cross[0], lambda a: (a[0].shape[1], a[1].shape[1])),
        "sparse": (module.sparse[0], lambda a: (a[0].shape[1],)),
        "recovery": (module.recovery, lambda a: (a[1].shape[1], a[0].shape[1])),
        "dense": (module.dense[0], lambda a: (a[0].shape[1],)),
    }
    handles = [
        m.register_forward_pre_hook(lambda _, a, k=k, f=f: seen.__setitem__(k, f(a)))
        for k, (m, f) in probes.items()
    ]
    return seen, handles


def test_token_counts_follow_the_schedule_and_match_the_forward():
    cfg = FlexDiTConfig(**{**_fields(SMALL), "sparse_grid": (8, 8), "schedule": LinearSchedule(0.25, 1.0)})
    flex = convert_to_flexdit(_dit(), cfg)
    assert cfg.sparse_grid_at(0.0) == (4, 4) and cfg.sparse_grid_at(1.0) == (8, 8)
    x, _, y = _dit_inputs(batch=1)
    for t, sparse in ((999, 16), (0, 64)):
        counts = flex.token_counts((8, 8), t)
        assert [c.role for c in counts] == [
            "pooling",
            "sparse<-dense",
            "sparse",
            "recovery",
            "dense",
            "dense",
        ]
        assert counts[1] == ("sparse<-dense", sparse, 64) and counts[2] == ("sparse", sparse, sparse)
        assert counts[3] == ("recovery", 64, sparse) and counts[0] == ("pooling", 64, 1)
        seen, handles = _record_tokens(flex)
        with torch.no_grad():
            flex(x, torch.tensor([t]), y)
        for h in handles:
            h.remove()
        assert seen == {"cross": (sparse, 64), "sparse": (sparse,), "recovery": (64, sparse), "dense": (64,)}


def test_mixed_timesteps_in_a_batch_use_each_samples_density():
    cfg = FlexDiTConfig(**{**_fields(SMALL), "sparse_grid": (8, 8), "schedule": LinearSchedule(0.25, 1.0)})
    flex = convert_to_flexdit(_dit(), cfg)
    x, _, y = _dit_inputs(batch=3)
    t = torch.tensor([999, 0, 999])
    with torch.no_grad():
        together = flex(x, t, y).sample
        alone = torch.cat([flex(x[i : i + 1], t[i : i + 1], y[i : i + 1]).sample for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_sparse_grid_larger_than_the_input_grid_raises_at_run_time():
    flex = convert_to_flexdit(_dit(), FlexDiTConfig(**{**_fields(SMALL), "sparse_grid": (8, 8)}))
    x, t, y = _dit_inputs(size=8)  # 4x4 tokens
    with pytest.raises(ValueError, match="exceeds the token grid"):
        flex(x, t, y)


def test_the_density_is_decided_by_a_pre_hook_once_per_call():
    """The sparse grids are decided in a forward pre-hook (outside a compiled forward) and used by
    that call only: ``model.forward(...)`` bypasses the hook and is refused, also right after a
    call; a model built by ``from_pretrained`` runs through its own hook too (save/load test)."""
    flex = convert_to_flexdit(_dit(), SMALL)
    x, t, y = _dit_inputs()
    with torch.no_grad():
        flex(x, t, y)
        with pytest.raises(RuntimeError, match="call the model, not .forward"):
            flex.forward(x, t, y)
    with pytest.raises(ValueError, match="timestep"):
        flex(x, None, y)


# -- persistence and pipelines ------------------------------------------------------------------
def test_save_load_round_trip_with_safetensors(tmp_path):
    cfg = FlexDiTConfig(**{**_fields(SMALL), "schedule": StepSchedule((0.5,), (0.25, 1.0))})
    flex = convert_to_flexdit(_pixart(num_layers=6), cfg)
    with torch.no_grad():
        flex.sdt_modules[0].recovery.merge_sparse.weight.normal_()  # not the init: must be saved
    flex.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["base_class"] == "PixArtTransformer2DModel" and config["sample_size"] == 16
    loaded = FlexDiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.flex == cfg and loaded.config.caption_channels == 24
    with torch.no_grad():
        assert torch.equal(loaded(**_pixart_inputs()).sample, flex(**_pixart_inputs()).sample)


def test_runs_inside_dit_pipeline_and_the_pipeline_round_trips(tmp_path):
    pipe = tiny_dit_pipeline()
    cfg = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(2, 1, 1, 0), top_dense_blocks=1,
                        sparse_grid=(8, 8), schedule=LinearSchedule(0.25, 1.0))  # fmt: skip
    pipe.transformer = convert_to_flexdit(pipe.transformer, cfg)

    def run(p):
        return p(class_labels=[1, 2], num_inference_steps=2, guidance_scale=4.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    images = run(pipe)
    assert images.shape == (2, 64, 64, 3) and (images >= 0).all() and (images <= 1).all()
    pipe.save_pretrained(tmp_path)  # model_index.json names mmaccel.diffusion.flexdit.FlexDiTTransformer2DModel
    reloaded = DiTPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.transformer, FlexDiTTransformer2DModel)
    assert (run(reloaded) == images).all()


def test_runs_inside_pixart_pipeline():
    pipe = tiny_pixart_pipeline()
    cfg = FlexDiTConfig(pooling_blocks=1, num_modules=1, module_layout=(1, 0, 1, 0), top_dense_blocks=1,
                        sparse_grid=(8, 8))  # fmt: skip
    pipe.transformer = convert_to_flexdit(pipe.transformer, cfg)
    kwargs = call_kwargs("pixart")
    kwargs.update(num_inference_steps=2, output_type="np")
    images = pipe(**kwargs).images
    assert images.shape[-1] == 3 and torch.isfinite(torch.as_tensor(images)).all()


# -- distillation ------------------------------------------------------------------------------
def test_a_few_distillation_steps_reduce_the_loss():
    teacher = _dit(num_layers=6)
    student = convert_to_flexdit(teacher, SMALL)
    data = LatentDataset.synthetic(teacher, 4, seed=3)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")

    def held_out() -> float:
        with torch.no_grad():
            loss, parts = distillation_loss(student, teacher, dict(data.tensors), scheduler,
                                            torch.Generator().manual_seed(7), feature_weight=0.5)  # fmt: skip
        assert parts["feature"] > 0
        return loss.item()

    before = held_out()
    cfg = DistillConfig(
        steps=12, batch_size=4, learning_rate=2e-3, feature_weight=0.5, gradient_checkpointing=True
    )
    losses = distill(student, teacher, data, cfg, scheduler, progress=False)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert held_out() < 0.7 * before
    assert not student.gradient_checkpointing and all(not p.requires_grad for p in teacher.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    flex = convert_to_flexdit(_dit(), SMALL)
    x, t, y = _dit_inputs()
    grads = []
    for checkpointing in (False, True):
        flex.zero_grad()
        if checkpointing:
            flex.enable_gradient_checkpointing()
        flex(x, t, y).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in flex.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_distill_config_validation():
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=0)
    with pytest.raises(ValueError, match="label_dropout"):
        DistillConfig(label_dropout=1.0)
    with pytest.raises(ValueError, match="mixed_precision"):
        DistillConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="latents"):
        LatentDataset({"class_labels": torch.zeros(2)})


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--gradient-checkpointing" in capsys.readouterr().out


def test_cli_distils_a_saved_pipeline_folder(tmp_path):
    pipe = tiny_dit_pipeline(num_layers=4, sample_size=16)
    pipe.save_pretrained(tmp_path / "dit")
    latents = tmp_path / "latents.safetensors"
    LatentDataset({"latents": torch.randn(4, 4, 16, 16), "class_labels": torch.tensor([0, 1, 2, 3])}).save(
        latents
    )
    losses = main(["--model", str(tmp_path / "dit"), "--output", str(tmp_path / "out"), "--steps", "2",
                   "--batch-size", "2", "--latents", str(latents), "--pooling-blocks", "1", "--num-modules", "1",
                   "--module-layout", "1,0,1,0", "--top-dense-blocks", "1", "--sparse-grid", "4x4",
                   "--schedule", "linear:0.5:1.0"])  # fmt: skip
    assert len(losses) == 2
    loaded = FlexDiTTransformer2DModel.from_pretrained(tmp_path / "out")
    assert loaded.flex.schedule == LinearSchedule(0.5, 1.0) and loaded.flex.sparse_grid == (4, 4)
    assert json.loads((tmp_path / "out" / "distill_log.json").read_text())["losses"] == losses
