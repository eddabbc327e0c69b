"""A zoo architecture trains under the Hydra app by name: ``model=openclip model.name=NAME``."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli


def test_openclip_architecture_trains_a_few_steps_under_the_app(tmp_path: Path) -> None:
    # ViT-S-32: an OpenCLIP-only family (width 384), small enough for two CPU steps at its real 224 px.
    args = [*FAST_DEMO, "model=openclip", "model.name=ViT-S-32", "data.batch_size=2", "train.max_steps=2",
            "ckpt.every_n_steps=0", f"hydra.run.dir={tmp_path}"]
    result = run_cli(args, tmp_path / "cache", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    model_cfg = OmegaConf.load(tmp_path / ".hydra" / "config.yaml").model
    assert model_cfg.name == "ViT-S-32" and model_cfg.architecture_from_name
    # the checkpoint holds ViT-S-32's own shapes (width 384), not the schema's ViT-B-16 defaults
    state = torch.load(tmp_path / "checkpoints" / "latest" / "state.pt", map_location="cpu", weights_only=True)
    assert state["model"]["visual.conv1.weight"].shape == (384, 3, 32, 32)
