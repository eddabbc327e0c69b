"""CLIP's Vision Transformer image tower (Dosovitskiy et al. 2020, with CLIP's extra ``ln_pre``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clip_train.models.layers import AttentionalPooler, LayerNorm, Transformer

POOL_TYPES = ("tok", "avg", "none")


class VisionTransformer(nn.Module):
    """Patchify with a strided conv, prepend a class token, run pre-norm blocks, project the class token.

    Parameter names match OpenAI's release (``conv1``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer``, ``ln_post``, ``proj``) and OpenCLIP's for its options (``attn_pool``, layer
    scale ``ls_1``/``ls_2``). Options, as keywords: ``pool_type`` (class token, mean of patch tokens, or all
    tokens), ``final_ln_after_pool``, ``no_ln_pre``, ``ls_init_value``, ``attentional_pool``.
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
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        patch_dropout: float = 0.0,
        ls_init_value: float | None = None,
        pool_type: str = "tok",
        final_ln_after_pool: bool = False,
        no_ln_pre: bool = False,
        pos_embed_type: str = "learnable",
        attentional_pool: bool = False,
        attn_pooler_queries: int = 256,
        attn_pooler_heads: int = 8,
    ) -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"vision pool_type must be one of {', '.join(POOL_TYPES)}, got {pool_type!r}")
        if pos_embed_type != "learnable":
            raise ValueError(f"vision pos_embed_type {pos_embed_type!r} is not supported (only 'learnable')")
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(f"patch_dropout is a fraction of patches in [0, 1), got {patch_dropout}")
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.output_dim = output_dim
        self.patch_dropout = patch_dropout
        self.pool_type = pool_type
        self.final_ln_after_pool = final_ln_after_pool

        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size**2 + 1, width))
        self.ln_pre = nn.Identity() if no_ln_pre else norm_layer(width)
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer, ls_init_value=ls_init_value
        )
        # With an attentional pooler the queries' outputs (of the embedding width) are what ln_post and proj see.
        self.attn_pool = (
            AttentionalPooler(output_dim, width, heads=attn_pooler_heads, queries=attn_pooler_queries,
                              norm_layer=norm_layer)
            if attentional_pool else None
        )
        pool_width = output_dim if attentional_pool else width
        self.ln_post = norm_layer(pool_width)
        self.proj = nn.Parameter(scale * torch.randn(pool_width, output_dim))

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

    def _global_pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "tok":
            return tokens[:, 0]
        if self.pool_type == "avg":
            return tokens[:, 1:].mean(dim=1)
        return tokens

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image embedding from the last block's tokens: pool, normalise (order per options), project."""
        if self.attn_pool is not None:
            pooled = self._global_pool(self.ln_post(self.attn_pool(tokens)))
        elif self.final_ln_after_pool:
            pooled = self.ln_post(self._global_pool(tokens))
        else:
            pooled = self._global_pool(self.ln_post(tokens))
        return pooled @ self.proj

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
