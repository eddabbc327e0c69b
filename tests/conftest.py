"""Shared fixtures. Tests never download anything and run on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from clip_train.train.distributed import shutdown

# No network here: the Hugging Face hub fails at once instead of retrying connections (each OpenCLIP model
# with an HF text tower otherwise spent ~23 s timing out before its test skipped).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _deterministic_cpu() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_rank_group(tmp_path: Path):
    """A real one-process gloo group: enough for fully_shard and DCP, without spawning processes."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        shutdown()


@pytest.fixture
def open_clip_registry(monkeypatch):
    """open_clip.add_model_config for one test: the names it registers ("tiny") leave with the test, so the zoo
    tests in the same process still see exactly OpenCLIP's own model list."""
    open_clip_factory = pytest.importorskip("open_clip.factory")
    monkeypatch.setattr(open_clip_factory, "_MODEL_CONFIG_PATHS", list(open_clip_factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(open_clip_factory, "_MODEL_CONFIGS", dict(open_clip_factory._MODEL_CONFIGS))
