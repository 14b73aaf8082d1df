import pytest
import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from mmaccel.runtime.patching import PatchHandle


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.attn = Attention(query_dim=8, heads=2, dim_head=4)
        self.scale = 1.0

    def forward(self, x):
        return self.attn(self.proj(x)) * self.scale


class AddOne(ModelHook):
    def post_forward(self, module, output):
        return output + 1


class DoubleProcessor(AttnProcessor2_0):
    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 2 * super().__call__(attn, hidden_states, *args, **kwargs)


def _snapshot(model):
    return {name: dict(vars(m)) for name, m in model.named_modules()}


def _patch_everything(model):
    handle = PatchHandle(model, "test-technique")
    handle.set_attr(model, "scale", 3.0)
    handle.set_attr(model.proj, "extra_flag", True)  # attribute that did not exist
    handle.add_torch_hook(model.proj.register_forward_hook(lambda m, i, o: o * 0.5))
    handle.add_diffusers_hook(model.attn, AddOne(), "add_one")
    handle.set_processor(model.attn, DoubleProcessor())
    undone = []
    handle.on_remove(lambda: undone.append(True))
    return handle, undone


def test_remove_restores_bit_for_bit():
    torch.manual_seed(0)
    model, other = Block(), Block()
    x = torch.randn(2, 5, 8)
    before, other_before = model(x), other(x)
    state, snap = {k: v.clone() for k, v in model.state_dict().items()}, _snapshot(model)
    processor = model.attn.processor

    handle, undone = _patch_everything(model)
    patched = model(x)
    assert not torch.allclose(patched, before)
    assert torch.equal(other(x), other_before)  # other instance untouched
    assert Block.forward is Block.__dict__["forward"] and not hasattr(Block, "extra_flag")
    assert type(model.attn).forward is Attention.forward

    handle.remove()
    assert undone == [True]
    assert torch.equal(model(x), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.attn.processor is processor
    assert _snapshot(model).keys() == snap.keys()
    for name, attrs in _snapshot(model).items():
        assert attrs.keys() == snap[name].keys(), name
    assert not handle.active
    handle.remove()  # idempotent


def test_apply_twice_refused_until_removed():
    model = Block()
    handle = PatchHandle(model, "x")
    with pytest.raises(ValueError, match="already applied"):
        PatchHandle(model, "x")
    PatchHandle(model, "y").remove()  # another technique is fine
    handle.remove()
    PatchHandle(model, "x").remove()


def test_context_manager_removes():
    model = Block()
    x = torch.randn(1, 3, 8)
    before = model(x)
    with PatchHandle(model, "ctx") as handle:
        handle.set_attr(model, "scale", 0.0)
        assert torch.equal(model(x), torch.zeros_like(before))
    assert torch.equal(model(x), before)
    assert "ctx" in repr(handle) and "removed" in repr(handle)


def test_diffusers_hook_keeps_preexisting_registry():
    model = Block()
    x = torch.randn(1, 3, 8)
    first = PatchHandle(model, "a")
    first.add_diffusers_hook(model.attn, AddOne(), "one")
    second = PatchHandle(model, "b")
    second.add_diffusers_hook(model.attn, AddOne(), "two")
    out2 = model(x)
    second.remove()
    assert hasattr(model.attn, "_diffusers_hook")  # still used by the first handle
    out1 = model(x)
    first.remove()
    base = model(x)
    assert not hasattr(model.attn, "_diffusers_hook") and "forward" not in vars(model.attn)
    assert torch.allclose(out2 - out1, out1 - base)


def test_processor_swap_restores_original_object():
    model = Block()
    model.attn.set_processor(AttnProcessor())
    original = model.attn.processor
    with PatchHandle(model, "p") as handle:
        handle.set_processor(model.attn, DoubleProcessor())
        assert isinstance(model.attn.processor, DoubleProcessor)
    assert model.attn.processor is original
