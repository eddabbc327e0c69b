"""CLIP's ModifiedResNet image tower (Radford et al. 2021, section 2.4).

Three changes from torchvision's ResNet: a 3-conv stem with average pooling, anti-aliased strided
convolutions (average pool *before* a stride-1 conv), and attention pooling instead of global average pooling.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg pool) -> 1x1 bottleneck with expansion 4; convs carry no bias."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act3 = nn.ReLU(inplace=True)

        self.downsample: nn.Module | None = None
        if stride > 1 or in_channels != out_channels:
            # Keys "-1", "0", "1" reproduce OpenAI's names (downsample.0.weight is the conv).
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(out_channels)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """One multi-head attention layer whose only query is the mean of the feature map (plus position)."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self.heads, channels // self.heads).transpose(1, 2)

        q = split_heads(self.q_proj(x[:, :1]))
        k = split_heads(self.k_proj(x))
        v = split_heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, 1, head_dim)
        return self.c_proj(out.transpose(1, 2).reshape(batch, channels))


class ModifiedResNet(nn.Module):
    """ResNet trunk (stage depths ``layers``, stem width ``width``) ending in attention pooling."""

    def __init__(
        self, layers: list[int], output_dim: int, heads: int, image_size: int = 224, width: int = 64
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"a ModifiedResNet needs 4 stage depths, got {list(layers)}")
        if image_size % 32 != 0:
            raise ValueError(f"ResNet image_size must be a multiple of 32, got {image_size}")
        self.image_size = image_size
        self.output_dim = output_dim

        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._in_channels = width
        self.layer1 = self._make_stage(width, layers[0])
        self.layer2 = self._make_stage(width * 2, layers[1], stride=2)
        self.layer3 = self._make_stage(width * 4, layers[2], stride=2)
        self.layer4 = self._make_stage(width * 8, layers[3], stride=2)

        embed_dim = width * 32  # channels of layer4's output
        self.attnpool = AttentionPool2d(image_size // 32, embed_dim, heads, output_dim)
        self.grad_checkpointing = False
        self.init_weights()

    def _make_stage(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        stage = [Bottleneck(self._in_channels, planes, stride)]
        self._in_channels = planes * Bottleneck.expansion
        stage += [Bottleneck(self._in_channels, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*stage)

    def init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        # Zero-init the last BN of each residual branch so every block starts as the identity.
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """The final feature map, ``(N, width*32, image_size/32, image_size/32)``."""
        if image.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {tuple(image.shape[-2:])}; "
                "resize them or build the model with vision.image_size set to their size"
            )
        x = self.stem(image)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint_sequential(stage, len(stage), x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.attnpool(features)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
