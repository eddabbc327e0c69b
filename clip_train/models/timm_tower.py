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

The trunk is built at timm's own input size for its name, as OpenCLIP does, then set to ``image_size`` when
that differs and the trunk can change it (timm's ``set_input_size``: ViT, EVA, Swin, ...; a ViT's absolute
position table is resampled bicubically), as OpenCLIP's ``force_image_size`` does; convolutional trunks take
any size as built. Pretrained weights made at the trunk's own size load into the resized tower through
``resize_pretrained_positions``, so ``model.force_image_size=384`` fine-tunes a 224-pixel SigLIP file.
timm never downloads anything unless ``pretrained`` asks for its ImageNet weights.
"""

from __future__ import annotations

import math
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
        image_size: input resolution the model is fed; a trunk built for another size is set to it.
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
        self.timm_image_size = _built_input_size(self.trunk)
        """(height, width) timm builds this trunk for; OpenCLIP builds it so whatever ``image_size`` says."""
        if self.resized_trunk:
            # After timm's own weights (pretrained=True) are in, as OpenCLIP's force_image_size does it.
            self.trunk.set_input_size(img_size=(image_size, image_size))

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

    @property
    def resized_trunk(self) -> bool:
        """Whether the trunk was set to ``image_size`` from timm's own size (its weights then differ in shape)."""
        return self.timm_image_size != (self.image_size, self.image_size) and hasattr(self.trunk, "set_input_size")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(N, output_dim)`` from images ``(N, 3, H, W)``."""
        return self.head(self.trunk(image))

    encode = forward

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def resize_pretrained_positions(self, state_dict: dict[str, torch.Tensor], prefix: str = "visual.") -> list[str]:
        """Resample, in place, the trunk's absolute position table in ``state_dict`` (keys under ``prefix``)
        when it was made for another square patch grid; returns a line per table resized.

        timm's own ``resample_abs_pos_embed`` with the trunk's prefix tokens (class, registers) kept, so a
        file made at timm's size gives exactly what loading it there and then ``set_input_size`` gives (the
        OpenCLIP way). Any other shape difference is left for the strict load to name.
        """
        key = f"{prefix}trunk.pos_embed"
        table, old = getattr(self.trunk, "pos_embed", None), state_dict.get(key)
        if not isinstance(table, torch.Tensor) or not isinstance(old, torch.Tensor) or old.ndim != 3:
            return []
        if old.shape[0] != 1 or old.shape[2] != table.shape[2] or old.shape[1] == table.shape[1]:
            return []
        prefix_tokens = 0 if getattr(self.trunk, "no_embed_class", False) else self.trunk.num_prefix_tokens
        new_grid = tuple(self.trunk.patch_embed.grid_size)
        old_side = math.isqrt(max(old.shape[1] - prefix_tokens, 0))
        if old_side * old_side != old.shape[1] - prefix_tokens or old_side == 0:
            return []  # not a square grid behind these prefix tokens: the strict load names the shapes
        from timm.layers import resample_abs_pos_embed

        state_dict[key] = resample_abs_pos_embed(
            old, new_size=list(new_grid), old_size=[old_side, old_side], num_prefix_tokens=prefix_tokens
        )
        return [f"{key} resized from a {old_side}x{old_side} to a {new_grid[0]}x{new_grid[1]} patch grid (bicubic)"]


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


def _built_input_size(trunk: nn.Module) -> tuple[int, int]:
    """The image size a timm trunk was built for: its patch embedding's, else its pretrained config's."""
    size = getattr(getattr(trunk, "patch_embed", None), "img_size", None)
    if size is None:
        size = trunk.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _attention_pool(kind: str, in_features: int, out_features: int, feat_size: Any) -> nn.Module:
    """timm's attention pool over the trunk's feature map: learned absolute or rotary position embedding."""
    from timm.layers import AttentionPool2d, RotAttentionPool2d

    if kind == "abs_attn":
        return AttentionPool2d(in_features, feat_size=feat_size, out_features=out_features)
    return RotAttentionPool2d(in_features, out_features=out_features)
