"""Building blocks shared by the image and text towers.

Every block takes the same keyword arguments (``act_layer``, ``norm_layer``) so a tower can swap its
activation or normalisation without a fork. Parameter names follow OpenAI's CLIP release
(``attn.in_proj_weight``, ``mlp.c_fc``, ``ln_1``, ...) so released weights load without conversion.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
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


def make_act_layer(quick_gelu: bool, approximate: str = "none") -> Callable[[], nn.Module]:
    """The activation constructor a tower's blocks use: QuickGELU, or GELU with ``approximate`` (``none``/``tanh``)."""
    if quick_gelu:
        return QuickGELU
    if approximate not in ("none", "tanh"):
        raise ValueError(f"GELU approximation must be 'none' or 'tanh', got {approximate!r}")
    return functools.partial(nn.GELU, approximate=approximate) if approximate != "none" else nn.GELU


def make_norm_layer(eps: float = 1e-5) -> Callable[[int], nn.Module]:
    """The (fp32) LayerNorm constructor with the given epsilon."""
    return functools.partial(LayerNorm, eps=eps) if eps != 1e-5 else LayerNorm


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT); ``gamma`` starts at ``init_value``."""

    def __init__(self, width: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Two-layer feed-forward block: Linear(width, hidden) -> activation -> Linear(hidden, width)."""

    def __init__(self, width: int, hidden: int, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = act_layer()  # named as in OpenAI's release; it holds no weights
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Attention(nn.Module):
    """Multi-head attention over batch-first tokens, computed with ``scaled_dot_product_attention``.

    Parameter names mirror ``nn.MultiheadAttention``'s, which is what OpenAI and OpenCLIP checkpoints hold:
    one packed ``in_proj_weight`` when keys and values have the query's width, separate ``q_proj_weight`` /
    ``k_proj_weight`` / ``v_proj_weight`` when they come from a context of another width (``context_dim``).
    SDPA picks the flash or memory-efficient kernel where the device has one.
    """

    def __init__(self, width: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"attention width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.packed = context_dim is None or context_dim == width
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(width, width))
            self.k_proj_weight = nn.Parameter(torch.empty(width, context_dim))
            self.v_proj_weight = nn.Parameter(torch.empty(width, context_dim))
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(weight)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        width = self.out_proj.in_features
        bias_q, bias_k, bias_v = self.in_proj_bias.split(width)
        if self.packed:
            if context is None:  # self-attention: one matmul for q, k and v
                return F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            w_q, w_kv = self.in_proj_weight.split([width, 2 * width])
            k, v = F.linear(context, w_kv, torch.cat([bias_k, bias_v])).chunk(2, dim=-1)
            return F.linear(x, w_q, bias_q), k, v
        context = x if context is None else context
        return (F.linear(x, self.q_proj_weight, bias_q), F.linear(context, self.k_proj_weight, bias_k),
                F.linear(context, self.v_proj_weight, bias_v))

    def forward(
        self,
        x: torch.Tensor,
        is_causal: bool = False,
        attn_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` (N, Lq, D) to ``context`` (N, Lk, C; ``x`` itself when None).

        ``attn_mask`` is additive (0 / -inf), broadcastable to (N, heads, Lq, Lk).
        """
        batch, length, width = x.shape
        q, k, v = self._project(x, context)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, heads, L, head_dim)
            return t.view(batch, t.shape[1], self.heads, width // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + ls_1(attn(ln_1(x)))`` then ``x + ls_2(mlp(ln_2(x)))``.

    Layer scale (``ls_1``/``ls_2``) exists only when ``ls_init_value`` is given, so CLIP's keys are unchanged.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        ls_init_value: float | None = None,
    ) -> None:
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = Attention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = norm_layer(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=act_layer)
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, is_causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), is_causal=is_causal, attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class AttentionalPooler(nn.Module):
    """``queries`` learned queries attend to the (normalised) tokens: (N, L, context_dim) -> (N, queries, width).

    Names as OpenCLIP's ``attn_pool``: ``query``, ``attn`` (MultiheadAttention names), ``ln_q``, ``ln_k``.
    """

    def __init__(
        self, width: int, context_dim: int, heads: int = 8, queries: int = 256,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, width))
        self.attn = Attention(width, heads, context_dim=context_dim)
        self.ln_q = norm_layer(width)
        self.ln_k = norm_layer(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        queries = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(queries, context=self.ln_k(tokens))


class Transformer(nn.Module):
    """A stack of residual attention blocks, batch-first ``(N, L, D)``, with optional activation checkpointing."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        ls_init_value: float | None = None,
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(
                width, heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer, ls_init_value=ls_init_value
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, is_causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, is_causal, attn_mask, use_reentrant=False)
            else:
                x = block(x, is_causal=is_causal, attn_mask=attn_mask)
        return x

    def init_weights(self, attn_std: float, proj_std: float, fc_std: float) -> None:
        """Normal init of every block: ``attn_std`` for q/k/v, ``proj_std`` for both output projections."""
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
