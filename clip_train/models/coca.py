"""CoCa (Yu et al. 2022, "Contrastive Captioners"): a CLIP model plus a multimodal text decoder.

The image tower pools its tokens with an attentional pooler: the first pooled token is the contrastive
image feature, the others are what the decoder attends to. The text tower appends a class token whose
output is the contrastive text feature; its other outputs (before ``ln_final``) are the decoder's input.
The decoder alternates causal self-attention blocks with cross-attention blocks over the image tokens
and predicts the next token of the caption at every position.

Parameter names equal OpenCLIP's CoCa (``visual.attn_pool.*``, ``text.*``, ``text_decoder.resblocks.*``,
``text_decoder.cross_attn.*``, ``text_decoder.ln_final``, ``text_decoder.text_projection``), so its state
dicts load unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from clip_train.models.layers import Attention, LayerNorm, Mlp, ResidualAttentionBlock


class CrossAttention(Attention):
    """Multi-head attention whose queries come from ``x`` and keys/values from ``context``.

    Queries, keys and values all have the decoder's width, so the three projections stay packed in one
    ``in_proj_weight`` exactly as ``nn.MultiheadAttention`` (and therefore OpenCLIP) stores them.
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        batch, length, width = x.shape
        head_dim = width // self.heads
        w_q, w_kv = self.in_proj_weight.split([width, 2 * width])
        b_q, b_kv = self.in_proj_bias.split([width, 2 * width])
        q = F.linear(x, w_q, b_q).view(batch, length, self.heads, head_dim).transpose(1, 2)
        kv = F.linear(context, w_kv, b_kv).view(batch, context.shape[1], 2, self.heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, context length, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class LayerScale(nn.Module):
    """A learned per-channel gain on a residual branch (Touvron et al. 2021), stored as ``gamma``."""

    def __init__(self, width: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x), ln_1_kv(context))`` then ``x + mlp(ln_2(x))``."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = CrossAttention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_1_kv = norm_layer(width)
        self.ln_2 = norm_layer(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=act_layer)
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), self.ln_1_kv(context)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class MultimodalDecoder(nn.Module):
    """CoCa's captioning decoder: ``layers`` pairs of (causal self-attention block, cross-attention block).

    ``forward(image_tokens, text_tokens)`` maps the text tower's token outputs ``(N, L, width)`` and the image
    tower's tokens ``(N, M, width)`` to next-token logits ``(N, L, vocab_size)``.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        vocab_size: int,
        context_length: int = 76,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.context_length = context_length
        self.grad_checkpointing = False
        block_kwargs = {"act_layer": act_layer, "norm_layer": norm_layer}
        if ls_init_value is not None:
            block_kwargs["ls_init_value"] = ls_init_value
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, **block_kwargs) for _ in range(layers)
        )
        self.cross_attn = nn.ModuleList(
            CrossAttentionBlock(width, heads, mlp_ratio, ls_init_value, act_layer, norm_layer) for _ in range(layers)
        )
        self.ln_final = norm_layer(width)
        self.text_projection = nn.Parameter(torch.empty(width, vocab_size))
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's text-tower initialisation, applied to both kinds of block and the vocabulary projection."""
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in [*self.resblocks, *self.cross_attn]:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=attn_std)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        if text_tokens.shape[1] > self.context_length:
            raise ValueError(
                f"the decoder reads at most {self.context_length} tokens, got {text_tokens.shape[1]}"
            )
        x = text_tokens
        for self_block, cross_block in zip(self.resblocks, self.cross_attn):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self_block, x, True, use_reentrant=False)
                x = torch.utils.checkpoint.checkpoint(cross_block, x, image_tokens, use_reentrant=False)
            else:
                x = self_block(x, is_causal=True)
                x = cross_block(x, image_tokens)
        return self.ln_final(x) @ self.text_projection
