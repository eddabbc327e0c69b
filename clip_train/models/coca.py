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

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from clip_train.models.clip import MAX_LOGIT_SCALE, build_image_tower, build_text_tower
from clip_train.models.config import ModelConfig
from clip_train.models.layers import (
    Attention,
    LayerNorm,
    LayerScale,
    Mlp,
    ResidualAttentionBlock,
    make_act_layer,
    make_norm_layer,
)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x), ln_1_kv(context))`` then ``x + mlp(ln_2(x))``."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        self.ln_1 = norm_layer(width)
        # Queries, keys and values all have the decoder's width: one packed in_proj_weight, as OpenCLIP stores it.
        self.attn = Attention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_1_kv = norm_layer(width)
        self.ln_2 = norm_layer(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=act_layer)
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), context=self.ln_1_kv(context)))
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
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.context_length = context_length
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act_layer, norm_layer, ls_init_value) for _ in range(layers)
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


class CocaOutput(NamedTuple):
    """What ``CoCa.forward`` returns: CLIP's three outputs first, then what the captioning loss needs."""

    image_features: torch.Tensor
    """L2-normalised image embeddings ``(N, embed_dim)``."""
    text_features: torch.Tensor
    """L2-normalised text embeddings ``(N, embed_dim)`` (the text tower's class token)."""
    logit_scale: torch.Tensor
    """``exp(logit_scale)``, at most 100."""
    caption_logits: torch.Tensor
    """Next-token logits ``(N, L - 1, vocab)`` for the caption's first ``L - 1`` tokens (teacher forcing)."""
    caption_labels: torch.Tensor
    """The ids those logits should predict: the caption shifted by one, ``(N, L - 1)``."""


class CoCa(nn.Module):
    """An image tower with an attentional pooler, a text tower with a class token, and the captioning decoder.

    ``encode_image``/``encode_text`` give the contrastive embeddings as CLIP's do, so zero-shot evaluation and
    retrieval work unchanged; ``forward(image, text)`` returns a :class:`CocaOutput` for ``CocaLoss``;
    ``caption_logits`` is the decoder step that ``clip_train.generate`` calls.
    """

    def __init__(self, cfg: ModelConfig, init_temperature: float = 0.07, init_logit_bias: float | None = None) -> None:
        super().__init__()
        if cfg.multimodal is None:
            raise ValueError(f"model {cfg.name} has no multimodal decoder config (model.multimodal); it is not CoCa")
        if not cfg.is_vit:
            raise ValueError(f"CoCa needs a CLIP ViT image tower (its tokens feed the decoder); {cfg.name} has another")
        self.config = cfg
        self.visual = build_image_tower(cfg)
        self.text = build_text_tower(cfg)
        multimodal = cfg.multimodal
        self.text_decoder = MultimodalDecoder(
            width=multimodal.width,
            layers=multimodal.layers,
            heads=multimodal.heads,
            # OpenCLIP sizes the decoder's vocabulary from the text tower's config, not multimodal_cfg's.
            vocab_size=cfg.text.vocab_size,
            context_length=multimodal.context_length,
            mlp_ratio=multimodal.mlp_ratio,
            ls_init_value=multimodal.ls_init_value,
            act_layer=make_act_layer(cfg.quick_gelu, multimodal.act_approximate),
            norm_layer=make_norm_layer(multimodal.norm_eps),
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        if init_logit_bias is None:
            init_logit_bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        self.context_length = cfg.text.context_length
        self.vocab_size = cfg.text.vocab_size
        self.pad_id = cfg.text.pad_id

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def text_tower(self) -> nn.Module:
        return self.text

    # ------------------------------------------------------------------------------------------ towers

    def image_latent_and_tokens(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image embedding ``(N, embed_dim)`` (unnormalised) and the tokens the decoder attends to.

        With the attentional pooler (OpenCLIP's CoCa ViTs) its first query's output is the embedding and the
        other queries' outputs are the decoder's tokens; without it, the class token and the patch tokens.
        """
        visual = self.visual
        x = visual.forward_features(image)
        if visual.attn_pool is not None:
            x = visual.ln_post(visual.attn_pool(x))
        elif not visual.final_ln_after_pool:
            x = visual.ln_post(x)
        if visual.pool_type == "tok":
            pooled, tokens = x[:, 0], x[:, 1:]
        elif visual.pool_type == "avg":
            pooled, tokens = x[:, 1:].mean(dim=1), x[:, 1:]
        else:
            pooled, tokens = x, x
        if visual.attn_pool is None and visual.final_ln_after_pool:
            pooled = visual.ln_post(pooled)
        return pooled @ visual.proj, tokens

    def text_latent_and_tokens(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text embedding ``(N, embed_dim)`` (unnormalised; the appended class token's output after
        ``ln_final``) and the caption tokens' outputs ``(N, L, width)`` before ``ln_final``, the decoder's input."""
        tower = self.text
        if getattr(tower, "cls_emb", None) is None:
            return self._hf_text_latent_and_tokens(text)
        length = text.shape[1]
        if length > tower.context_length:
            raise ValueError(f"got {length} tokens per row, the model's context length is {tower.context_length}")
        x = tower.token_embedding(text)
        x = torch.cat([x, tower.cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        x = x + tower.positional_embedding[: length + 1].to(x.dtype)
        x = tower.transformer(x, attn_mask=tower._class_token_mask(text, x.dtype))
        pooled = tower.ln_final(x[:, -1])
        projection = tower.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection
        return pooled, x[:, :-1]

    def _hf_text_latent_and_tokens(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A Hugging Face text tower (``coca_roberta-ViT-B-32``): its pooled, projected embedding, and the last
        hidden states as the decoder's input (without the first token when the tower pools at it, as OpenCLIP)."""
        tower = self.text
        mask = (text != tower.pad_token_id).long()
        out = tower.transformer(input_ids=text, attention_mask=mask)
        pooled = tower.proj(tower.pool(out, mask))
        tokens = out.last_hidden_state
        if self.config.text.hf_pooler_type == "cls_pooler":
            tokens = tokens[:, 1:]
        return pooled, tokens

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings ``(N, embed_dim)`` from images normalised with CLIP's mean/std."""
        features = self.image_latent_and_tokens(image)[0]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, embed_dim)`` from token ids ``(N, L)``."""
        features = self.text_latent_and_tokens(tokens)[0]
        return F.normalize(features, dim=-1) if normalize else features

    # ------------------------------------------------------------------------------------------ decoder

    def caption_logits(self, image_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(N, L, vocab)`` after each of the ``L`` caption tokens, given the image tokens."""
        return self.text_decoder(image_tokens, self.text_latent_and_tokens(text)[1])

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> CocaOutput:
        """Contrastive features, the softmax scale and teacher-forced caption logits with their labels."""
        image_latent, image_tokens = self.image_latent_and_tokens(image)
        text_latent, text_tokens = self.text_latent_and_tokens(text)
        # The decoder sees tokens 0..L-2 and predicts tokens 1..L-1.
        logits = self.text_decoder(image_tokens, text_tokens[:, :-1])
        return CocaOutput(
            F.normalize(image_latent, dim=-1),
            F.normalize(text_latent, dim=-1),
            self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp(),
            logits,
            text[:, 1:],
        )

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that AdamW should not decay besides gains and biases (all 1-D tensors)."""
        names = {"logit_scale", "logit_bias", "text.positional_embedding", "text.token_embedding.weight",
                 "text.cls_emb", "visual.class_embedding", "visual.positional_embedding"}
        return {n for n, _ in self.named_parameters() if n in names}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward instead of storing them, in all three transformers."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
        self.text_decoder.grad_checkpointing = enable
