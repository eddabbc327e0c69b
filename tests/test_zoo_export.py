"""Zoo architectures go back to OpenCLIP: ``python -m clip_train.export --format open_clip`` and ``local-dir:``."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

import clip_train
from clip_train.export import main as export_main
from tests.zoo_reference import example_inputs

TOLERANCE = 1e-4


# ViT-M-16-alt: layer scale, a key set OpenAI's layout does not have; coca_tiny: OpenCLIP's CoCa needs the
# towers' output_tokens flags in the config; MobileCLIP2-S0: a timm trunk with a bidirectional text tower.
@pytest.mark.parametrize("name", ["ViT-M-16-alt", "coca_tiny", "MobileCLIP2-S0"])
def test_open_clip_export_loads_in_openclip_with_equal_features(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = clip_train.create_model(name).eval()
    torch.save(ours.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "export"
    assert export_main([str(tmp_path / "weights.pt"), "--format", "open_clip", "--out", str(out), "--model", name]) == 0
    reference = open_clip.create_model(f"local-dir:{out}").eval()
    images, tokens = example_inputs(ours)
    with torch.no_grad():
        assert (ours.encode_image(images, True) - reference.encode_image(images, True)).abs().max() < TOLERANCE
        assert (ours.encode_text(tokens, True) - reference.encode_text(tokens, True)).abs().max() < TOLERANCE
    # and the directory comes back into clip_train without a name: its open_clip_config.json says what it is
    again = clip_train.create_model(None, pretrained=out).eval()
    assert again.config.vision.ls_init_value == ours.config.vision.ls_init_value
    with torch.no_grad():
        assert torch.equal(again.encode_image(images), ours.encode_image(images))
