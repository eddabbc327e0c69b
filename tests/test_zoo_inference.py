"""Weights loaded without a name: exactly one architecture, from metadata or a unique match, or a one-line refusal."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

import clip_train
from clip_train.models import CheckpointError, config_from_state_dict
from tests.zoo_reference import example_inputs, openclip_model

TOLERANCE = 1e-4


def test_vit_h_16_is_inferred_with_openclips_16_heads_not_20() -> None:
    """ViT-H-16 has one name, so its weights resolve, with head width 80 (not inferable, never defaulted to 64)."""
    cfg = config_from_state_dict(openclip_model("ViT-H-16", device="meta").state_dict())
    assert cfg.name == "ViT-H-16"
    assert cfg.vision.width // cfg.vision.head_width == 16


@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-L-14-worldwide"])
def test_weights_that_fit_two_architectures_are_refused_in_one_line(name: str) -> None:
    with pytest.raises(CheckpointError) as err:
        config_from_state_dict(openclip_model(name, device="meta").state_dict())
    message = str(err.value)
    assert "\n" not in message
    assert f"{name}, {name}-quickgelu" in message and "quick_gelu" in message and "pass the model name" in message


def test_unknown_shapes_are_refused() -> None:
    state = clip_train.create_model("tiny").state_dict()
    state["visual.proj"] = torch.zeros(64, 7)
    with pytest.raises(CheckpointError, match="no known architecture"):
        config_from_state_dict(state)


def test_openclip_config_beside_the_weights_decides(tmp_path: Path) -> None:
    """OpenCLIP's hub layout: open_clip_config.json next to the weights states the activation the weights cannot."""
    model_cfg = dict(open_clip.get_model_config("ViT-S-32"), quick_gelu=True)
    torch.manual_seed(0)
    reference = open_clip.CLIP(**model_cfg).eval()
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    ours = clip_train.create_model(None, pretrained=tmp_path / "open_clip_pytorch_model.bin").eval()
    assert ours.config.quick_gelu
    images, tokens = example_inputs(ours)
    with torch.no_grad():
        assert (ours.encode_image(images, True) - reference.encode_image(images, True)).abs().max() < TOLERANCE
        assert (ours.encode_text(tokens, True) - reference.encode_text(tokens, True)).abs().max() < TOLERANCE


def test_openclip_training_checkpoint_names_its_architecture(tmp_path: Path) -> None:
    """OpenCLIP's training checkpoints record the architecture name (``name``): it resolves the ambiguity."""
    state = clip_train.create_model("ViT-S-32-quickgelu").state_dict()
    torch.save({"epoch": 1, "name": "ViT-S-32-quickgelu", "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "epoch_1.pt")
    model = clip_train.create_model(None, pretrained=tmp_path / "epoch_1.pt")
    assert model.config.name == "ViT-S-32-quickgelu" and model.config.quick_gelu
