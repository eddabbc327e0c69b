"""A Hugging Face text model (RoBERTa, XLM-RoBERTa, mT5, NLLB/M2M-100, BERT) as CLIP's text tower.

The tower is ``transformer`` (``transformers.AutoModel.from_config``; the encoder alone for encoder-decoder
models such as mT5 and NLLB), a parameter-free pooling over its last hidden states, and ``proj`` to the
embedding width. Those are the names OpenCLIP's ``HFTextEncoder`` uses (``text.transformer.*``,
``text.proj.*``), so its checkpoints load unchanged.

Nothing downloads. The architecture comes from, in this order: ``text.hf_config_dir`` (a local directory
with the model's ``config.json``), a ``config.json`` saved beside the pretrained weights, or, for the HF
models OpenCLIP's zoo names, the sizes published on their Hugging Face model cards (``KNOWN_ARCHITECTURES``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

POOLERS = ("mean_pooler", "max_pooler", "cls_pooler", "cls_last_hidden_state_pooler")
"""``text.hf_pooler_type`` values (OpenCLIP's names)."""
PROJECTIONS = ("linear", "mlp", "none")
"""``text.hf_proj_type`` values (``None`` too: no projection when the widths agree)."""

# The config attribute holding the hidden width, per transformers ``model_type``.
_WIDTH_ATTRIBUTE = {"roberta": "hidden_size", "xlm-roberta": "hidden_size", "bert": "hidden_size",
                    "mt5": "d_model", "t5": "d_model", "m2m_100": "d_model"}

_ROBERTA_BASE = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2)
_XLM_ROBERTA_BASE = dict(_ROBERTA_BASE, vocab_size=250002)
_MT5_BASE = dict(vocab_size=250112, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                 num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6,
                 relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_NLLB_600M = dict(vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
                  scale_embedding=True, activation_function="relu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  decoder_start_token_id=2)

KNOWN_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    # hf_model_name: (transformers model_type, config values that differ from that config class's defaults).
    # Facts from each model's config.json on the Hugging Face hub; only what the offline build needs.
    "roberta-base": ("roberta", _ROBERTA_BASE),
    "xlm-roberta-base": ("xlm-roberta", _XLM_ROBERTA_BASE),
    "xlm-roberta-large": ("xlm-roberta", dict(_XLM_ROBERTA_BASE, hidden_size=1024, num_hidden_layers=24,
                                              num_attention_heads=16, intermediate_size=4096)),
    "google/mt5-base": ("mt5", _MT5_BASE),
    "google/mt5-xl": ("mt5", dict(_MT5_BASE, d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24,
                                  num_heads=32)),
    "facebook/nllb-200-distilled-600M": ("m2m_100", _NLLB_600M),
    "facebook/nllb-200-distilled-1.3B": ("m2m_100", dict(_NLLB_600M, encoder_layers=24, decoder_layers=24,
                                                         encoder_ffn_dim=8192, decoder_ffn_dim=8192)),
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # transformers is an optional dependency: only HF towers need it
        raise ImportError("Hugging Face text towers need transformers: pip install 'clip-train[hf]'") from err
    return transformers


def resolve_hf_config(hf_model_name: str, config_dir: str | None = None, pretrained: str | None = None) -> Any:
    """The transformers config of the text tower, from local files or the known-architecture table.

    Args:
        hf_model_name: the HF model the tower's architecture is (``xlm-roberta-base``, ``google/mt5-base``).
        config_dir: a local directory holding its ``config.json`` (takes precedence).
        pretrained: the weights file being loaded; a ``config.json`` beside it is used when present and its
            ``model_type`` is the one ``hf_model_name`` has (when known).
    """
    transformers = _transformers()
    known = KNOWN_ARCHITECTURES.get(hf_model_name)
    if config_dir is not None:
        if not (Path(config_dir) / "config.json").is_file():
            raise FileNotFoundError(f"text.hf_config_dir={config_dir} holds no config.json (a Hugging Face model config)")
        return transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    if pretrained is not None:
        beside = Path(pretrained).parent if Path(pretrained).is_file() else Path(pretrained)
        candidate = beside / "config.json"
        if candidate.is_file():
            config = transformers.AutoConfig.from_pretrained(str(beside), local_files_only=True)
            if known is None or config.model_type == known[0]:
                return config
    if known is not None:
        model_type, values = known
        return transformers.AutoConfig.for_model(model_type, **values)
    raise ValueError(
        f"text tower {hf_model_name!r}: no Hugging Face config to build it from; set model.text.hf_config_dir to a "
        f"local directory holding its config.json (known offline: {', '.join(sorted(KNOWN_ARCHITECTURES))})"
    )


def _pooler(kind: str) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """``(model output, attention mask) -> (N, width)`` for ``text.hf_pooler_type``."""

    def mean(out: Any, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * weights).sum(dim=1) / weights.sum(dim=1)

    def max_(out: Any, mask: torch.Tensor) -> torch.Tensor:
        return out.last_hidden_state.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).amax(dim=1)

    def cls(out: Any, mask: torch.Tensor) -> torch.Tensor:
        pooled = getattr(out, "pooler_output", None)  # BERT/RoBERTa's dense+tanh pooler, when the model has one
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def first_token(out: Any, mask: torch.Tensor) -> torch.Tensor:
        return out.last_hidden_state[:, 0]

    poolers = {"mean_pooler": mean, "max_pooler": max_, "cls_pooler": cls, "cls_last_hidden_state_pooler": first_token}
    if kind not in poolers:
        raise ValueError(f"text.hf_pooler_type={kind!r} is not one of {POOLERS}")
    return poolers[kind]


class HFTextTower(nn.Module):
    """Token ids ``(N, L)`` -> text embeddings ``(N, output_dim)`` through a transformers model.

    Args:
        config: the transformers config of the model (see ``resolve_hf_config``).
        output_dim: width of the shared embedding.
        pooler_type: one of ``POOLERS``. ``cls_pooler`` keeps the model's pooling layer (BERT-style models).
        proj_type: one of ``PROJECTIONS`` or ``None``; ``mlp`` is Linear -> GELU -> Linear with hidden width
            ``(width + output_dim) // 2``, no biases.
        context_length: tokens per caption the tokenizer produces.
    """

    def __init__(
        self,
        config: Any,
        output_dim: int,
        pooler_type: str = "mean_pooler",
        proj_type: str | None = "mlp",
        context_length: int = 77,
    ) -> None:
        super().__init__()
        transformers = _transformers()
        self.config = config
        self.pool = _pooler(pooler_type)
        if getattr(config, "is_encoder_decoder", False):
            self.transformer = transformers.AutoModel.from_config(config).encoder  # only the encoder embeds text
        else:
            self.transformer = transformers.AutoModel.from_config(config, add_pooling_layer=pooler_type == "cls_pooler")
        width = getattr(config, _WIDTH_ATTRIBUTE.get(config.model_type, "hidden_size"))
        self.width = width
        self.context_length = context_length
        self.vocab_size = config.vocab_size
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        if proj_type == "linear":
            self.proj: nn.Module = nn.Linear(width, output_dim, bias=False)
        elif proj_type == "mlp":
            hidden = (width + output_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, output_dim, bias=False))
        elif proj_type == "none" or (proj_type is None and width == output_dim):
            self.proj = nn.Identity()
        else:
            raise ValueError(
                f"text.hf_proj_type={proj_type!r}: use one of {PROJECTIONS} (null only when the text width {width} "
                f"equals embed_dim {output_dim})"
            )
        self.output_dim = output_dim if proj_type != "none" else width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of token ids; padding (the model's ``pad_token_id``) is masked out of attention and pooling."""
        mask = (tokens != self.pad_token_id).long()
        out = self.transformer(input_ids=tokens, attention_mask=mask)
        return self.proj(self.pool(out, mask))

    encode = forward

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.transformer.gradient_checkpointing_enable()
        else:
            self.transformer.gradient_checkpointing_disable()


def build_hf_text_tower(cfg: Any) -> HFTextTower:
    """The HF text tower of ``cfg`` (a ``ModelConfig`` whose ``text.hf_model_name`` is set).

    Its architecture comes from ``cfg.text.hf_config_dir``, else a ``config.json`` beside ``cfg.pretrained``,
    else the known-architecture table (see ``resolve_hf_config``).
    """
    text = cfg.text
    config = resolve_hf_config(text.hf_model_name, text.hf_config_dir, cfg.pretrained)
    return HFTextTower(config, cfg.embed_dim, text.hf_pooler_type, text.hf_proj_type, text.context_length)
