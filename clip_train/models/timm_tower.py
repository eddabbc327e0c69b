"""Any timm model as CLIP's image tower: the pooled trunk features followed by a linear projection."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class TimmImageTower(nn.Module):
    """``timm.create_model(name, num_classes=0)`` as trunk plus ``head.proj`` to the embedding width.

    The ``trunk`` / ``head.proj`` names are the ones OpenCLIP uses for its timm towers, so those
    checkpoints load unchanged.
    """

    def __init__(self, model_name: str, output_dim: int, image_size: int, pretrained: bool = False) -> None:
        super().__init__()
        import timm  # imported here: only timm towers pay for timm's import time

        kwargs = {"pretrained": pretrained, "num_classes": 0}
        try:
            # ViT-like timm models size their position embeddings from img_size; CNNs take any size.
            self.trunk = timm.create_model(model_name, img_size=image_size, **kwargs)
        except TypeError:
            self.trunk = timm.create_model(model_name, **kwargs)
        self.image_size = image_size
        self.output_dim = output_dim
        self.head = nn.Sequential(OrderedDict(proj=nn.Linear(self.trunk.num_features, output_dim, bias=False)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(image))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)
