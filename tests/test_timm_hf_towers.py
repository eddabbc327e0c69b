"""timm image towers and Hugging Face text towers against OpenCLIP's own TimmModel / HFTextEncoder.

Every OpenCLIP model config with a timm image tower is rebuilt on the meta device by both libraries and
must give the same ``visual.*`` names and shapes; the smallest architecture of each timm family, and each
of OpenCLIP's head variants on a small trunk, must give the same features on the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from importlib import resources

import pytest
import torch
from torch import nn

import clip_train
from clip_train.models.config import ModelConfig, VisionConfig
from clip_train.models.timm_tower import build_timm_tower

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.timm_model import TimmModel

_CONFIG_DIR = resources.files("open_clip") / "model_configs"
_VISION_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)}


def _openclip_json(name: str) -> dict:
    return json.loads((_CONFIG_DIR / f"{name}.json").read_text())


def _timm_names() -> list[str]:
    names = []
    for path in _CONFIG_DIR.iterdir():
        if path.name.endswith(".json") and "timm_model_name" in json.loads(path.read_text())["vision_cfg"]:
            names.append(path.name[: -len(".json")])
    return sorted(names)


def _head_and_family(name: str) -> tuple:
    """(trunk family, pooling, projection, bias) of a config: the trunk name without its size/resolution tokens."""
    vision = _openclip_json(name)["vision_cfg"]
    family = re.sub(
        r"_(\d+|patch\d+|tiny|small|base|large2?|xlarge|xxlarge|giant\w*|enormous|gigantic|so400m|medium|mci\d|w\d+)",
        "", vision["timm_model_name"],
    )
    return family, vision.get("timm_pool"), vision.get("timm_proj"), vision.get("timm_proj_bias")


def _meta_names(names: list[str]) -> list[str]:
    """Every timm-based name with CLIP_TRAIN_TEST_ZOO=1; otherwise one per (trunk family, head), 14 today:
    the other names differ from their representative only in model size or resolution."""
    if os.environ.get("CLIP_TRAIN_TEST_ZOO") == "1":
        return names
    first: dict[tuple, str] = {}
    for name in names:
        first.setdefault(_head_and_family(name), name)
    return list(first.values())


def _our_config(name: str) -> ModelConfig:
    """Our ModelConfig for the image tower of OpenCLIP config ``name`` (the JSON keys are our field names)."""
    cfg = _openclip_json(name)
    vision = {k: v for k, v in cfg["vision_cfg"].items() if k in _VISION_FIELDS}
    return ModelConfig(name=name, embed_dim=cfg["embed_dim"], vision=VisionConfig(patch_size=None, **vision))


def _openclip_tower(name: str) -> nn.Module:
    cfg = _openclip_json(name)
    return _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]))


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


TIMM_NAMES = _timm_names()


def test_every_timm_family_of_the_zoo_is_covered() -> None:
    families = {_head_and_family(n)[0] for n in _meta_names(TIMM_NAMES)}
    assert {"convnext", "eva02_clip", "eva", "vit_siglip", "vitamin", "fastvit", "vit_mci", "vit_pe_core"} <= families
    assert len(TIMM_NAMES) >= 70


@pytest.mark.parametrize("name", _meta_names(TIMM_NAMES))
def test_timm_tower_names_and_shapes_equal_openclip_on_meta(name: str) -> None:
    with torch.device("meta"):
        theirs = _shapes(_openclip_tower(name))
        ours = _shapes(build_timm_tower(_our_config(name)))
    assert ours == theirs


# The smallest architecture of each timm family in OpenCLIP's zoo, compared numerically (the rest on meta).
SMALLEST_PER_FAMILY = [
    "convnext_tiny",  # convnext: model's default pool + linear projection
    "EVA02-B-16",  # EVA02: the trunk's own head on the class token
    "ViT-B-32-SigLIP2-256",  # SigLIP / SigLIP 2: 'map' attention-pool head, no projection
    "ViTamin-S",  # ViTamin
    "MobileCLIP2-S0",  # MobileCLIP / MobileCLIP2: FastViT-MCi, 'avg' + the trunk's own head
    "PE-Core-T-16-384",  # PE-Core: 'map' head with the trunk's own projection
]


def _same_weights(ours: nn.Module, theirs: nn.Module) -> None:
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected


@pytest.mark.parametrize("name", SMALLEST_PER_FAMILY)
def test_smallest_timm_architecture_of_each_family_gives_openclips_features(name: str) -> None:
    torch.manual_seed(0)
    theirs = _openclip_tower(name).eval()
    ours = build_timm_tower(_our_config(name)).eval()
    _same_weights(ours, theirs)
    size = _openclip_json(name)["vision_cfg"].get("image_size", 224)
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected, got = theirs(images), ours.encode(images)
    assert got.shape == (1, _openclip_json(name)["embed_dim"])
    assert (got - expected).abs().max().item() < 1e-4


# OpenCLIP's head variants on small trunks: (trunk, image size, pool, proj, proj_bias).
HEAD_VARIANTS = [
    ("resnet10t", 64, "avg", "linear", False),
    ("resnet10t", 64, "", "mlp", True),
    ("resnet10t", 64, "max", "mlp", False),
    ("resnet10t", 224, "abs_attn", None, False),  # abs_attn's position table is sized for timm's 7x7 map
    ("resnet10t", 96, "rot_attn", "linear", True),
    ("resnet10t", 64, "avg", "none", False),
    ("vit_tiny_patch16_224", 224, "token", None, False),
    ("vit_tiny_patch16_224", 224, "avg", "linear", True),
]


@pytest.mark.parametrize("trunk,size,pool,proj,proj_bias", HEAD_VARIANTS)
def test_head_variants_equal_openclips_timm_model(trunk: str, size: int, pool: str, proj, proj_bias: bool) -> None:
    embed_dim = 32
    theirs = TimmModel(trunk, embed_dim, image_size=size, pool=pool, proj=proj, proj_bias=proj_bias).eval()
    vision = VisionConfig(
        image_size=size, patch_size=None, timm_model_name=trunk, timm_pool=pool, timm_proj=proj,
        timm_proj_bias=proj_bias,
    )
    ours = build_timm_tower(ModelConfig(name="t", embed_dim=embed_dim, vision=vision)).eval()
    assert _shapes(ours) == _shapes(theirs)
    _same_weights(ours, theirs)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = theirs(images), ours(images)
    assert got.shape == expected.shape
    assert got.shape[1] == ours.output_dim
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("trunk,pool,proj,table_rows", [
    ("vit_tiny_patch16_224", "token", None, 1 + 4 * 4),  # 16-pixel patches: a 4x4 grid and the class token
    ("vit_tiny_patch16_224", "avg", "linear", 1 + 4 * 4),
    ("eva02_tiny_patch14_224", "token", None, 1 + 4 * 4),  # EVA02: rotary positions follow the grid too
])
def test_a_timm_vit_at_another_image_size_equals_openclips_force_image_size(
    trunk: str, pool: str, proj, table_rows: int
) -> None:
    """A trunk with a fixed patch grid is set to the tower's size, as OpenCLIP's set_input_size does (it would
    otherwise refuse the first batch); a convolutional trunk keeps timm's build and takes any size."""
    size = 64 if "patch16" in trunk else 56
    theirs = TimmModel(trunk, 32, image_size=size, pool=pool, proj=proj).eval()
    theirs.set_input_size(size)  # what OpenCLIP's create_model(force_image_size=size) does
    vision = VisionConfig(image_size=size, patch_size=None, timm_model_name=trunk, timm_pool=pool, timm_proj=proj)
    ours = build_timm_tower(ModelConfig(name="t", embed_dim=32, vision=vision)).eval()
    assert ours.resized_trunk and ours.timm_image_size == (224, 224)
    assert _shapes(ours) == _shapes(theirs) and ours.trunk.pos_embed.shape[1] == table_rows
    _same_weights(ours, theirs)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert (ours(images) - theirs(images)).abs().max().item() < 1e-5
    convnet = build_timm_tower(ModelConfig(name="c", embed_dim=32, vision=dataclasses.replace(
        vision, timm_model_name="resnet10t", timm_pool="avg", timm_proj="linear")))
    assert not convnet.resized_trunk and convnet(images).shape == (2, 32)


def test_a_timm_clip_model_trains_one_step_and_loads_openclips_visual_keys() -> None:
    from clip_train.models.clip import CLIP
    from clip_train.models.registry import get_model_config

    cfg = get_model_config("tiny")
    cfg.vision = VisionConfig(image_size=64, patch_size=None, timm_model_name="resnet10t", timm_pool="",
                              timm_proj="mlp", timm_drop=0.1)
    model = CLIP(cfg)
    theirs = TimmModel("resnet10t", cfg.embed_dim, image_size=64, pool="", proj="mlp", drop=0.1)
    assert set(model.visual.state_dict()) == set(theirs.state_dict())
    image_features, text_features, scale = model(torch.randn(2, 3, 64, 64), torch.randint(0, 100, (2, 8)))
    (scale * image_features @ text_features.T).logsumexp(1).sum().backward()
    assert model.visual.head.mlp.fc1.weight.grad is not None


def test_unknown_timm_projection_is_one_clear_error() -> None:
    vision = VisionConfig(patch_size=None, timm_model_name="resnet10t", timm_proj="conv")
    with pytest.raises(ValueError, match="timm_proj='conv'"):
        build_timm_tower(ModelConfig(name="t", embed_dim=8, vision=vision))


# ---------------------------------------------------------------------------------------------------------
# Hugging Face text towers
# ---------------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from open_clip.model import CLIPTextCfg, _build_text_tower

from clip_train.models.config import TextConfig
from clip_train.models.hf_text import KNOWN_ARCHITECTURES, build_hf_text_tower, resolve_hf_config

# OpenCLIP names with an HF text tower -> a tiny config of the same architecture (transformers' own classes).
TINY_HF_CONFIGS = {
    "roberta-ViT-B-32": lambda: transformers.RobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1),
    "xlm-roberta-base-ViT-B-32": lambda: transformers.XLMRobertaConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1),
    "mt5-base-ViT-B-32": lambda: transformers.MT5Config(
        vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4),
    "nllb-clip-base": lambda: transformers.M2M100Config(
        vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40,
        scale_embedding=True, pad_token_id=1),
}


def _openclip_hf_text_tower(name: str, config, monkeypatch) -> nn.Module:
    """OpenCLIP's own HFTextEncoder for ``name``, its AutoConfig lookup answered with ``config`` (no download)."""
    from open_clip import hf_model

    cfg = _openclip_json(name)
    text_cfg = dict(cfg["text_cfg"], hf_model_pretrained=False)
    monkeypatch.setattr(hf_model.AutoConfig, "from_pretrained", lambda *a, **k: config)
    return _build_text_tower(cfg["embed_dim"], CLIPTextCfg(**text_cfg))


def _our_text_config(name: str, config_dir=None) -> TextConfig:
    text_cfg = _openclip_json(name)["text_cfg"]
    fields = {f.name for f in dataclasses.fields(TextConfig)}
    return TextConfig(hf_config_dir=config_dir, **{k: v for k, v in text_cfg.items() if k in fields})


def _padded_tokens(pad: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (3, 12), generator=generator)
    tokens[:, 0] = 0
    tokens[1, 7:] = pad  # padded rows: padding must not change the features
    tokens[2, 4:] = pad
    return tokens


@pytest.mark.parametrize("name", sorted(TINY_HF_CONFIGS))
def test_hf_text_tower_built_from_a_local_config_gives_openclips_features(name: str, tmp_path, monkeypatch) -> None:
    config = TINY_HF_CONFIGS[name]()
    config.save_pretrained(tmp_path)
    embed_dim = _openclip_json(name)["embed_dim"]
    theirs = _openclip_hf_text_tower(name, config, monkeypatch).eval()
    ours = build_hf_text_tower(ModelConfig(embed_dim=embed_dim, text=_our_text_config(name, str(tmp_path)))).eval()
    assert _shapes(ours) == _shapes(theirs)
    _same_weights(ours, theirs)
    tokens = _padded_tokens(config.pad_token_id, config.vocab_size)
    with torch.no_grad():
        expected, got = theirs(tokens), ours.encode(tokens)
    assert got.shape == (3, embed_dim)
    assert (got - expected).abs().max().item() < 1e-4


def test_clip_with_an_hf_text_tower_has_openclips_text_keys_and_trains(tmp_path, monkeypatch) -> None:
    from clip_train.models.clip import CLIP
    from clip_train.models.registry import get_model_config

    name = "xlm-roberta-base-ViT-B-32"
    config = TINY_HF_CONFIGS[name]()
    config.save_pretrained(tmp_path)
    cfg = dataclasses.replace(get_model_config("tiny"), text=_our_text_config(name, str(tmp_path)))
    model = CLIP(cfg)
    theirs = _openclip_hf_text_tower(name, config, monkeypatch)
    text_keys = {k for k in model.state_dict() if k.startswith("text.")}
    assert text_keys == {f"text.{k}" for k in theirs.state_dict()}
    assert not any(k.startswith(("token_embedding", "transformer.", "ln_final", "text_projection")) for k in model.state_dict())
    tokens = _padded_tokens(config.pad_token_id, config.vocab_size)[:2]
    image_features, text_features, scale = model(torch.randn(2, 3, 32, 32), tokens)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(2))
    (scale * image_features @ text_features.T).logsumexp(1).sum().backward()
    assert model.text.transformer.embeddings.word_embeddings.weight.grad is not None


def test_hf_config_saved_beside_the_checkpoint_is_used(tmp_path) -> None:
    config = TINY_HF_CONFIGS["mt5-base-ViT-B-32"]()
    config.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    resolved = resolve_hf_config("google/mt5-base", pretrained=str(weights))
    assert (resolved.model_type, resolved.d_model, resolved.num_layers) == ("mt5", 32, 2)
    # A config of another architecture beside the file (e.g. an HF CLIP export) is not taken for the text tower.
    transformers.CLIPConfig().save_pretrained(tmp_path)
    assert resolve_hf_config("google/mt5-base", pretrained=str(weights)).d_model == 768


def test_unknown_hf_architecture_without_a_config_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="hf_config_dir"):
        resolve_hf_config("someone/unknown-bert")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_hf_config("roberta-base", config_dir=str(tmp_path))


HF_NAMES = sorted(n for n in (p.name[:-5] for p in _CONFIG_DIR.iterdir() if p.name.endswith(".json"))
                  if "hf_model_name" in _openclip_json(n)["text_cfg"] and not n.startswith("coca"))


def test_every_hf_text_architecture_of_the_zoo_builds_offline() -> None:
    assert {_openclip_json(n)["text_cfg"]["hf_model_name"] for n in HF_NAMES} <= set(KNOWN_ARCHITECTURES)


@pytest.mark.parametrize("name", HF_NAMES)
def test_full_size_hf_text_tower_names_and_shapes_equal_openclip_on_meta(name: str, monkeypatch) -> None:
    config = resolve_hf_config(_openclip_json(name)["text_cfg"]["hf_model_name"])
    with torch.device("meta"):
        theirs = _shapes(_openclip_hf_text_tower(name, config, monkeypatch))
        ours = _shapes(build_hf_text_tower(ModelConfig(embed_dim=_openclip_json(name)["embed_dim"], text=_our_text_config(name))))
    assert ours == theirs


@pytest.mark.slow  # a subprocess run of the app (builds the demo digits once)
def test_timm_head_and_hf_text_tower_train_under_the_app(tmp_path) -> None:
    from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli
    from tests.test_hf_tokenizer import _byte_bpe_dir

    tokenizer_dir = _byte_bpe_dir(tmp_path)
    config_dir = tmp_path / "xlmr"
    transformers.XLMRobertaConfig(
        vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
    ).save_pretrained(config_dir)
    run_dir = tmp_path / "run"
    result = run_cli([
        *FAST_DEMO, "model=timm", "model.name=tiny-timm-xlmr", "model.embed_dim=32", "model.vision.image_size=32",
        "model.vision.timm_model_name=resnet10t", "model.vision.timm_pool=''", "model.vision.timm_proj=mlp",
        "model.text.hf_model_name=xlm-roberta-base", f"model.text.hf_config_dir={config_dir}",
        "model.text.hf_proj_type=linear", "model.text.context_length=16", f"tokenizer=hf:{tokenizer_dir}",
        "data.batch_size=8", "train.max_steps=2", "ckpt.every_n_steps=0", f"hydra.run.dir={run_dir}",
    ], tmp_path / "cache", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_weights_with_an_hf_config_beside_them_load_without_a_config_dir(tmp_path) -> None:
    from clip_train.models.clip import CLIP
    from clip_train.models.factory import create_model_from_config
    from clip_train.models.registry import get_model_config

    name = "xlm-roberta-base-ViT-B-32"
    config_dir = tmp_path / "config"
    TINY_HF_CONFIGS[name]().save_pretrained(config_dir)
    cfg = dataclasses.replace(get_model_config("tiny"), text=_our_text_config(name, str(config_dir)))
    source = CLIP(cfg).eval()
    release = tmp_path / "release"
    TINY_HF_CONFIGS[name]().save_pretrained(release)  # config.json beside the weights, as an export would leave it
    torch.save(source.state_dict(), release / "model.pt")
    plain = dataclasses.replace(cfg, text=_our_text_config(name), pretrained=str(release / "model.pt"))
    loaded = create_model_from_config(plain).eval()
    # A clip_train checkpoint naming its architecture: create_model finds the HF config beside it as well.
    checkpoint = release / "checkpoint.pt"
    torch.save({"model": source.state_dict(), "model_config": dataclasses.asdict(dataclasses.replace(plain, pretrained=None))},
               checkpoint)
    by_file = clip_train.create_model(None, pretrained=checkpoint).eval()
    tokens = _padded_tokens(1, 120)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), source.encode_text(tokens))
        assert torch.equal(by_file.encode_text(tokens), source.encode_text(tokens))
