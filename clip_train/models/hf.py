"""Hugging Face ``transformers.CLIPModel`` layout: converting state dicts and configs both ways.

No ``transformers`` import happens here: the layout (key names, ``config.json`` fields) is a file format, and
clip_train reads and writes it directly so that exporting needs nothing beyond torch and safetensors.

How the layouts differ (ours follows OpenAI's release):

- attention: one packed ``attn.in_proj_weight`` (rows q, k, v) vs. separate ``self_attn.{q,k,v}_proj``;
- projections: our ``visual.proj`` / ``text_projection`` are ``(width, embed_dim)`` matrices applied as
  ``x @ P``; HF's ``visual_projection`` / ``text_projection`` are bias-free ``nn.Linear`` whose weight is
  ``P.T``;
- the ViT class and positional embeddings: a parameter vs. HF's ``nn.Embedding``;
- HF has no ModifiedResNet image tower, so only ViT models convert.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clip_train.models.config import ModelConfig, TextConfig, VisionConfig

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_TORCH_WEIGHTS_FILE = "pytorch_model.bin"
START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407

# Per-block parameter names: ours -> HF (inside ``...resblocks.N.`` / ``...encoder.layers.N.``).
_BLOCK_KEYS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Tensors outside the blocks that only change name.
_TOP_KEYS = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: HF's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
# Transposed on the way across (a matrix used as ``x @ P`` vs. an nn.Linear weight).
_TRANSPOSED_KEYS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = (("transformer.resblocks.", "text_model.encoder.layers."),
           ("visual.transformer.resblocks.", "vision_model.encoder.layers."))


class HFConversionError(ValueError):
    """A model or file that has no Hugging Face CLIPModel equivalent, or an HF file we cannot read."""


def check_convertible(cfg: ModelConfig) -> None:
    """Raise ``HFConversionError`` for architectures transformers' CLIPModel cannot represent."""
    if cfg.vision.timm_model_name:
        raise HFConversionError(
            f"model {cfg.name!r} has a timm image tower ({cfg.vision.timm_model_name}); Hugging Face CLIPModel only "
            "has a ViT image tower: export it with --format open_clip or safetensors instead"
        )
    if cfg.is_resnet:
        raise HFConversionError(
            f"model {cfg.name!r} has a ModifiedResNet image tower, which Hugging Face CLIPModel does not have; "
            "export it with --format open_clip or safetensors instead"
        )


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our (OpenAI-layout) state dict as a ``CLIPModel`` state dict; tensors are copied, never shared."""
    check_convertible(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif key in _TRANSPOSED_KEYS:
            out[_TRANSPOSED_KEYS[key]] = value.t()
        elif key == "logit_bias":
            raise HFConversionError(
                "this model has a SigLIP logit_bias, which Hugging Face CLIPModel has no place for; "
                "export it with --format open_clip or safetensors instead"
            )
        else:
            for ours, theirs in _TOWERS:
                if key.startswith(ours):
                    index, rest = key[len(ours):].split(".", 1)
                    prefix = f"{theirs}{index}."
                    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                        kind = rest.rsplit("_", 1)[1]  # weight | bias
                        for name, part in zip("qkv", value.chunk(3, dim=0)):
                            out[f"{prefix}self_attn.{name}_proj.{kind}"] = part
                    elif rest in _BLOCK_KEYS:
                        out[prefix + _BLOCK_KEYS[rest]] = value
                    else:
                        raise HFConversionError(f"no Hugging Face CLIPModel name for parameter {key!r}")
                    break
            else:
                raise HFConversionError(f"no Hugging Face CLIPModel name for parameter {key!r}")
    # Contiguous copies: safetensors refuses views and shared storage (the q/k/v chunks, the transposes).
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPModel`` state dict in our (OpenAI) layout; the inverse of ``to_hf_state_dict``."""
    top = {theirs: ours for ours, theirs in _TOP_KEYS.items()}
    transposed = {theirs: ours for ours, theirs in _TRANSPOSED_KEYS.items()}
    block = {theirs: ours for ours, theirs in _BLOCK_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_state_dict.items():
        if key.endswith("position_ids"):  # a buffer of 0..N-1 that older transformers versions saved
            continue
        if key in top:
            out[top[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        else:
            for ours, theirs in _TOWERS:
                if key.startswith(theirs):
                    index, rest = key[len(theirs):].split(".", 1)
                    prefix = f"{ours}{index}."
                    if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                        _, proj, kind = rest.split(".")
                        qkv.setdefault(f"{prefix}attn.in_proj_{kind}", {})[proj[0]] = value
                    elif rest in block:
                        out[prefix + block[rest]] = value
                    else:
                        raise HFConversionError(f"unexpected Hugging Face CLIP parameter {key!r}")
                    break
            else:
                raise HFConversionError(f"unexpected Hugging Face CLIP parameter {key!r} (is this a CLIPModel?)")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise HFConversionError(f"{key}: the file lacks {sorted({'q', 'k', 'v'} - set(parts))} projections")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def hf_config(cfg: ModelConfig, logit_scale: float | None = None) -> dict:
    """The ``config.json`` of a ``CLIPModel`` with this architecture (transformers fills in the rest)."""
    check_convertible(cfg)
    act = "quick_gelu" if cfg.quick_gelu else "gelu"  # HF's "gelu" is the exact (erf) GELU, as nn.GELU
    vision, text = cfg.vision, cfg.text
    doc = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "projection_dim": cfg.embed_dim,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            # Token ids of CLIP's BPE. With eos_token_id != 2, HF pools the first end-of-text token, which is
            # where our argmax over ids lands too (end-of-text is the highest id).
            "bos_token_id": START_OF_TEXT_ID,
            "eos_token_id": END_OF_TEXT_ID,
            "pad_token_id": END_OF_TEXT_ID,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "projection_dim": cfg.embed_dim,
            "num_hidden_layers": vision.layers[0],
            "num_attention_heads": vision.width // vision.head_width,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
        # clip_train's own record of the architecture name (transformers ignores unknown keys).
        "clip_train_model_name": cfg.name,
    }
    if logit_scale is not None:
        doc["logit_scale_init_value"] = logit_scale
    return doc


def config_from_hf(doc: dict) -> ModelConfig:
    """The ModelConfig of a ``CLIPModel`` ``config.json`` (ViT image tower, CLIP text tower)."""
    if doc.get("model_type") != "clip":
        raise HFConversionError(
            f"config.json has model_type {doc.get('model_type')!r}, not 'clip'; only transformers' CLIPModel converts"
        )
    text, vision = doc.get("text_config") or {}, doc.get("vision_config") or {}
    defaults = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    acts = {text.get("hidden_act", defaults["hidden_act"]), vision.get("hidden_act", defaults["hidden_act"])}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise HFConversionError(f"config.json uses activations {sorted(acts)}; clip_train supports quick_gelu or gelu")
    for tower in (text, vision):
        if float(tower.get("layer_norm_eps", 1e-5)) != 1e-5:
            raise HFConversionError(f"config.json has layer_norm_eps {tower['layer_norm_eps']}; clip_train uses 1e-5")
    try:
        v_width, t_width = int(vision["hidden_size"]), int(text["hidden_size"])
        v_heads = int(vision["num_attention_heads"])
        model = ModelConfig(
            name=str(doc.get("clip_train_model_name") or doc.get("_name_or_path") or "hf-clip"),
            embed_dim=int(doc.get("projection_dim", 512)),
            vision=VisionConfig(
                image_size=int(vision["image_size"]),
                layers=[int(vision["num_hidden_layers"])],
                width=v_width,
                patch_size=int(vision["patch_size"]),
                head_width=v_width // v_heads,
                mlp_ratio=int(vision["intermediate_size"]) / v_width,
            ),
            text=TextConfig(
                context_length=int(text["max_position_embeddings"]),
                vocab_size=int(text["vocab_size"]),
                width=t_width,
                heads=int(text["num_attention_heads"]),
                layers=int(text["num_hidden_layers"]),
                mlp_ratio=int(text["intermediate_size"]) / t_width,
            ),
            quick_gelu=acts == {"quick_gelu"},
        )
    except KeyError as err:
        raise HFConversionError(f"config.json lacks {err.args[0]!r}; is it a transformers CLIPModel config?") from None
    return model


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory holding a transformers CLIP ``config.json``."""
    config = Path(path) / HF_CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "clip"
    except (ValueError, AttributeError):
        return False


def read_hf_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """State dict (our layout) and architecture of a ``CLIPModel.save_pretrained`` directory.

    Reads ``model.safetensors`` (or ``pytorch_model.bin`` with ``weights_only``); sharded checkpoints are
    read through their ``*.index.json``.
    """
    path = Path(path)
    cfg = config_from_hf(json.loads((path / HF_CONFIG_FILE).read_text()))
    hf_state: dict[str, torch.Tensor] = {}
    files = _weight_files(path)
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            hf_state.update(load_file(str(file), device="cpu"))
        else:
            from clip_train.models.pretrained import read_tensor_pickle  # pretrained imports this module

            hf_state.update(read_tensor_pickle(file))
    return from_hf_state_dict(hf_state), cfg


def _weight_files(path: Path) -> list[Path]:
    for single in (HF_WEIGHTS_FILE, HF_TORCH_WEIGHTS_FILE):
        if (path / single).is_file():
            return [path / single]
    for index_name in (HF_WEIGHTS_FILE + ".index.json", HF_TORCH_WEIGHTS_FILE + ".index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / shard for shard in shards]
    raise HFConversionError(
        f"{path} has a CLIP config.json but no {HF_WEIGHTS_FILE} or {HF_TORCH_WEIGHTS_FILE}; save the model with "
        "CLIPModel.save_pretrained(PATH)"
    )
