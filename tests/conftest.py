"""Shared test setup: no network, deterministic threads, tiny models come from mmaccel.testing."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waits
# make small ops up to 1000x slower. Multi-process tests set OMP_NUM_THREADS for their children.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_diffusers_attention_backend():
    """``model.set_attention_backend`` also changes diffusers' process-wide default (and
    ``reset_attention_backend`` does not restore it): put the default back after every test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)
