"""A timm model as CLIP's image tower: timm's trunk plus one of OpenCLIP's head variants.

The head follows the options OpenCLIP's JSON model configs use (``timm_pool``, ``timm_proj``,
``timm_proj_bias``, ``timm_drop``, ``timm_drop_path``), so the parameter names are OpenCLIP's
(``trunk.*``, ``head.proj``, ``head.mlp.fc1``, ``head.pool.qkv``, ...) and its checkpoints load unchanged:

- ``proj='linear'`` / ``'mlp'``: the trunk's classifier is removed (its pooling set to ``pool`` when ``pool``
  is not empty, else left at the model's default) and our head projects the pooled features: a dropout and
  a linear layer, or an MLP of hidden width ``2 * output_dim``.
- ``pool='abs_attn'`` / ``'rot_attn'``: classifier and pooling are removed and an attention pool (learned
  absolute or rotary position embedding) maps the feature map to ``output_dim``; a ``linear``/``mlp``
  projection may follow it.
- ``proj=None`` (or ``''``): the trunk's own classifier, sized to ``output_dim``, is the projection, after
  ``pool`` (SigLIP's ``map`` attention head, EVA's ``token``, PE-Core, MobileCLIP).
- ``proj='none'``: no projection at all; the pooled trunk features are the embedding.

The trunk is built at timm's own input size for its name, as OpenCLIP does (pick the timm name for the
resolution, e.g. ``vit_base_patch16_siglip_384``); ``image_size`` is what the data pipeline feeds it.
timm never downloads anything unless ``pretrained`` asks for its ImageNet weights.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

PROJECTIONS = ("linear", "mlp", "none")
"""``timm_proj`` values besides ``None``/``''`` (the trunk's own classifier head as projection)."""
ATTENTION_POOLS = ("abs_attn", "rot_attn")
"""``timm_pool`` values that replace the trunk's pooling with an attention pool in our head."""


class TimmImageTower(nn.Module):
    """``trunk`` (a timm model) then ``head`` (OpenCLIP's pooling / projection variants), image -> embedding.

    Args:
        model_name: a timm model name (``convnext_tiny``, ``eva02_base_patch16_clip_224``, ...).
        output_dim: width of the shared embedding.
        image_size: input resolution the model is fed (informative: the trunk keeps timm's own size).
        pretrained: load timm's pretrained trunk weights (downloads them).
        pool: ``''`` (the model's default pooling), a timm ``global_pool`` (``avg``, ``token``, ``map``, ...),
            or ``abs_attn`` / ``rot_attn`` for an attention pool in the head.
        proj: ``linear``, ``mlp``, ``none``, or ``None`` for the trunk's own classifier as projection.
        proj_bias: bias in the (last) projection layer.
        drop: dropout before the linear projection / after the MLP's activation.
        drop_path: the trunk's stochastic depth rate (``None``: timm's default).
        patch_drop: the trunk's patch dropout rate (ViT-like trunks only; ``None`` leaves it out).
    """

    def __init__(
        self,
        model_name: str,
        output_dim: int,
        image_size: int = 224,
        pretrained: bool = False,
        *,
        pool: str = "avg",
        proj: str | None = "linear",
        proj_bias: bool = False,
        drop: float = 0.0,
        drop_path: float | None = None,
        patch_drop: float | None = None,
    ) -> None:
        super().__init__()
        import timm  # imported here: only timm towers pay for timm's import time

        proj = proj or None  # OpenCLIP's configs write both null and "" for "the trunk's own head"
        if proj is not None and proj not in PROJECTIONS:
            raise ValueError(f"vision.timm_proj={proj!r} is not one of {PROJECTIONS} or null")
        self.image_size = image_size
        attention_pool = pool in ATTENTION_POOLS
        own_head = proj is None and not attention_pool

        trunk_kwargs: dict[str, Any] = {"pretrained": pretrained}
        if drop_path is not None:
            trunk_kwargs["drop_path_rate"] = drop_path
        if patch_drop is not None:
            trunk_kwargs["patch_drop_rate"] = patch_drop
        if own_head:
            # The trunk's classifier is the projection (or absent for proj='none', handled below).
            trunk_kwargs.update(num_classes=output_dim, global_pool=pool)
        elif proj == "none" and not attention_pool:
            trunk_kwargs.update(num_classes=0, global_pool=pool)
        self.trunk = _create_trunk(timm, model_name, trunk_kwargs)

        head: OrderedDict[str, nn.Module] = OrderedDict()
        if own_head:
            width = output_dim
        elif proj == "none" and not attention_pool:
            width = self.trunk.num_features  # pooled trunk features are the embedding
        else:
            width = self.trunk.num_features
            if attention_pool:
                feat_size = self.trunk.default_cfg.get("pool_size")
                if not feat_size:
                    raise ValueError(
                        f"vision.timm_pool={pool!r} needs a trunk with a 2-D feature map; {model_name} has none"
                    )
                self.trunk.reset_classifier(0, global_pool="")  # keep the feature map for the attention pool
                head["pool"] = _attention_pool(pool, width, output_dim, feat_size)
                width = output_dim
            elif pool:
                self.trunk.reset_classifier(0, global_pool=pool)
            else:
                self.trunk.reset_classifier(0)  # the model's default pooling
            if proj == "linear":
                head["drop"] = nn.Dropout(drop)
                head["proj"] = nn.Linear(width, output_dim, bias=proj_bias)
                width = output_dim
            elif proj == "mlp":
                from timm.layers import Mlp

                head["mlp"] = Mlp(width, 2 * output_dim, output_dim, drop=(drop, 0.0), bias=(True, proj_bias))
                width = output_dim
        self.output_dim = width
        self.head = nn.Sequential(head)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(N, output_dim)`` from images ``(N, 3, H, W)``."""
        return self.head(self.trunk(image))

    encode = forward

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


def build_timm_tower(cfg: Any) -> TimmImageTower:
    """The timm image tower of ``cfg`` (a ``ModelConfig`` whose ``vision.timm_model_name`` is set)."""
    vision = cfg.vision
    return TimmImageTower(
        vision.timm_model_name,
        cfg.embed_dim,
        vision.image_size,
        pool=vision.timm_pool,
        proj=vision.timm_proj,
        proj_bias=vision.timm_proj_bias,
        drop=vision.timm_drop,
        drop_path=vision.timm_drop_path,
        patch_drop=cfg.patch_dropout or None,  # timm's own patch dropout, for ViT-like trunks
        pretrained=vision.timm_pretrained,
    )


def _create_trunk(timm: Any, model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with an error naming the option a trunk does not take."""
    try:
        return timm.create_model(model_name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"vision.timm_model_name={model_name!r} is not a timm model (see timm.list_models())") from err
        raise
    except TypeError as err:
        if "patch_drop_rate" in kwargs and "patch_drop_rate" in str(err):
            raise ValueError(f"timm model {model_name} has no patch dropout; set model.patch_dropout=0") from err
        raise


def _attention_pool(kind: str, in_features: int, out_features: int, feat_size: Any) -> nn.Module:
    """timm's attention pool over the trunk's feature map: learned absolute or rotary position embedding."""
    from timm.layers import AttentionPool2d, RotAttentionPool2d

    if kind == "abs_attn":
        return AttentionPool2d(in_features, feat_size=feat_size, out_features=out_features)
    return RotAttentionPool2d(in_features, out_features=out_features)
