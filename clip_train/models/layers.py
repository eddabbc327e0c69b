"""Building blocks shared by the image and text towers.

Every block takes the same keyword arguments (``act_layer``, ``norm_layer``) so a tower can swap its
activation or normalisation without a fork. Parameter names follow OpenAI's CLIP release
(``attn.in_proj_weight``, ``mlp.c_fc``, ``ln_1``, ...) so released weights load without conversion.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, then cast back.

    Under fp16/bf16 autocast a half-precision LayerNorm loses enough precision to hurt CLIP training,
    so the statistics are always taken in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        out = F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI trained its CLIP models with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Two-layer feed-forward block: Linear(width, hidden) -> activation -> Linear(hidden, width)."""

    def __init__(self, width: int, hidden: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = act_layer()  # named as in OpenAI's release; it holds no weights
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Attention(nn.Module):
    """Multi-head self-attention over batch-first tokens, computed with ``scaled_dot_product_attention``.

    The packed ``in_proj_weight``/``in_proj_bias`` and ``out_proj`` mirror ``nn.MultiheadAttention``'s
    parameter names, which is what OpenAI and OpenCLIP checkpoints hold, while SDPA picks the flash or
    memory-efficient kernel where the device has one.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"attention width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (batch, heads, length, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = Attention(width, heads)
        self.ln_2 = norm_layer(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks, batch-first ``(N, L, D)``, with optional activation checkpointing."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer)
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, is_causal, use_reentrant=False)
            else:
                x = block(x, is_causal=is_causal)
        return x

    def init_weights(self, attn_std: float, proj_std: float, fc_std: float) -> None:
        """Normal init of every block: ``attn_std`` for q/k/v, ``proj_std`` for both output projections."""
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
