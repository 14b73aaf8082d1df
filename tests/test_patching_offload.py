"""apply / offload / remove in any order leaves offloading working (remove undoes only what is ours)."""


import pytest
import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention_processor import AttnProcessor2_0

from mmaccel.runtime.patching import PatchHandle
from mmaccel.testing import call_kwargs, tiny_pixart_pipeline
from mmaccel.testing.offload import OFFLOAD_KINDS, enable_offload


class Shift(ModelHook):
    def post_forward(self, module, output):
        return output + 0.25 if isinstance(output, torch.Tensor) else output


class Halve(AttnProcessor2_0):
    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 0.5 * super().__call__(attn, hidden_states, *args, **kwargs)


def _patch(transformer):
    handle = PatchHandle(transformer, "offload-test")
    handle.add_diffusers_hook(transformer, Shift(), "shift")  # the module accelerate's model offload wraps
    for block in transformer.transformer_blocks:
        handle.add_diffusers_hook(block, Shift(), "shift")
        handle.set_processor(block.attn1, Halve())
    return handle


def _offload_calls(pipe, kind):
    """Count calls through the offloading machinery while the pipeline runs once."""
    calls = []
    if kind == "model":  # accelerate calls module._hf_hook.pre_forward at every forward
        owner, name = pipe.transformer._hf_hook, "pre_forward"
    else:  # diffusers' group offloading onloads through hook.group.onload_()
        owner, name = pipe.transformer.transformer_blocks[0]._diffusers_hook.get_hook("group_offloading").group, "onload_"
    original = getattr(owner, name)
    setattr(owner, name, lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    images = pipe(**{**call_kwargs("pixart"), "output_type": "pt"}).images
    setattr(owner, name, original)
    return len(calls), images


@pytest.mark.parametrize("kind", OFFLOAD_KINDS)
@pytest.mark.parametrize("order", ["apply-offload-remove", "offload-apply-remove"])
def test_offloading_survives_remove(kind, order):
    dense = tiny_pixart_pipeline()(**{**call_kwargs("pixart"), "output_type": "pt"}).images
    pipe = tiny_pixart_pipeline()
    if order == "apply-offload-remove":
        handle = _patch(pipe.transformer)
        enable_offload(pipe, kind)
    else:
        enable_offload(pipe, kind)
        handle = _patch(pipe.transformer)
    calls, patched = _offload_calls(pipe, kind)
    assert calls > 0 and not torch.allclose(patched, dense)
    handle.remove()
    calls, restored = _offload_calls(pipe, kind)
    assert calls > 0, "remove() dropped the offload hook"
    torch.testing.assert_close(restored, dense, rtol=0, atol=1e-6)


def test_remove_keeps_a_processor_set_after_apply():
    pipe = tiny_pixart_pipeline()
    attn = pipe.transformer.transformer_blocks[0].attn1
    handle = _patch(pipe.transformer)
    user = AttnProcessor2_0()
    attn.set_processor(user)
    handle.remove()
    assert attn.processor is user
