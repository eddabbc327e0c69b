"""Shared fixtures. Tests never download anything and run on CPU."""

from __future__ import annotations

import os

import pytest
import torch

# No network here: the Hugging Face hub fails at once instead of retrying connections (each OpenCLIP model
# with an HF text tower otherwise spent ~23 s timing out before its test skipped).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _deterministic_cpu() -> None:
    torch.manual_seed(0)
