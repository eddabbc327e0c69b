"""Architecture tests, parametrized over the registry so a newly registered model is tested at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import clip_train
from clip_train.models import CLIP, VisionConfig, config_from_state_dict, get_model_config
from clip_train.models.layers import QuickGELU
from clip_train.models.registry import builtin_models

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

# Parameter counts of OpenAI's released models (published; counted from their state dicts).
PUBLISHED_PARAMETERS = {"RN50": 102_007_137, "ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737, "ViT-L-14": 427_616_513}


def meta_model(name: str) -> CLIP:
    """The model with shape-only tensors: every architecture, ViT-L included, builds in milliseconds."""
    with torch.device("meta"):
        return CLIP(get_model_config(name))


# OpenAI's nine and tiny; OpenCLIP's whole zoo is tests/test_zoo.py's.
@pytest.mark.parametrize("name", builtin_models())
def test_every_architecture_produces_embeddings_of_its_width(name: str) -> None:
    model = meta_model(name)
    cfg = model.config
    with torch.device("meta"):
        images = torch.empty(2, 3, cfg.vision.image_size, cfg.vision.image_size)
        tokens = torch.zeros(2, cfg.text.context_length, dtype=torch.long)
        image_features, text_features, scale = model(images, tokens)
    assert image_features.shape == (2, cfg.embed_dim)
    assert text_features.shape == (2, cfg.embed_dim)
    assert scale.shape == ()


# meta_model builds CLIP; inferring a CoCa state dict is tested in tests/test_coca.py.
@pytest.mark.parametrize("name", [n for n in builtin_models() if get_model_config(n).multimodal is None])
def test_architecture_is_inferred_back_from_its_state_dict(name: str) -> None:
    # OpenCLIP ships each of OpenAI's nine in GELU and QuickGELU forms, which weights cannot tell apart:
    # the caller states the activation (OpenAI's release files do, by their layout).
    expected = get_model_config(name)
    inferred = config_from_state_dict(meta_model(name).state_dict(), quick_gelu=False)
    assert inferred.embed_dim == expected.embed_dim
    assert inferred.vision == expected.vision
    assert inferred.text == expected.text


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_the_published_model(name: str) -> None:
    assert sum(p.numel() for p in meta_model(name).parameters()) == PUBLISHED_PARAMETERS[name]


def test_quickgelu_suffix_selects_quickgelu_and_plain_name_gelu() -> None:
    plain = clip_train.create_model("tiny")
    quick = clip_train.create_model("tiny-quickgelu")
    assert isinstance(plain.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert isinstance(quick.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(quick.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    forced = clip_train.create_model("tiny", force_quick_gelu=True, force_patch_dropout=0.5)  # OpenCLIP's kwargs
    assert isinstance(forced.transformer.resblocks[0].mlp.gelu, QuickGELU) and forced.config.quick_gelu
    assert forced.config.patch_dropout == 0.5 and forced.visual.patch_dropout == 0.5


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'ViT-X'.*ViT-B-16"):
        clip_train.create_model("ViT-X")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_hydra_model_configs_match_the_registry(path: Path) -> None:
    from clip_train.models import ModelConfig

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
    if cfg.name == "timm":  # no registry entry: the config itself must build a working model
        from clip_train.models import create_model_from_config

        model = create_model_from_config(cfg).eval()
        with torch.no_grad():
            features = model.encode_image(torch.randn(1, 3, 64, 64), normalize=True)
        assert cfg.vision.timm_model_name == "convnext_tiny" and features.shape == (1, cfg.embed_dim)
        return
    if cfg.architecture_from_name:  # model=openclip: the name alone sets the architecture
        cfg = dataclasses.replace(cfg, architecture_from_name=False)
    assert cfg == get_model_config(cfg.name)


def _model_config(**overrides) -> object:
    from clip_train.models import ModelConfig

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(overrides)))


def test_a_named_architecture_takes_forced_sizes_and_refuses_tower_values_it_would_drop() -> None:
    cfg = _model_config(name="ViT-B-32", architecture_from_name=True, force_image_size=384, force_context_length=32)
    assert cfg.vision.image_size == 384 and cfg.text.context_length == 32
    assert cfg.vision.width == get_model_config("ViT-B-32").vision.width  # the rest is the name's
    # A checkpoint stores the resolved config; it loads back as the same architecture.
    assert _model_config(**OmegaConf.to_container(OmegaConf.structured(cfg))) == cfg
    with pytest.raises(ValueError, match=r"model.vision.image_size=384 would be replaced by ViT-B-32's own \(224\)"
                                         r".*use model.force_image_size=384"):
        _model_config(name="ViT-B-32", architecture_from_name=True, vision={"image_size": 384})
    with pytest.raises(ValueError, match=r"model.text.heads=4 would be replaced.*set the architecture without it"):
        _model_config(name="ViT-B-32", architecture_from_name=True, text={"heads": 4})
    by_hand = _model_config(name="tiny", vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": [2],
                                                  "head_width": 32}, force_image_size=48)
    assert by_hand.vision.image_size == 48
    with pytest.raises(ValueError, match="model.force_context_length=0: give a whole number"):
        _model_config(force_context_length=0)


def test_logit_scale_starts_at_the_configured_temperature_and_is_clamped_at_100() -> None:
    model = clip_train.create_model("tiny")
    assert torch.isclose(model.logit_scale.exp(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    _, _, scale = model(torch.randn(1, 3, 32, 32), torch.tensor([[49406, 49407]]))
    assert torch.isclose(scale, torch.tensor(100.0))


def test_features_are_normalised_and_text_is_read_at_end_token() -> None:
    model = clip_train.create_model("tiny").eval()
    tokenizer = clip_train.get_tokenizer("tiny")
    tokens = tokenizer(["a photo of a cat", "a dog"])
    image_features, text_features, _ = model(torch.randn(2, 3, 32, 32), tokens)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(2))
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(2))
    # Causal attention: tokens after the end token (padding) cannot change the feature.
    padded = tokens.clone()
    padded[0, -1] = 123
    assert torch.allclose(model.encode_text(tokens)[0], model.encode_text(padded)[0], atol=1e-6)


def test_bf16_autocast_forward_on_cpu_stays_close_to_fp32() -> None:
    model = clip_train.create_model("tiny").eval()
    images = torch.randn(4, 3, 32, 32)
    tokens = clip_train.get_tokenizer("tiny")(["one", "two apples", "three cats on a mat", "four"])
    with torch.no_grad():
        reference = model(images, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images, tokens)
    for ref, out in zip(reference[:2], low[:2]):
        assert out.dtype == torch.bfloat16
        cosine = torch.nn.functional.cosine_similarity(ref, out.float(), dim=-1)
        assert cosine.min() > 0.99


def test_layernorm_runs_in_fp32_under_half_inputs() -> None:
    from clip_train.models.layers import LayerNorm

    norm = LayerNorm(8)
    x = (torch.randn(3, 8) * 1000).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), torch.nn.functional.layer_norm(x.float(), (8,)), atol=2e-2)


def test_resnet_reference_init_zeroes_last_bn_and_scales_attnpool() -> None:
    model = clip_train.create_model("RN50")
    blocks = [b for stage in (model.visual.layer1, model.visual.layer4) for b in stage]
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    std = model.visual.attnpool.q_proj.weight.std().item()
    assert abs(std - 2048**-0.5) < 0.1 * 2048**-0.5


def test_timm_model_as_image_tower() -> None:
    cfg = get_model_config("tiny")
    cfg.vision = VisionConfig(image_size=64, timm_model_name="resnet18", patch_size=None)
    model = CLIP(cfg).eval()
    features = model.encode_image(torch.randn(2, 3, 64, 64), normalize=True)
    assert features.shape == (2, cfg.embed_dim)
    assert "visual.trunk.conv1.weight" in model.state_dict()
    assert "visual.head.proj.weight" in model.state_dict()


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    images = torch.randn(2, 3, 32, 32)
    tokens = clip_train.get_tokenizer("tiny")(["a", "b c"])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = clip_train.create_model("tiny")
        model.set_grad_checkpointing(checkpointing)
        image_features, text_features, scale = model(images, tokens)
        (scale * image_features @ text_features.T).logsumexp(dim=1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
