"""OpenCLIP's whole model zoo by name: key names and shapes for every architecture, features for one per family.

Parametrized over ``open_clip.list_models()``, so a name OpenCLIP adds is tested as soon as the vendored
configs are refreshed. The full numeric zoo is ``make test-zoo`` (``python -m tests.zoo_parity``).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

import clip_train
from clip_train.models import CLIP, get_model_config
from clip_train.models.openclip_config import openclip_json, openclip_model_names, translate
from clip_train.models.text import TextTransformer
from clip_train.train.optim import parameter_groups
from tests.zoo_reference import (
    example_inputs,
    needs_other_branch,
    numeric_parity,
    openclip_decay_exemption,
    openclip_model,
    ours_on_meta,
    shapes,
)

TOLERANCE = 1e-4


def test_vendored_configs_are_exactly_openclips_names() -> None:
    assert list(openclip_model_names()) == open_clip.list_models()
    assert len(openclip_model_names()) == 144


@pytest.mark.parametrize("name", open_clip.list_models())
def test_state_dict_names_shapes_and_decay_groups_equal_openclips(name: str) -> None:
    reason = needs_other_branch(name)
    if reason:
        pytest.skip(reason)
    try:
        reference = openclip_model(name, device="meta")
    except OSError as err:  # an HF text tower whose config neither the Hub (offline) nor our table gives
        pytest.skip(f"OpenCLIP cannot build {name} offline: {str(err).splitlines()[0][:80]}")
    ours = ours_on_meta(name)
    assert shapes(ours.state_dict()) == shapes(reference.state_dict())
    # optim.no_decay=openclip: the same tensors decayed as in OpenCLIP's run (its names carry DDP's "module.").
    exempt = openclip_decay_exemption()
    openclip_exempt = {n for n, p in reference.named_parameters() if exempt(f"module.{n}", p)}
    names = {id(p): n for n, p in ours.named_parameters()}
    decayed, exempted = parameter_groups(ours, 0.1, no_decay="openclip")
    assert {names[id(p)] for p in exempted["params"]} == openclip_exempt
    assert {names[id(p)] for p in decayed["params"]} == {n for n, _ in reference.named_parameters()} - openclip_exempt


# The smallest architecture of each family our own towers cover (-alt: layer scale). CLIPA's smallest
# (ViT-L-14-CLIPA, 67 s here) runs in ``make test-zoo``; its options are checked below at a small width.
PARITY_NAMES = ["ViT-S-32", "ViT-M-16-alt"]


@pytest.mark.parametrize("name", PARITY_NAMES)
def test_openclip_weights_load_by_name_with_equal_features(name: str, tmp_path: Path) -> None:
    result = numeric_parity(name, tmp_path)
    assert result.image_delta < TOLERANCE
    assert result.text_delta < TOLERANCE


def test_clipa_options_match_openclip_at_a_small_width(tmp_path: Path) -> None:
    """ViT-L-14-CLIPA's JSON with its widths cut: no ln_pre, average pooling, LN after pooling, bidirectional
    text pooled at the last token, through the translator and OpenCLIP's own CLIP."""
    doc = openclip_json("ViT-L-14-CLIPA")
    doc["vision_cfg"].update(layers=2, width=128, image_size=56)
    doc["text_cfg"].update(layers=2, width=128, heads=2, vocab_size=1000)
    doc["embed_dim"] = 64
    cfg, missing = translate(doc, "clipa-small")
    assert not missing and cfg.vision.no_ln_pre and cfg.vision.pool_type == "avg" and cfg.text.no_causal_mask
    reference_doc = {k: v for k, v in doc.items() if k != "custom_text"}
    reference = open_clip.CLIP(**reference_doc).eval()  # CLIPA keeps the text tower at the top level
    ours = CLIP(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images, tokens = example_inputs(ours)
    with torch.no_grad():
        assert (ours.encode_image(images, True) - reference.encode_image(images, True)).abs().max() < TOLERANCE
        assert (ours.encode_text(tokens, True) - reference.encode_text(tokens, True)).abs().max() < TOLERANCE


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "coca_ViT-B-32"])
def test_custom_text_towers_match_openclips(name: str) -> None:
    """Text towers whose image side lives elsewhere, on their own. SigLIP: no causal mask, last-token pooling,
    biased projection, eps 1e-6. CoCa: the appended class token with OpenCLIP's padding mask."""
    cfg, _ = translate(openclip_json(name), name)  # the text side only: the image side may need another module
    reference_cfg = open_clip.get_model_config(name)
    torch.manual_seed(0)
    reference = open_clip.model._build_text_tower(reference_cfg["embed_dim"], reference_cfg["text_cfg"]).eval()
    ours = TextTransformer(cfg.text, cfg.embed_dim).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    tokens = torch.randint(3, cfg.text.vocab_size, (2, cfg.text.context_length))
    tokens[0, 10:] = 0 if cfg.text.embed_cls else 1  # padding: CoCa pads with 0, SigLIP with its eos id
    tokens[1, 40:] = tokens[0, -1]
    with torch.no_grad():
        expected = reference(tokens)
        expected = expected[0] if isinstance(expected, tuple) else expected  # CoCa also returns its tokens
        delta = (torch.nn.functional.normalize(ours(tokens), dim=-1)
                 - torch.nn.functional.normalize(expected, dim=-1)).abs().max()
    assert float(delta) < TOLERANCE


def test_quickgelu_twin_of_an_openclip_name_selects_quickgelu() -> None:
    assert get_model_config("ViT-M-16-quickgelu").quick_gelu
    assert not get_model_config("ViT-M-16").quick_gelu
    assert get_model_config("ViT-H-14-quickgelu").vision.head_width == 80


def test_unknown_name_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError) as err:
        clip_train.create_model("ViT-Q-99")
    assert "\n" not in str(err.value) and "python -m clip_train.models" in str(err.value)


def test_model_listing_counts_parameters_like_openclip(capsys: pytest.CaptureFixture[str]) -> None:
    from clip_train.models.__main__ import main

    assert main(["--json", "ViT-M-16-alt", "RN50", "ViT-L-14-worldwide"]) == 0
    rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["ViT-M-16-alt"]["parameters"] == sum(p.numel() for p in openclip_model("ViT-M-16-alt", "meta").parameters())
    worldwide_tokenizer = open_clip.get_model_config("ViT-L-14-worldwide")["text_cfg"]["hf_tokenizer_name"]
    assert rows["ViT-L-14-worldwide"]["tokenizer"] == f"hf:{worldwide_tokenizer}"
    assert rows["RN50"]["tokenizer"] == "CLIP BPE" and rows["RN50"]["family"] == "ModifiedResNet"
    assert main(["ViT-Q-99"]) == 2
    assert "unknown model 'ViT-Q-99'" in capsys.readouterr().err


def test_translator_refuses_keys_it_does_not_know() -> None:
    doc = openclip_json("ViT-S-32")
    doc["vision_cfg"]["qk_norm"] = True
    with pytest.raises(ValueError, match="unknown OpenCLIP config key 'qk_norm'"):
        translate(doc, "ViT-S-32")


def test_timm_and_hf_keys_map_onto_their_tower_fields_or_are_reported_missing() -> None:
    """timm heads and HF text towers live in other modules: their keys land on fields of the same name."""
    cfg, missing = translate(openclip_json("ViT-B-16-SigLIP"), "ViT-B-16-SigLIP")
    assert cfg.vision.timm_model_name == "vit_base_patch16_siglip_224" and cfg.init_logit_bias == -10
    assert cfg.custom_text and cfg.text.no_causal_mask and cfg.text.pool_type == "last" and cfg.text.norm_eps == 1e-6
    if hasattr(cfg.vision, "timm_pool"):
        assert (cfg.vision.timm_pool, cfg.vision.timm_proj) == ("map", "none") and not missing
    else:  # and the name is refused rather than built with another head than OpenCLIP's
        assert {"ViT-B-16-SigLIP vision_cfg.timm_pool", "ViT-B-16-SigLIP vision_cfg.timm_proj"} <= set(missing)
        with pytest.raises(ValueError, match="needs tower options this build lacks"):
            clip_train.create_model("ViT-B-16-SigLIP")
    cfg, missing = translate(openclip_json("roberta-ViT-B-32"), "roberta-ViT-B-32")
    assert cfg.custom_text
    if hasattr(cfg.text, "hf_model_name"):
        assert cfg.text.hf_model_name == "roberta-base" and not missing
    else:
        assert "roberta-ViT-B-32 text_cfg.hf_model_name" in missing


def test_coca_multimodal_cfg_becomes_a_typed_multimodal_config() -> None:
    cfg = get_model_config("coca_ViT-B-32")
    assert cfg.multimodal is not None and cfg.custom_text
    assert (cfg.multimodal.width, cfg.multimodal.layers, cfg.multimodal.context_length) == (512, 12, 76)
    assert cfg.vision.attentional_pool and cfg.text.embed_cls


def test_attentional_pooler_image_tower_matches_openclips() -> None:
    """CoCa's image tower on its own: the attentional pooler (``attn_pool.*``) before ``ln_post`` and ``proj``."""
    from clip_train.models.clip import build_image_tower

    name = "coca_ViT-B-32"
    cfg = get_model_config(name)
    reference_cfg = open_clip.get_model_config(name)
    torch.manual_seed(0)
    reference = open_clip.model._build_vision_tower(reference_cfg["embed_dim"], reference_cfg["vision_cfg"]).eval()
    ours = build_image_tower(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        expected = reference(images)
        expected = expected[0] if isinstance(expected, tuple) else expected  # CoCa also returns its tokens
        assert (ours(images) - expected).abs().max() < TOLERANCE
