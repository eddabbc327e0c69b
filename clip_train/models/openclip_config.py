"""OpenCLIP's JSON model configs (vendored under ``clip_train/assets/openclip_model_configs``) <-> ``ModelConfig``.

One source of architecture truth: every name ``open_clip.list_models()`` ships is a JSON file there, and this
module is the only place that knows how its keys map onto our typed config. A key we do not know is an error
(so a refreshed config set cannot be half-read); keys that only shape outputs or tokenizers are listed below.

Fields of towers that live on other modules (timm heads, Hugging Face text towers) are set only where our
``VisionConfig`` / ``TextConfig`` have them; ``unsupported_fields`` names those a config needs but this build
lacks, so a caller can say which part is missing instead of building a different network.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from clip_train.models.config import (
    IMAGE_INTERPOLATIONS,
    IMAGE_RESIZE_MODES,
    ModelConfig,
    MultimodalConfig,
    TextConfig,
    VisionConfig,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "assets" / "openclip_model_configs"
PREPROCESS_FILE = Path(__file__).resolve().parents[1] / "assets" / "openclip_preprocess.json"
QUICKGELU_SUFFIX = "-quickgelu"

# JSON key -> our field, where the names differ (the rest map onto a field of the same name).
_VISION_RENAMES = {"timm_model_pretrained": "timm_pretrained"}
# Keys that change outputs other than the embedding (token outputs for CoCa) or the tokenizer, not weights.
_IGNORED_KEYS = {"output_tokens", "tokenizer_mode", "hf_model_pretrained"}
# Keys our config gets from other branches of the code (timm heads, HF text towers): mapped only when present.
_VISION_OPTIONAL = {"timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_OPTIONAL = {"hf_model_name", "hf_proj_type", "hf_pooler_type"}


class OpenClipConfigError(ValueError):
    """An OpenCLIP model config this translator cannot represent faithfully."""


def _natural_key(name: str) -> list:
    """OpenCLIP's ordering of model names (digits compared as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@lru_cache(maxsize=1)
def openclip_model_names() -> tuple[str, ...]:
    """Every architecture name of the vendored configs, in OpenCLIP's ``list_models()`` order."""
    return tuple(sorted((p.stem for p in CONFIG_DIR.glob("*.json")), key=_natural_key))


@cache
def _read_json(name: str) -> str:
    return (CONFIG_DIR / f"{name}.json").read_text()


def openclip_json(name: str) -> dict[str, Any]:
    """The vendored OpenCLIP config of ``name`` as a fresh dict."""
    if name not in openclip_model_names():
        raise KeyError(name)
    return json.loads(_read_json(name))


@lru_cache(maxsize=1)
def _preprocess_table() -> dict[str, dict[str, Any]]:
    return json.loads(PREPROCESS_FILE.read_text())["models"]


def openclip_preprocess(name: str) -> dict[str, Any]:
    """The image preprocessing OpenCLIP's pretrained configs give architecture ``name``, as ``ModelConfig``
    fields (``image_mean``, ``image_std``, ``image_interpolation``, ``image_resize_mode``); empty when they
    are OpenAI's, when the name has no pretrained tag, or when its tags disagree (the table's ``disagreeing``,
    e.g. ViT-L-14: OpenAI's defaults, which most of its tags use). A ``-quickgelu`` name without an entry of
    its own takes its base name's. Facts vendored in ``assets/openclip_preprocess.json``.
    """
    table = _preprocess_table()
    facts = table.get(name) or table.get(split_quickgelu(name)[0])
    if not facts:
        return {}
    return {"image_mean": list(facts["mean"]), "image_std": list(facts["std"]),
            "image_interpolation": facts["interpolation"], "image_resize_mode": facts["resize_mode"]}


def _kwargs(section: dict[str, Any], where: str) -> tuple[float | None, str | None]:
    """``norm_kwargs`` / ``act_kwargs`` as (eps, approximate); anything else is refused."""
    norm = dict(section.pop("norm_kwargs", None) or {})
    act = dict(section.pop("act_kwargs", None) or {})
    eps = norm.pop("eps", None)
    approximate = act.pop("approximate", None)
    if norm or act:
        raise OpenClipConfigError(f"{where}: unsupported norm/act arguments {sorted({**norm, **act})}")
    return eps, approximate


def _fill(target: Any, values: dict[str, Any], optional: set[str], renames: dict[str, str], where: str,
          missing: list[str]) -> None:
    fields = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key in _IGNORED_KEYS:
            continue
        field_name = renames.get(key, key)
        if field_name in fields:
            setattr(target, field_name, value)
        elif key in optional:
            missing.append(f"{where}.{key}")
        else:
            raise OpenClipConfigError(f"{where}: unknown OpenCLIP config key {key!r}")


def translate(doc: dict[str, Any], name: str = "openclip") -> tuple[ModelConfig, list[str]]:
    """``ModelConfig`` for an OpenCLIP model config dict, and the keys this build has no field for.

    The second item is empty when the config is fully represented; otherwise it names OpenCLIP keys (such
    as ``vision_cfg.timm_proj``) whose tower options live in a module this build does not have.
    """
    doc = json.loads(json.dumps(doc))  # a deep copy we may pop from
    preprocess_doc = doc.pop("preprocess_cfg", None) or {}  # an open_clip_config.json's, attached by the caller
    missing: list[str] = []
    vision_doc = dict(doc.pop("vision_cfg", {}))
    text_doc = dict(doc.pop("text_cfg", {}))
    multimodal_doc = doc.pop("multimodal_cfg", None)

    vision = VisionConfig()
    eps, approximate = _kwargs(vision_doc, f"{name} vision_cfg")
    if eps is not None:
        vision.norm_eps = eps
    if approximate is not None:
        vision.act_approximate = approximate
    image_size = vision_doc.pop("image_size", vision.image_size)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise OpenClipConfigError(f"{name}: non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    vision.image_size = int(image_size)
    layers = vision_doc.pop("layers", None)
    if vision_doc.get("timm_model_name"):
        vision.patch_size = None
        vision_doc.pop("patch_size", None)
    elif isinstance(layers, (list, tuple)):  # OpenCLIP tells a ModifiedResNet by its list of stage depths
        vision.layers = list(layers)
        vision.patch_size = None
        vision_doc.pop("patch_size", None)
    else:
        vision.layers = [int(layers if layers is not None else 12)]
    patch_size = vision_doc.pop("patch_size", vision.patch_size)
    if isinstance(patch_size, (list, tuple)):
        if len(set(patch_size)) != 1:
            raise OpenClipConfigError(f"{name}: non-square patch_size {patch_size} is not supported")
        patch_size = patch_size[0]
    if not vision_doc.get("timm_model_name") and not isinstance(layers, (list, tuple)):
        vision.patch_size = int(patch_size) if patch_size is not None else 16
    patch_dropout = float(vision_doc.pop("patch_dropout", 0.0))
    _fill(vision, vision_doc, _VISION_OPTIONAL, _VISION_RENAMES, f"{name} vision_cfg", missing)

    text = TextConfig()
    eps, approximate = _kwargs(text_doc, f"{name} text_cfg")
    if eps is not None:
        text.norm_eps = eps
    if approximate is not None:
        text.act_approximate = approximate
    if text_doc.pop("final_ln_after_pool", False):
        # OpenCLIP reads the key but never hands it to its text tower, so honouring it would change features.
        raise OpenClipConfigError(f"{name}: text_cfg.final_ln_after_pool is ignored by OpenCLIP; remove it")
    _fill(text, text_doc, _TEXT_OPTIONAL, {}, f"{name} text_cfg", missing)

    multimodal = None
    if multimodal_doc is not None:
        multimodal_doc = dict(multimodal_doc)
        multimodal = MultimodalConfig()
        eps, approximate = _kwargs(multimodal_doc, f"{name} multimodal_cfg")
        if eps is not None:
            multimodal.norm_eps = eps
        if approximate is not None:
            multimodal.act_approximate = approximate
        _fill(multimodal, multimodal_doc, set(), {}, f"{name} multimodal_cfg", missing)

    cfg = ModelConfig(name=name, vision=vision, text=text, multimodal=multimodal, patch_dropout=patch_dropout)
    cfg.embed_dim = int(doc.pop("embed_dim"))
    cfg.quick_gelu = bool(doc.pop("quick_gelu", False))
    cfg.init_logit_bias = doc.pop("init_logit_bias", None)
    if cfg.init_logit_bias is not None:
        cfg.init_logit_bias = float(cfg.init_logit_bias)
    # OpenCLIP keeps the text tower under ``text.`` for HF towers and CoCa whatever ``custom_text`` says.
    cfg.custom_text = bool(doc.pop("custom_text", False)) or bool(text_doc.get("hf_model_name")) or multimodal is not None
    if doc:
        raise OpenClipConfigError(f"{name}: unknown OpenCLIP config keys {sorted(doc)}")
    _apply_preprocess_cfg(cfg, preprocess_doc, name)
    return cfg, missing


def _apply_preprocess_cfg(cfg: ModelConfig, preprocess: dict[str, Any], name: str) -> None:
    """Take OpenCLIP's ``preprocess_cfg`` (mean, std, interpolation, resize_mode) into ``cfg``; a value our data
    path cannot apply (resize_mode ``longest``) is left at the default with a warning naming it."""
    for key, field_name in (("mean", "image_mean"), ("std", "image_std")):
        if preprocess.get(key) is not None:
            setattr(cfg, field_name, [float(v) for v in preprocess[key]])
    for key, field_name, allowed in (("interpolation", "image_interpolation", IMAGE_INTERPOLATIONS),
                                     ("resize_mode", "image_resize_mode", IMAGE_RESIZE_MODES)):
        value = preprocess.get(key)
        if value in allowed:
            setattr(cfg, field_name, value)
        elif value is not None:
            logging.getLogger(__name__).warning("%s: preprocess_cfg %s=%r is not supported here; using %s", name,
                                                key, value, allowed[0])
    cfg._check_preprocessing()


def split_quickgelu(name: str) -> tuple[str, bool]:
    """``("ViT-B-16", True)`` for ``ViT-B-16-quickgelu``; names OpenCLIP ships as their own JSON stay whole."""
    if name in openclip_model_names() or not name.endswith(QUICKGELU_SUFFIX):
        return name, False
    return name[: -len(QUICKGELU_SUFFIX)], True


def openclip_model_config(name: str) -> tuple[ModelConfig, list[str]]:
    """Translate the vendored config ``name`` (a ``-quickgelu`` suffix on any name selects QuickGELU)."""
    base, quick_gelu = split_quickgelu(name)
    try:
        doc = openclip_json(base)
    except KeyError:
        raise KeyError(name) from None
    cfg, missing = translate(doc, name)
    cfg.quick_gelu = cfg.quick_gelu or quick_gelu
    for key, value in openclip_preprocess(name).items():
        setattr(cfg, key, value)
    return cfg, missing


def unsupported_fields(name: str) -> list[str]:
    """OpenCLIP keys of ``name``'s config that this build has no field for (empty: fully supported)."""
    return openclip_model_config(name)[1]


def tokenizer_need(name: str) -> str:
    """What ``name``'s text tower reads: ``CLIP BPE`` or the Hugging Face tokenizer OpenCLIP names (``hf:...``)."""
    base, _ = split_quickgelu(name)
    text = openclip_json(base).get("text_cfg", {}) if base in openclip_model_names() else {}
    hf_name = text.get("hf_tokenizer_name") or text.get("hf_model_name")
    return f"hf:{hf_name}" if hf_name else "CLIP BPE"


def family(name: str) -> str:
    """A short family label for listings: which tower kinds the architecture uses."""
    base, _ = split_quickgelu(name)
    doc = openclip_json(base) if base in openclip_model_names() else {}
    vision, text = doc.get("vision_cfg", {}), doc.get("text_cfg", {})
    if "multimodal_cfg" in doc:
        kind = "CoCa"
    elif vision.get("timm_model_name"):
        kind = f"timm:{vision['timm_model_name']}"
    elif isinstance(vision.get("layers"), list):
        kind = "ModifiedResNet"
    else:
        kind = "ViT"
    if text.get("hf_model_name"):
        kind += f" + hf:{text['hf_model_name']}"
    elif text.get("no_causal_mask"):
        kind += " + bidirectional text"
    return kind


def to_openclip(cfg: ModelConfig) -> dict[str, Any]:
    """OpenCLIP's ``model_cfg`` for ``cfg`` (what ``open_clip_config.json`` and ``add_model_config`` read)."""
    vision, text = cfg.vision, cfg.text
    if vision.timm_model_name:
        vision_cfg: dict[str, Any] = {"image_size": vision.image_size, "timm_model_name": vision.timm_model_name,
                                      "timm_model_pretrained": False}
        for key in sorted(_VISION_OPTIONAL):
            if hasattr(vision, key):
                vision_cfg[key] = getattr(vision, key)
    elif cfg.is_resnet:
        vision_cfg = {"image_size": vision.image_size, "layers": list(vision.layers), "width": vision.width,
                      "patch_size": None, "head_width": vision.head_width}
    else:
        vision_cfg = {
            "image_size": vision.image_size, "layers": vision.layers[0], "width": vision.width,
            "patch_size": vision.patch_size, "head_width": vision.head_width, "mlp_ratio": vision.mlp_ratio,
            "ls_init_value": vision.ls_init_value, "pool_type": vision.pool_type,
            "final_ln_after_pool": vision.final_ln_after_pool, "no_ln_pre": vision.no_ln_pre,
            "pos_embed_type": vision.pos_embed_type, "attentional_pool": vision.attentional_pool,
            "attn_pooler_queries": vision.attn_pooler_queries, "attn_pooler_heads": vision.attn_pooler_heads,
            "norm_kwargs": {"eps": vision.norm_eps},
        }
        if vision.act_approximate != "none":
            vision_cfg["act_kwargs"] = {"approximate": vision.act_approximate}
    if getattr(text, "hf_model_name", None):
        # width: OpenCLIP sizes an HF tower from the HF config and ignores it, but its JSON says it (coca_roberta).
        text_cfg: dict[str, Any] = {"hf_model_name": text.hf_model_name, "hf_model_pretrained": False,
                                    "context_length": text.context_length, "vocab_size": text.vocab_size,
                                    "width": text.width}
        for key in ("hf_proj_type", "hf_pooler_type"):
            if hasattr(text, key):
                text_cfg[key] = getattr(text, key)
    else:
        text_cfg = {
            "context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
            "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio,
            "ls_init_value": text.ls_init_value, "no_causal_mask": text.no_causal_mask, "pool_type": text.pool_type,
            "eos_id": text.eos_id, "pad_id": text.pad_id, "embed_cls": text.embed_cls, "proj_type": text.proj_type,
            "proj_bias": text.proj_bias, "norm_kwargs": {"eps": text.norm_eps},
        }
        if text.act_approximate != "none":
            text_cfg["act_kwargs"] = {"approximate": text.act_approximate}
    # OpenCLIP's get_tokenizer picks an HF tokenizer (for local-dir: the export directory itself) only when
    # text_cfg names one; without these keys a SigLIP export would silently tokenize with CLIP's BPE.
    if getattr(text, "hf_tokenizer_name", None):
        text_cfg["hf_tokenizer_name"] = text.hf_tokenizer_name
    if getattr(text, "tokenizer_kwargs", None):
        text_cfg["tokenizer_kwargs"] = dict(text.tokenizer_kwargs)
    out: dict[str, Any] = {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu, "vision_cfg": vision_cfg,
                           "text_cfg": text_cfg}
    if cfg.custom_text:
        out["custom_text"] = True
    if cfg.multimodal is not None:
        mm = dataclasses.asdict(cfg.multimodal)
        eps, approximate = mm.pop("norm_eps"), mm.pop("act_approximate")
        mm["norm_kwargs"] = {"eps": eps}
        if approximate != "none":
            mm["act_kwargs"] = {"approximate": approximate}
        out["multimodal_cfg"] = mm
        # OpenCLIP's CoCa unpacks (pooled, tokens) from both towers, which they return only when told to;
        # without these flags it splits the pooled batch into two rows and gives other features.
        vision_cfg["output_tokens"] = True
        text_cfg["output_tokens"] = True
    return out
