"""``create_model``: a CLIP model by architecture name and/or from a weights file."""

from __future__ import annotations

import dataclasses
import os

import torch
from omegaconf import OmegaConf

from clip_train.checkpoint_paths import resolve_weights, weights_path
from clip_train.models.clip import CLIP
from clip_train.models.config import ModelConfig
from clip_train.models.pretrained import load_weights_into, read_weights, resolve_architecture
from clip_train.models.registry import LOCAL_DIR_PREFIX, get_model_config


def _as_model_config(stored: dict) -> ModelConfig:
    """A ModelConfig from the plain dict a clip_train checkpoint stores (unknown keys are an error)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), stored))  # type: ignore[return-value]


def model_class(cfg: ModelConfig) -> type[CLIP]:
    """The model class an architecture needs: ``CLIP``, or CoCa's when it has a multimodal decoder."""
    if cfg.multimodal is None:
        return CLIP
    try:
        from clip_train.models.coca import CoCa
    except ImportError:
        raise ValueError(
            f"{cfg.name} is a CoCa model (multimodal text decoder) and this build has no clip_train.models.coca"
        ) from None
    return CoCa


def build_model(cfg: ModelConfig, **kwargs: object) -> CLIP:
    """An untrained model of architecture ``cfg`` (CLIP or CoCa); ``kwargs`` go to the class (temperature, bias)."""
    return model_class(cfg)(cfg, **kwargs)


def create_model(
    name: str | None = None,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    allow_nonfinite_weights: bool = False,
    force_image_size: int | None = None,
    force_context_length: int | None = None,
    force_quick_gelu: bool = False,
    force_patch_dropout: float | None = None,
) -> CLIP:
    """Build a CLIP model.

    Args:
        name: an architecture from ``list_models()`` (``RN50``, ``ViT-B-16``, ``tiny``, ...; a
            ``-quickgelu`` suffix selects QuickGELU). ``None`` takes it from ``pretrained``: the file's own
            metadata, an ``open_clip_config.json`` beside it, or the one named architecture whose key names and
            shapes it has; anything ambiguous is refused with the candidates named. ``local-dir:DIR`` (OpenCLIP's
            spelling) is the same as ``pretrained=DIR``: an OpenCLIP export or hub download.
        pretrained: a local weights file: an OpenAI release, an OpenCLIP state dict or training
            checkpoint, or a clip_train checkpoint. Files in OpenAI's layout select QuickGELU.
        device: where to put the model.
        allow_nonfinite_weights: load ``pretrained`` even if some weights are NaN or Inf (refused by default:
            such a file comes from a run that diverged).
        force_image_size: build the model for this image size instead of the architecture's (OpenCLIP's
            argument); a ViT's ``pretrained`` patch-grid positions are interpolated to it.
        force_context_length: the same for the text tower's context length (its positions interpolated).
        force_quick_gelu: QuickGELU activations whatever the name says (as its ``-quickgelu`` suffix does).
        force_patch_dropout: ViT patch dropout in training (FLIP), as ``model.patch_dropout``.
    """
    if name is not None and name.startswith(LOCAL_DIR_PREFIX):  # OpenCLIP's spelling of "this folder's model"
        if pretrained is not None:
            raise ValueError(f"{name} carries its own weights; leave pretrained unset (or pass the folder as "
                             "pretrained= with no name)")
        name, pretrained = None, name.removeprefix(LOCAL_DIR_PREFIX)
    if pretrained is not None:
        pretrained = weights_path(pretrained)  # towers that read files beside the weights need the bare path
    weights = read_weights(resolve_weights(pretrained)) if pretrained is not None else None
    if name is not None:
        cfg = get_model_config(name)
    elif weights is not None:
        cfg = resolve_architecture(weights)
    else:
        raise ValueError("create_model needs an architecture name, or pretrained weights to infer it from")
    if (weights is not None and weights.openai_layout) or force_quick_gelu:
        cfg.quick_gelu = True  # OpenAI trained every released model with QuickGELU
    if force_patch_dropout is not None:
        cfg.patch_dropout = float(force_patch_dropout)
    if pretrained is not None:
        cfg.pretrained = str(pretrained)  # towers built from files saved beside the weights (HF text config) find them
    if force_image_size is not None or force_context_length is not None:
        cfg = dataclasses.replace(cfg, force_image_size=force_image_size, force_context_length=force_context_length,
                                  architecture_from_name=False)  # replace() re-runs the checks and applies them
    model = build_model(cfg)
    if weights is not None:
        load_weights_into(model, weights, source=str(pretrained), allow_nonfinite=allow_nonfinite_weights,
                          resize_positions=True)
    return model.to(device)


def create_model_from_config(
    cfg: ModelConfig, init_temperature: float = 0.07, init_logit_bias: float | None = None
) -> CLIP:
    """Build the model a (Hydra) ``ModelConfig`` describes, loading ``cfg.pretrained`` when set."""
    if cfg.pretrained:
        cfg = dataclasses.replace(cfg, pretrained=str(weights_path(cfg.pretrained)))
    weights = read_weights(resolve_weights(cfg.pretrained)) if cfg.pretrained else None
    if weights is not None and weights.openai_layout and not cfg.quick_gelu:
        cfg = dataclasses.replace(cfg, quick_gelu=True)
    model = build_model(cfg, init_temperature=init_temperature, init_logit_bias=init_logit_bias)
    if weights is not None:
        load_weights_into(model, weights, source=str(cfg.pretrained), allow_nonfinite=cfg.allow_nonfinite_weights,
                          resize_positions=True)
    return model
