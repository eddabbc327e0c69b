"""Named CLIP architectures: OpenAI's nine with their published hyperparameters (Radford et al. 2021,
table 19-20) and ``tiny``, then every name of OpenCLIP's model zoo through its JSON configs.

``configs/model/*.yaml`` mirror the first entries for Hydra; ``configs/model/openclip.yaml`` takes any
OpenCLIP name.
"""

from __future__ import annotations

import copy

from clip_train.models.config import ModelConfig, MultimodalConfig, TextConfig, VisionConfig
from clip_train.models.openclip_config import openclip_model_config, openclip_model_names

QUICKGELU_SUFFIX = "-quickgelu"


def _resnet(embed_dim: int, layers: list[int], width: int, image_size: int, text: TextConfig) -> ModelConfig:
    vision = VisionConfig(image_size=image_size, layers=layers, width=width, patch_size=None)
    return ModelConfig(embed_dim=embed_dim, vision=vision, text=text)


def _vit(embed_dim: int, width: int, layers: int, patch: int, image_size: int, text: TextConfig) -> ModelConfig:
    vision = VisionConfig(image_size=image_size, layers=[layers], width=width, patch_size=patch)
    return ModelConfig(embed_dim=embed_dim, vision=vision, text=text)


def _text(width: int, heads: int, layers: int = 12) -> TextConfig:
    return TextConfig(width=width, heads=heads, layers=layers)


_ARCHITECTURES: dict[str, ModelConfig] = {
    "RN50": _resnet(1024, [3, 4, 6, 3], 64, 224, _text(512, 8)),
    "RN101": _resnet(512, [3, 4, 23, 3], 64, 224, _text(512, 8)),
    "RN50x4": _resnet(640, [4, 6, 10, 6], 80, 288, _text(640, 10)),
    "RN50x16": _resnet(768, [6, 8, 18, 8], 96, 384, _text(768, 12)),
    "RN50x64": _resnet(1024, [3, 15, 36, 10], 128, 448, _text(1024, 16)),
    "ViT-B-32": _vit(512, 768, 12, 32, 224, _text(512, 8)),
    "ViT-B-16": _vit(512, 768, 12, 16, 224, _text(512, 8)),
    "ViT-L-14": _vit(768, 1024, 24, 14, 224, _text(768, 12)),
    "ViT-L-14-336": _vit(768, 1024, 24, 14, 336, _text(768, 12)),
    # A small model for CPU demos and tests: 32 px images in 8x8 patches, 16-token captions, 2-layer towers
    # of width 64 (most of its 3.4M parameters are the 49,408-token embedding).
    "tiny": ModelConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, layers=[2], width=64, patch_size=8),
        text=TextConfig(context_length=16, width=64, heads=1, layers=2),
    ),
    # The tiny model made CoCa (configs/model/coca_tiny.yaml): an attentional pooler of 9 queries (the first is
    # the image embedding, 8 feed the decoder), a text class token, a 2-layer captioning decoder.
    "coca_tiny": ModelConfig(
        embed_dim=64,
        vision=VisionConfig(
            image_size=32, layers=[2], width=64, patch_size=8, head_width=32,
            attentional_pool=True, attn_pooler_queries=9, attn_pooler_heads=2,
        ),
        text=TextConfig(context_length=16, width=64, heads=2, layers=2, embed_cls=True),
        custom_text=True,
        multimodal=MultimodalConfig(context_length=16, width=64, heads=2, layers=2, attn_pooler_heads=2),
    ),
}
for _name, _cfg in _ARCHITECTURES.items():
    _cfg.name = _name


def builtin_models() -> list[str]:
    """OpenAI's nine architectures and ``tiny``, defined here (the rest come from OpenCLIP's configs)."""
    return list(_ARCHITECTURES)


def list_models() -> list[str]:
    """Names ``create_model`` accepts: OpenAI's nine, ``tiny``, then OpenCLIP's zoo (each also with ``-quickgelu``)."""
    return list(_ARCHITECTURES) + [n for n in openclip_model_names() if n not in _ARCHITECTURES]


HF_HUB_PREFIX = "hf-hub:"  # OpenCLIP's names for models it downloads from the Hugging Face hub
LOCAL_DIR_PREFIX = "local-dir:"  # OpenCLIP's names for a folder holding open_clip_config.json and weights


def hub_name_message(repo: str) -> str:
    """The refusal of a hub name: we read local files only, and how to get them there."""
    return (f"clip_train reads local files only (it downloads nothing): fetch {repo} once with `hf download "
            f"{repo} --local-dir DIR` (huggingface-cli download before huggingface_hub 0.34), then use "
            f"'{LOCAL_DIR_PREFIX}DIR' as the name, as in OpenCLIP: create_model('{LOCAL_DIR_PREFIX}DIR') and "
            f"get_tokenizer('{LOCAL_DIR_PREFIX}DIR')")


def get_model_config(name: str) -> ModelConfig:
    """A fresh copy of the named architecture; a ``-quickgelu`` suffix selects QuickGELU."""
    base, quick_gelu = name, False
    if name.endswith(QUICKGELU_SUFFIX):
        base, quick_gelu = name[: -len(QUICKGELU_SUFFIX)], True
    # OpenCLIP writes ViT-B/16 as ViT-B-16; accept the paper's slash form too.
    base = base.replace("/", "-")
    if base in _ARCHITECTURES:
        cfg = copy.deepcopy(_ARCHITECTURES[base])
        cfg.quick_gelu = quick_gelu
        cfg.name = name
        return cfg
    try:
        cfg, missing = openclip_model_config(name.replace("/", "-"))
    except KeyError:
        if name.startswith(HF_HUB_PREFIX):
            raise ValueError(hub_name_message(name.removeprefix(HF_HUB_PREFIX))) from None
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(builtin_models())} or another of the "
            f"{len(list_models())} names `python -m clip_train.models` lists (each also with -quickgelu)"
        ) from None
    if missing:  # building it without these options would give another network than OpenCLIP's
        raise ValueError(f"model {name!r} needs tower options this build lacks: {', '.join(missing)}")
    cfg.name = name
    return cfg
