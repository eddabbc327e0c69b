"""The text transformer: token and positional embeddings, pre-norm blocks, a pooled token, a projection.

Its options are keywords of one module, as in timm: causal mask or not, pooling at the highest id (CLIP's
end-of-text), at an end-of-sequence id, at the first or last token, an appended class token (CoCa),
projection as a matrix, a biased linear layer or none, layer scale, norm epsilon, GELU approximation.

Where the parts live decides the state-dict keys: OpenAI's layout (and OpenCLIP's ``CLIP``) keeps them at
the model's top level (``token_embedding.weight``), OpenCLIP's ``CustomTextCLIP`` in a ``text`` submodule
(``text.token_embedding.weight``). ``TextTowerMixin`` builds the parts on whichever module holds them.
"""

from __future__ import annotations

import torch
from torch import nn

from clip_train.models.config import TextConfig
from clip_train.models.layers import Transformer, make_act_layer, make_norm_layer

TEXT_POOL_TYPES = ("argmax", "eos", "first", "last", "none")
TEXT_PROJ_TYPES = ("linear", "none")


class TextTowerMixin:
    """Builds the text tower's parts on ``self`` and encodes token ids with them."""

    token_embedding: nn.Embedding
    positional_embedding: nn.Parameter
    transformer: Transformer
    ln_final: nn.Module
    text_projection: nn.Parameter | nn.Linear | None
    cls_emb: nn.Parameter | None

    def build_text_parts(self, cfg: TextConfig, embed_dim: int, quick_gelu: bool) -> None:
        """Create the parameters of the tower ``cfg`` describes (call from ``__init__`` after ``nn.Module``'s)."""
        if cfg.pool_type not in TEXT_POOL_TYPES:
            raise ValueError(f"text pool_type must be one of {', '.join(TEXT_POOL_TYPES)}, got {cfg.pool_type!r}")
        if cfg.proj_type not in TEXT_PROJ_TYPES:
            raise ValueError(f"text proj_type must be one of {', '.join(TEXT_PROJ_TYPES)}, got {cfg.proj_type!r}")
        self.text_cfg = cfg
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        norm_layer = make_norm_layer(cfg.norm_eps)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        # CoCa appends its class token after the caption, so the positional table has one more row.
        self.cls_emb = nn.Parameter(torch.empty(cfg.width)) if cfg.embed_cls else None
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length + int(cfg.embed_cls), cfg.width))
        self.transformer = Transformer(
            cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio,
            act_layer=make_act_layer(quick_gelu, cfg.act_approximate), norm_layer=norm_layer,
            ls_init_value=cfg.ls_init_value,
        )
        self.ln_final = norm_layer(cfg.width)
        if cfg.proj_type == "none":
            self.text_projection = None
        elif cfg.proj_bias:
            self.text_projection = nn.Linear(cfg.width, embed_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self.init_text_weights()

    def init_text_weights(self) -> None:
        """CLIP's reference initialisation of the text tower."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        self.transformer.init_weights(
            attn_std=width**-0.5, proj_std=width**-0.5 * (2 * layers) ** -0.5, fc_std=(2 * width) ** -0.5
        )
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=width**-0.5)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def text_output_dim(self) -> int:
        if self.text_projection is None:
            return self.transformer.width
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection.out_features
        return self.text_projection.shape[1]

    def _class_token_mask(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (N, 1, L+1, L+1) hiding padding keys, causal unless disabled, for CoCa's class token.

        The key positions are shifted by one (the always-visible slot first), as OpenCLIP's CoCa weights
        were trained with.
        """
        batch, length = tokens.shape
        keep = torch.cat([tokens.new_ones(batch, 1, dtype=torch.bool), tokens != self.text_cfg.pad_id], dim=1)
        mask = torch.zeros(batch, 1, length + 1, length + 1, dtype=dtype, device=tokens.device)
        mask.masked_fill_(~keep[:, None, None, :], float("-inf"))
        if not self.text_cfg.no_causal_mask:
            causal = torch.ones(length + 1, length + 1, dtype=torch.bool, device=tokens.device).triu(1)
            mask.masked_fill_(causal, float("-inf"))
        return mask

    def _pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        pool_type = self.text_cfg.pool_type
        if pool_type == "argmax":  # CLIP's end-of-text token has the highest id in its vocabulary
            return x[rows, tokens.argmax(dim=-1)]
        if pool_type == "eos":  # the first end-of-sequence id of each row
            return x[rows, (tokens == self.text_cfg.eos_id).int().argmax(dim=-1)]
        if pool_type == "first":
            return x[:, 0]
        if pool_type == "last":
            return x[:, -1]
        return x

    def encode_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected text features ``(N, embed_dim)`` from token ids ``(N, L)``."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"got {length} tokens per row, the model's context length is {self.context_length}")
        x = self.token_embedding(tokens)
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
            x = x + self.positional_embedding[: length + 1].to(x.dtype)
            x = self.transformer(x, attn_mask=self._class_token_mask(tokens, x.dtype))
            pooled = self.ln_final(x[:, -1])  # the class token, normalised after pooling
        else:
            x = x + self.positional_embedding[:length].to(x.dtype)
            x = self.transformer(x, is_causal=not self.text_cfg.no_causal_mask)
            pooled = self._pool(self.ln_final(x), tokens)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        if self.text_projection is not None:
            return pooled @ self.text_projection
        return pooled


class TextTransformer(TextTowerMixin, nn.Module):
    """The text tower as its own module (OpenCLIP's ``CustomTextCLIP`` keeps it under ``text.``)."""

    def __init__(self, cfg: TextConfig, embed_dim: int, quick_gelu: bool = False) -> None:
        super().__init__()
        self.build_text_parts(cfg, embed_dim, quick_gelu)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text_tokens(tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
