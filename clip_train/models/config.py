"""Typed descriptions of a CLIP architecture.

These dataclasses are both the Python API (``create_model`` builds from them) and the schema of the
Hydra ``model`` config group, so every field carries a docstring-style comment users see in the configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

GELU_APPROXIMATIONS = ("none", "tanh")
# OpenAI's image statistics and resize (CLIP's paper); every model without its own preprocessing uses them.
OPENAI_IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_INTERPOLATION = "bicubic"
DEFAULT_IMAGE_RESIZE_MODE = "shortest"
IMAGE_INTERPOLATIONS = ("bicubic", "bilinear")
IMAGE_RESIZE_MODES = ("shortest", "squash")
PREPROCESS_FIELDS = ("image_mean", "image_std", "image_interpolation", "image_resize_mode")
"""The ``ModelConfig`` fields that say how images are prepared for the model (see docs/models.md)."""


@dataclass(frozen=True)
class ImagePreprocessing:
    """A model's image preprocessing, resolved (``ModelConfig.preprocessing``): what the data path applies."""

    mean: tuple[float, float, float] = OPENAI_IMAGE_MEAN
    """Per-channel mean, RGB, on the 0-1 scale."""
    std: tuple[float, float, float] = OPENAI_IMAGE_STD
    interpolation: str = DEFAULT_IMAGE_INTERPOLATION
    """Resampling of the evaluation resize (``bicubic`` | ``bilinear``)."""
    resize_mode: str = DEFAULT_IMAGE_RESIZE_MODE
    """Evaluation resize: ``shortest`` (shorter side, centre crop) or ``squash`` (whole image, no crop)."""


@dataclass
class VisionConfig:
    """The image tower. ``patch_size`` set: CLIP ViT; ``layers`` as four stage depths: ModifiedResNet;
    ``timm_model_name`` set: any timm model with OpenCLIP's head variants (``timm_pool``, ``timm_proj``)."""

    image_size: int = 224
    """Input resolution (pixels on a side)."""
    layers: List[int] = field(default_factory=lambda: [12])
    """ViT: one entry, the number of blocks. ResNet: four entries, blocks per stage (RN50: [3, 4, 6, 3])."""
    width: int = 768
    """ViT: token width. ResNet: width of the stem (64 for RN50)."""
    patch_size: Optional[int] = 16
    """ViT patch size; null for a ResNet or timm tower."""
    head_width: int = 64
    """Channels per attention head (ViT heads = width / head_width; ResNet attnpool: width*32 / head_width)."""
    mlp_ratio: float = 4.0
    """Hidden width of each ViT MLP relative to the token width."""
    ls_init_value: Optional[float] = None
    """ViT: initial value of each block's layer scale (``ls_1.gamma``/``ls_2.gamma``); null: no layer scale."""
    pool_type: str = "tok"
    """ViT: which token(s) become the image feature: ``tok`` (class token), ``avg`` (mean of patch tokens),
    ``none`` (all tokens)."""
    final_ln_after_pool: bool = False
    """ViT: apply ``ln_post`` to the pooled feature instead of to every token before pooling."""
    no_ln_pre: bool = False
    """ViT: leave out the ``ln_pre`` LayerNorm CLIP adds before the blocks (e.g. CLIPA)."""
    pos_embed_type: str = "learnable"
    """ViT positional embedding: ``learnable`` or ``sin_cos_2d`` (fixed, not trained)."""
    attentional_pool: bool = False
    """ViT: pool the tokens with a learned-query attention pooler (``attn_pool``) after the blocks (CoCa)."""
    attn_pooler_queries: int = 256
    """Queries of the attentional pooler."""
    attn_pooler_heads: int = 8
    """Heads of the attentional pooler."""
    norm_eps: float = 1e-5
    """Epsilon of the ViT's LayerNorms."""
    act_approximate: str = "none"
    """ViT GELU approximation: ``none`` (exact) or ``tanh``; ignored with ``quick_gelu``."""
    timm_model_name: Optional[str] = None
    """Name of a timm model to use as the image tower instead of a CLIP tower (e.g. ``convnext_tiny``)."""
    timm_pretrained: bool = False
    """Load timm's pretrained weights for ``timm_model_name`` (downloads them; off by default)."""
    timm_pool: str = "avg"
    """timm tower pooling: a timm ``global_pool`` (``avg``, ``token``, ``map``, ...), ``''`` for the model's
    default, or ``abs_attn`` / ``rot_attn`` for an attention pool in the head (OpenCLIP's ``timm_pool``)."""
    timm_proj: Optional[str] = "linear"
    """timm tower projection to ``embed_dim``: ``linear``, ``mlp`` (hidden 2 * embed_dim), ``none`` (pooled
    trunk features as they are), or null for the trunk's own classifier head sized to ``embed_dim``."""
    timm_proj_bias: bool = False
    """Bias in the timm tower's (last) projection layer."""
    timm_drop: float = 0.0
    """Dropout in the timm tower's head (before the linear projection, inside the MLP)."""
    timm_drop_path: Optional[float] = None
    """Stochastic depth rate of the timm trunk; null keeps timm's default for the model."""


@dataclass
class TextConfig:
    """The causal text transformer, or a Hugging Face text model when ``hf_model_name`` is set."""

    context_length: int = 77
    """Tokens per caption, start and end tokens included."""
    vocab_size: int = 49408
    """Token vocabulary (CLIP's BPE: 49,408)."""
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    """Initial value of each block's layer scale; null: no layer scale."""
    no_causal_mask: bool = False
    """Let every token attend to every other (SigLIP) instead of only to earlier ones (CLIP)."""
    pool_type: str = "argmax"
    """Token whose feature becomes the text feature: ``argmax`` (highest id: CLIP's end-of-text), ``eos``
    (first ``eos_id``), ``first``, ``last``, or ``none`` (all tokens)."""
    eos_id: int = 2
    """End-of-sequence id that ``pool_type=eos`` looks for (the tokenizer's)."""
    pad_id: int = 0
    """Padding id: masked out as a key when ``embed_cls`` appends a class token (CoCa)."""
    embed_cls: bool = False
    """Append a learned class token (``cls_emb``) and pool there, normalised after pooling (CoCa)."""
    proj_type: str = "linear"
    """Text projection: ``linear`` (``text_projection``) or ``none`` (the pooled feature is the embedding)."""
    proj_bias: bool = False
    """Give the linear text projection a bias (stored as an ``nn.Linear``: ``text_projection.weight``/``.bias``)."""
    norm_eps: float = 1e-5
    """Epsilon of the text tower's LayerNorms."""
    act_approximate: str = "none"
    """GELU approximation: ``none`` (exact) or ``tanh``; ignored with ``quick_gelu``."""

    hf_model_name: Optional[str] = None
    """A Hugging Face text model (``xlm-roberta-base``, ``google/mt5-base``, ...) as text tower instead of
    CLIP's transformer. It names the architecture only: the tower is built from ``hf_config_dir`` (or the
    config saved with the checkpoint, or transformers' own defaults for that architecture); nothing downloads."""
    hf_proj_type: Optional[str] = "mlp"
    """HF text tower projection to ``embed_dim``: ``linear``, ``mlp`` (hidden (width + embed_dim) / 2, GELU)
    or ``none`` (the pooled features as they are; null does the same when the widths already agree)."""
    hf_pooler_type: str = "mean_pooler"
    """HF text tower pooling: ``mean_pooler`` (mean over non-padding tokens), ``max_pooler``, ``cls_pooler``
    (the model's pooler output when it has one, else the first token) or ``cls_last_hidden_state_pooler``."""
    hf_config_dir: Optional[str] = None
    """Local directory holding the HF model's ``config.json`` the text tower is built from."""
    hf_tokenizer_name: Optional[str] = None
    """The Hugging Face tokenizer the text tower was trained with (OpenCLIP's ``hf_tokenizer_name``, e.g.
    ``timm/ViT-B-16-SigLIP``): names it only; the files come from ``tokenizer=hf:PATH``. Null: CLIP's BPE,
    or the tokenizer of ``hf_model_name``."""
    tokenizer_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Options of that tokenizer (OpenCLIP's ``tokenizer_kwargs``: ``clean``, ``strip_sep_token``, ...)."""


@dataclass
class MultimodalConfig:
    """CoCa's multimodal text decoder (OpenCLIP's ``multimodal_cfg``; field names as in its JSON)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    dim_head: int = 64
    """Channels per head of the decoder's cross-attention."""
    n_queries: int = 256
    """Queries of the image attentional pooler that feeds the decoder."""
    attn_pooler_heads: int = 8
    norm_eps: float = 1e-5
    act_approximate: str = "none"


@dataclass
class ModelConfig:
    """A whole CLIP model: both towers, the shared embedding width and the activation."""

    name: str = "ViT-B-16"
    """Architecture name (``RN50``, ``ViT-B-16``, ``tiny``, ...); informative once the fields below are set."""
    embed_dim: int = 512
    """Width of the shared image-text embedding space."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    """Use QuickGELU (OpenAI's trained models) instead of exact GELU (OpenCLIP's own models)."""
    custom_text: bool = False
    """Keep the text tower in a ``text`` submodule (OpenCLIP's CustomTextCLIP keys: ``text.token_embedding...``)
    instead of at the model's top level (OpenAI's layout)."""
    init_logit_bias: Optional[float] = None
    """When set, the model has a learned ``logit_bias`` starting here (SigLIP: -10)."""
    multimodal: Optional[MultimodalConfig] = None
    """CoCa's multimodal decoder; null for a contrastive-only model."""
    image_mean: Optional[List[float]] = None
    """Per-channel mean (RGB, 0-1 scale) subtracted from images in training and evaluation. Null: OpenAI's
    (0.481, 0.458, 0.408). Names of OpenCLIP's zoo set their own (OpenCLIP's pretrained configs, e.g. 0.5 for
    SigLIP); with ``architecture_from_name`` a value given here wins over the name's."""
    image_std: Optional[List[float]] = None
    """Per-channel standard deviation images are divided by; null as for ``image_mean``."""
    image_interpolation: Optional[str] = None
    """Resampling of the evaluation resize: ``bicubic`` or ``bilinear``; null as for ``image_mean``
    (OpenAI's: bicubic). Training crops are always bicubic, as OpenCLIP's."""
    image_resize_mode: Optional[str] = None
    """Evaluation resize: ``shortest`` (shorter side to ``image_size``, then centre crop) or ``squash`` (the
    whole image to ``image_size`` x ``image_size``, no crop); null as for ``image_mean`` (OpenAI's: shortest)."""
    pretrained: Optional[str] = None
    """Local path to weights to start from: an OpenAI release, an OpenCLIP state dict or checkpoint."""
    force_image_size: Optional[int] = None
    """Build the image tower for this image size instead of the architecture's (OpenCLIP's
    ``--force-image-size``), e.g. to fine-tune at 384 pixels; a ViT's ``pretrained`` patch-grid positions are
    interpolated to it. Also works with ``architecture_from_name``, which otherwise fixes ``vision.image_size``."""
    force_context_length: Optional[int] = None
    """The same for the text tower's context length (tokens per caption); its positions are interpolated."""
    allow_nonfinite_weights: bool = False
    """Load ``pretrained`` weights (and resume checkpoints) even if some hold NaN or Inf; refused by default."""
    architecture_from_name: bool = False
    """Take every architecture field (both towers, embed_dim, activation, bias, decoder) from ``name``, any of
    ``python -m clip_train.models`` (``model=openclip model.name=ViT-H-14``); the training-time options below
    still come from this config."""

    # Training-time options below: none of them changes a parameter's name or shape, so weights move freely
    # between models that differ only here.
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them (less memory, ~30% more compute)."""
    patch_dropout: float = 0.0
    """ViT only (FLIP): fraction of patch tokens dropped at random in training (class token kept); 0 disables."""
    lock_image: bool = False
    """LiT: freeze the image tower (no gradient, no optimizer state; BatchNorm statistics frozen too)."""
    lock_image_unlocked_groups: int = 0
    """With ``lock_image``: leave this many of the tower's last layer groups trainable (see clip_train.models.lock)."""
    lock_text: bool = False
    """Freeze the text tower (token and positional embeddings, blocks, ``ln_final``, ``text_projection``)."""
    lock_text_unlocked_groups: int = 0
    """With ``lock_text``: leave this many of the text tower's last layer groups trainable."""

    def __post_init__(self) -> None:
        if self.architecture_from_name:
            from clip_train.models.registry import get_model_config  # the registry builds ModelConfigs itself

            named = get_model_config(self.name)
            named.force_image_size, named.force_context_length = self.force_image_size, self.force_context_length
            named._apply_forced_sizes()
            self._refuse_tower_settings_the_name_replaces(named)
            for f in ARCHITECTURE_FIELDS:
                setattr(self, f, getattr(named, f))
            for f in PREPROCESS_FIELDS:  # the name's preprocessing, unless the user set a field
                if getattr(self, f) is None:
                    setattr(self, f, getattr(named, f))
        else:
            self._apply_forced_sizes()
        self._check_preprocessing()

    def _apply_forced_sizes(self) -> None:
        for key, value in (("force_image_size", self.force_image_size),
                           ("force_context_length", self.force_context_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"model.{key}={value!r}: give a whole number of pixels or tokens, at least 1")
        if self.force_image_size is not None:
            self.vision.image_size = self.force_image_size
        if self.force_context_length is not None:
            self.text.context_length = self.force_context_length

    def _refuse_tower_settings_the_name_replaces(self, named: ModelConfig) -> None:
        """A ``vision.*``/``text.*`` value set by hand would be dropped for the name's: refuse it, in one line.

        A value counts as set when it differs from the schema's default and from the name's own (a stored
        config of such a model holds the name's values, and loads as before).
        """
        for tower, default in (("vision", VisionConfig()), ("text", TextConfig())):
            mine, theirs = getattr(self, tower), getattr(named, tower)
            for f in dataclasses.fields(mine):
                value = _plain(getattr(mine, f.name))
                if value != _plain(getattr(default, f.name)) and value != _plain(getattr(theirs, f.name)):
                    hint = {"image_size": "model.force_image_size", "context_length": "model.force_context_length"}
                    fix = f"use {hint[f.name]}={value}" if f.name in hint else "set the architecture without it"
                    raise ValueError(
                        f"model.{tower}.{f.name}={value} would be replaced by {self.name}'s own "
                        f"({_plain(getattr(theirs, f.name))}): model.architecture_from_name=true takes every "
                        f"tower setting from model.name; {fix}"
                    )

    def _check_preprocessing(self) -> None:
        """Refuse preprocessing values the data path cannot apply (one line naming the key)."""
        for key in ("image_mean", "image_std"):
            values = getattr(self, key)
            if values is not None and (len(values) != 3 or (key == "image_std" and min(values) <= 0)):
                raise ValueError(f"model.{key}={list(values)}: give three values (R, G, B){', each > 0' if key == 'image_std' else ''}")
        if self.image_interpolation not in (None, *IMAGE_INTERPOLATIONS):
            raise ValueError(f"model.image_interpolation={self.image_interpolation!r}: use one of {IMAGE_INTERPOLATIONS}")
        if self.image_resize_mode not in (None, *IMAGE_RESIZE_MODES):
            raise ValueError(f"model.image_resize_mode={self.image_resize_mode!r}: use one of {IMAGE_RESIZE_MODES}")

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """How images are prepared for this model, unset fields filled with OpenAI's values."""
        return ImagePreprocessing(
            mean=tuple(float(v) for v in (self.image_mean if self.image_mean is not None else OPENAI_IMAGE_MEAN)),
            std=tuple(float(v) for v in (self.image_std if self.image_std is not None else OPENAI_IMAGE_STD)),
            interpolation=self.image_interpolation or DEFAULT_IMAGE_INTERPOLATION,
            resize_mode=self.image_resize_mode or DEFAULT_IMAGE_RESIZE_MODE,
        )

    @property
    def is_vit(self) -> bool:
        return self.vision.timm_model_name is None and self.vision.patch_size is not None

    @property
    def is_resnet(self) -> bool:
        return self.vision.timm_model_name is None and self.vision.patch_size is None


ARCHITECTURE_FIELDS = ("embed_dim", "vision", "text", "quick_gelu", "custom_text", "init_logit_bias", "multimodal")
"""The ``ModelConfig`` fields that describe the network (the rest are its name, weights and training options)."""


def _plain(value: Any) -> Any:
    """Tuples as lists, so a value read back from YAML compares equal to the registry's."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
