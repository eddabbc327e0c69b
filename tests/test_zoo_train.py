"""Zoo architectures train under the Hydra app by name: ``model=openclip model.name=NAME``.

One architecture of each family OpenCLIP builds from parts we did not have before: our ViT at OpenCLIP-only
widths, timm trunks (ConvNeXt, EVA02, FastViT/MobileCLIP, PE-Core, ViTamin) and SigLIP with its sigmoid loss
and a SentencePiece-style tokenizer read from a local directory. CoCa and an HF text tower train in
``test_coca.py`` and ``test_timm_hf_towers.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of the demo shards for the module's runs (each would otherwise make its own)."""
    return tmp_path_factory.mktemp("zoo-train-cache")


def _train(tmp_path: Path, cache: Path, name: str, *extra: str) -> list[float]:
    args = [*FAST_DEMO, "model=openclip", f"model.name={name}", "data.batch_size=2", "train.max_steps=2",
            "ckpt.every_n_steps=0", f"hydra.run.dir={tmp_path / 'run'}", *extra]
    result = run_cli(args, cache, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    model_cfg = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml").model
    assert model_cfg.name == name and model_cfg.architecture_from_name
    return losses


def _final_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest" / "state.pt", map_location="cpu",
                       weights_only=True)
    return state["model"]


def test_openclip_vit_trains_a_few_steps_under_the_app(tmp_path: Path, demo_cache: Path) -> None:
    # ViT-S-32: an OpenCLIP-only width (384), small enough for two CPU steps at its real 224 px.
    _train(tmp_path, demo_cache, "ViT-S-32")
    # the checkpoint holds ViT-S-32's own shapes (width 384), not the schema's ViT-B-16 defaults
    assert _final_state(tmp_path)["visual.conv1.weight"].shape == (384, 3, 32, 32)


# The smallest name of each timm-trunk family, at its real size (PE-Core-T: 384 px). MobileCLIP2-S0 (a timm
# trunk and a bidirectional text tower) runs in ``make test``; the others, ~20 s each, in ``make test-zoo``.
TIMM_FAMILIES = [
    "MobileCLIP2-S0",
    *(pytest.param(name, marks=pytest.mark.zoo)
      for name in ["convnext_tiny", "ViTamin-S", "EVA02-B-16", "PE-Core-T-16-384", "swin_base_patch4_window7_224",
                   "vit_relpos_medium_patch16_cls_224"]),
]


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_trunk_families_train_under_the_app(tmp_path: Path, demo_cache: Path, name: str) -> None:
    _train(tmp_path, demo_cache, name)
    assert any(key.startswith("visual.trunk.") for key in _final_state(tmp_path))


def _sentencepiece_style_tokenizer(out: Path) -> Path:
    """A Unigram tokenizer with SentencePiece's word-boundary marker, saved as transformers saves one: the
    kind of files SigLIP's tokenizer directory holds (``</s>`` closes a caption, padding is ``<pad>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    captions = ["a photo of a red square", "a blue circle on grey", "two green triangles", "a yellow star"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(captions * 20, trainers.UnigramTrainer(vocab_size=60, unk_token="<unk>",
                                                                  special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(out))
    return out


def test_siglip_trains_with_its_sigmoid_loss_and_a_local_tokenizer(tmp_path: Path, demo_cache: Path) -> None:
    tokenizer = _sentencepiece_style_tokenizer(tmp_path / "tokenizer")
    losses = _train(tmp_path, demo_cache, "ViT-B-16-SigLIP", "loss=siglip", f"tokenizer=hf:{tokenizer}")
    # At init (logit scale 10, bias -10, features nearly orthogonal) each positive pair costs
    # -log sigmoid(-10) ~ 10 and each negative ~ 0; SigLIP divides by the batch, so the loss starts near 10.
    assert 8 < losses[0] < 12
    state = _final_state(tmp_path)
    assert "logit_bias" in state and state["text.token_embedding.weight"].shape[0] == 32000
