"""CLIP's Vision Transformer image tower (Dosovitskiy et al. 2020, with CLIP's extra ``ln_pre``)."""

from __future__ import annotations

import torch
from torch import nn

from clip_train.models.layers import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    """Patchify with a strided conv, prepend a class token, run pre-norm blocks, project the class token.

    Parameter names match OpenAI's release (``conv1``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer``, ``ln_post``, ``proj``).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNorm,
        patch_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(f"patch_dropout is a fraction of patches in [0, 1), got {patch_dropout}")
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.output_dim = output_dim
        self.patch_dropout = patch_dropout

        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size**2 + 1, width))
        self.ln_pre = norm_layer(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer)
        self.ln_post = norm_layer(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block, ``(N, 1 + grid**2, width)``; token 0 is the class token."""
        if image.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {tuple(image.shape[-2:])}; "
                "resize them or build the model with vision.image_size set to their size"
            )
        x = self.conv1(image).flatten(2).transpose(1, 2)  # (N, grid**2, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.training and self.patch_dropout > 0:
            x = self.drop_patches(x)
        x = self.ln_pre(x)
        return self.transformer(x)

    def drop_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Keep the class token and a random ``1 - patch_dropout`` of the patch tokens, per image (FLIP).

        Dropping happens after the positional embedding is added, so the kept tokens still know where
        they came from; the blocks then see a shorter sequence, which is where the saving comes from.
        """
        cls, patches = tokens[:, :1], tokens[:, 1:]
        batch, num_patches, width = patches.shape
        keep = max(1, int(num_patches * (1.0 - self.patch_dropout)))
        # A random permutation per image: the first ``keep`` entries of argsort of uniform noise.
        kept = torch.rand(batch, num_patches, device=tokens.device).argsort(dim=1)[:, :keep]
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))
        return torch.cat([cls, patches], dim=1)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_post(tokens[:, 0]) @ self.proj

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
