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
