"""The CLIP model: an image tower, a text transformer and a learned temperature (and SigLIP's bias)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from clip_train.models.config import ModelConfig
from clip_train.models.layers import make_act_layer, make_norm_layer
from clip_train.models.resnet import ModifiedResNet
from clip_train.models.text import TextTowerMixin, TextTransformer
from clip_train.models.timm_tower import build_timm_tower
from clip_train.models.vit import VisionTransformer

MAX_LOGIT_SCALE = math.log(100.0)
"""``logit_scale`` is clamped here so the softmax temperature never drops below 0.01."""


def build_image_tower(cfg: ModelConfig) -> nn.Module:
    """The image tower ``cfg.vision`` describes: a timm model, a CLIP ViT or a ModifiedResNet."""
    vision = cfg.vision
    if vision.timm_model_name:
        return build_timm_tower(cfg)
    if cfg.patch_dropout and not cfg.is_vit:
        raise ValueError(
            f"model.patch_dropout={cfg.patch_dropout} drops ViT patch tokens; {cfg.name}'s image tower is not a "
            "CLIP ViT (set it to 0)"
        )
    if vision.patch_size is not None:
        if len(vision.layers) != 1:
            raise ValueError(f"a ViT tower takes one layer count, got vision.layers={list(vision.layers)}")
        return VisionTransformer(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            width=vision.width,
            layers=vision.layers[0],
            heads=vision.width // vision.head_width,
            output_dim=cfg.embed_dim,
            mlp_ratio=vision.mlp_ratio,
            act_layer=make_act_layer(cfg.quick_gelu, vision.act_approximate),
            norm_layer=make_norm_layer(vision.norm_eps),
            patch_dropout=cfg.patch_dropout,
            ls_init_value=vision.ls_init_value,
            pool_type=vision.pool_type,
            final_ln_after_pool=vision.final_ln_after_pool,
            no_ln_pre=vision.no_ln_pre,
            pos_embed_type=vision.pos_embed_type,
            attentional_pool=vision.attentional_pool,
            attn_pooler_queries=vision.attn_pooler_queries,
            attn_pooler_heads=vision.attn_pooler_heads,
        )
    return ModifiedResNet(
        layers=list(vision.layers),
        output_dim=cfg.embed_dim,
        heads=vision.width * 32 // vision.head_width,
        image_size=vision.image_size,
        width=vision.width,
    )


def build_text_tower(cfg: ModelConfig) -> nn.Module:
    """The text tower of a ``custom_text`` model, kept under ``text.``: our text transformer, or a Hugging Face one."""
    if getattr(cfg.text, "hf_model_name", None):
        # only HF towers pay for transformers' import
        from clip_train.models.hf_text import build_hf_text_tower

        return build_hf_text_tower(cfg)
    return TextTransformer(cfg.text, cfg.embed_dim, quick_gelu=cfg.quick_gelu)


class CLIP(TextTowerMixin, nn.Module):
    """Contrastive image-text model.

    The text tower's parts sit directly on the model (``token_embedding``, ``transformer``, ``ln_final``,
    ``text_projection``) because OpenAI's release, and so most OpenCLIP checkpoints, name them at the top
    level; with ``custom_text`` they live in ``self.text`` instead, as OpenCLIP's ``CustomTextCLIP`` has them.
    """

    def __init__(self, cfg: ModelConfig, init_temperature: float = 0.07, init_logit_bias: float | None = None) -> None:
        """Build both towers from ``cfg``.

        Args:
            init_temperature: initial softmax temperature; ``logit_scale`` starts at ln(1 / init_temperature).
            init_logit_bias: when set (or ``cfg.init_logit_bias`` is), the model also learns a ``logit_bias``
                (SigLIP's pairwise sigmoid loss); this argument wins over the config's value.
        """
        super().__init__()
        if cfg.text.hf_model_name and not cfg.custom_text:
            cfg = dataclasses.replace(cfg, custom_text=True)  # a Hugging Face text tower always lives under text.
        self.config = cfg
        self.visual = build_image_tower(cfg)
        if cfg.custom_text:
            self.text = build_text_tower(cfg)
            self.context_length = cfg.text.context_length
            self.vocab_size = cfg.text.vocab_size
        else:
            self.build_text_parts(cfg.text, cfg.embed_dim, cfg.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        if init_logit_bias is None:
            init_logit_bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    @property
    def text_tower(self) -> nn.Module:
        """The module holding the text tower's parts: the model itself (OpenAI layout) or ``self.text``."""
        return self.text if self.config.custom_text else self

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings ``(N, embed_dim)`` from images ``(N, 3, H, W)`` normalised with CLIP's mean/std."""
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, embed_dim)`` from token ids ``(N, L)``, pooled as the config says (CLIP: end-of-text)."""
        features = self.text(tokens) if self.config.custom_text else self.encode_text_tokens(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and the softmax scale ``exp(logit_scale)`` (at most 100)."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        return image_features, text_features, self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that AdamW should not decay besides gains and biases (all 1-D tensors)."""
        names = {"logit_scale", "logit_bias", "positional_embedding", "token_embedding.weight", "cls_emb"}
        names |= {f"text.{n}" for n in ("positional_embedding", "token_embedding.weight", "cls_emb")}
        names |= {f"visual.{n}" for n in ("class_embedding", "positional_embedding", "attnpool.positional_embedding")}
        return {n for n, _ in self.named_parameters() if n in names}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward instead of storing them, in both towers."""
        self.visual.set_grad_checkpointing(enable)
        if self.config.custom_text:
            self.text.set_grad_checkpointing(enable)
        else:
            self.transformer.grad_checkpointing = enable
