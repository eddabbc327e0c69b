"""The CLIP model: an image tower, a causal text transformer and a learned temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clip_train.models.config import ModelConfig
from clip_train.models.hf_text import HFTextTower, build_hf_text_tower
from clip_train.models.layers import LayerNorm, QuickGELU, Transformer
from clip_train.models.resnet import ModifiedResNet
from clip_train.models.timm_tower import build_timm_tower
from clip_train.models.vit import VisionTransformer

MAX_LOGIT_SCALE = math.log(100.0)
"""``logit_scale`` is clamped here so the softmax temperature never drops below 0.01."""


def build_image_tower(cfg: ModelConfig, act_layer: type[nn.Module]) -> nn.Module:
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
            act_layer=act_layer,
            patch_dropout=cfg.patch_dropout,
        )
    return ModifiedResNet(
        layers=list(vision.layers),
        output_dim=cfg.embed_dim,
        heads=vision.width * 32 // vision.head_width,
        image_size=vision.image_size,
        width=vision.width,
    )


class CLIP(nn.Module):
    """Contrastive image-text model.

    The text tower's parts sit directly on the model (``token_embedding``, ``transformer``, ``ln_final``,
    ``text_projection``) rather than in a submodule because OpenAI's release, and so every OpenCLIP
    checkpoint, names them at the top level.
    """

    def __init__(self, cfg: ModelConfig, init_temperature: float = 0.07, init_logit_bias: float | None = None) -> None:
        """Build both towers from ``cfg``.

        Args:
            init_temperature: initial softmax temperature; ``logit_scale`` starts at ln(1 / init_temperature).
            init_logit_bias: when set, the model also learns a ``logit_bias`` (SigLIP's pairwise sigmoid loss).
        """
        super().__init__()
        self.config = cfg
        act_layer = QuickGELU if cfg.quick_gelu else nn.GELU
        self.visual = build_image_tower(cfg, act_layer)

        text = cfg.text
        self.context_length = text.context_length
        self.text: HFTextTower | None = None
        if text.hf_model_name:
            # A Hugging Face text tower lives under ``text.`` (OpenCLIP's CustomTextCLIP layout).
            self.text = build_hf_text_tower(cfg)
            self.vocab_size = self.text.vocab_size
        else:
            self.vocab_size = text.vocab_size
            self.token_embedding = nn.Embedding(text.vocab_size, text.width)
            self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
            self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_ratio, act_layer=act_layer)
            self.ln_final = LayerNorm(text.width)
            self.text_projection = nn.Parameter(torch.empty(text.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        if self.text is None:
            self.init_text_weights()

    def init_text_weights(self) -> None:
        """CLIP's reference initialisation of the text tower (the image towers initialise themselves)."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights(
            attn_std=width**-0.5, proj_std=width**-0.5 * (2 * layers) ** -0.5, fc_std=(2 * width) ** -0.5
        )
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings ``(N, embed_dim)`` from images ``(N, 3, H, W)`` normalised with CLIP's mean/std."""
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, embed_dim)`` from token ids ``(N, L)``, read at each row's end-of-text token."""
        if self.text is not None:
            features = self.text(tokens)
            return F.normalize(features, dim=-1) if normalize else features
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"got {length} tokens per row, the model's context length is {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.transformer(x, is_causal=True)
        x = self.ln_final(x)
        # The end-of-text token has the highest id in CLIP's vocabulary, so argmax finds it.
        eot = tokens.argmax(dim=-1)
        features = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and the softmax scale ``exp(logit_scale)`` (at most 100)."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        return image_features, text_features, self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that AdamW should not decay besides gains and biases (all 1-D tensors)."""
        names = {"logit_scale", "logit_bias", "positional_embedding", "token_embedding.weight"}
        names |= {f"visual.{n}" for n in ("class_embedding", "positional_embedding", "attnpool.positional_embedding")}
        return {n for n, _ in self.named_parameters() if n in names}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward instead of storing them, in both towers."""
        self.visual.set_grad_checkpointing(enable)
        if self.text is not None:
            self.text.set_grad_checkpointing(enable)
        else:
            self.transformer.grad_checkpointing = enable
