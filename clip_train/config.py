"""The typed schema of ``python -m clip_train``: dataclasses registered with Hydra's ConfigStore.

Every YAML file under ``configs/`` is merged onto these dataclasses in struct mode, so a misspelt or
unknown key fails at start-up with Hydra's error naming it, and every value is type-checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from clip_train.data.config import RENAMED_OPTIONS, DataConfig, renamed_option_message
from clip_train.models.config import ModelConfig


@dataclass
class LossConfig:
    """The contrastive objective."""

    name: str = "clip"
    """``clip`` (symmetric InfoNCE, softmax), ``siglip`` (pairwise sigmoid) or ``coca`` (InfoNCE + captioning;
    needs a CoCa model)."""
    temperature: float = 0.07
    """Initial temperature; the model's ``logit_scale`` starts at ln(1 / temperature)."""
    learn_temperature: bool = True
    """Learn the temperature (``logit_scale``) with the model; false freezes it at its initial value."""
    implementation: str = "tiled"
    """``tiled``: blockwise, never holding the global B x B logits (memory O(B)); ``exact``: plain logits matrix."""
    tile_size: int = 4096
    """Rows/columns per tile of the tiled loss."""
    init_bias: float = -10.0
    """SigLIP only: initial ``logit_bias``."""
    caption_loss_weight: float = 2.0
    """CoCa only: weight of the captioning cross-entropy (OpenCLIP's ``--coca-caption-loss-weight``)."""
    clip_loss_weight: float = 1.0
    """CoCa only: weight of the contrastive term (OpenCLIP's ``--coca-contrastive-loss-weight``); 0 trains captioning only."""


LR_SCHEDULES = ("cosine", "const", "const-cooldown")
NO_DECAY_RULES = ("clip", "openclip")


@dataclass
class OptimConfig:
    """AdamW (or StableAdamW) with linear warmup, then a cosine decay or a constant LR (with a cooldown)."""

    name: str = "adamw"
    """``adamw`` or ``stable_adamw`` (AdamW with AdaFactor-style update clipping, Wortsman et al. 2023)."""
    lr: float = 5e-4
    """Peak learning rate, reached after ``warmup_steps``."""
    weight_decay: float = 0.2
    """Decoupled weight decay, applied to the tensors ``no_decay`` does not exempt."""
    no_decay: str = "clip"
    """Which tensors AdamW leaves undecayed: ``clip`` (every tensor under 2-D, i.e. gains and biases, plus the
    temperature and the embeddings of clip_train's own towers; a timm trunk's or Hugging Face text tower's
    embeddings are decayed) or ``openclip`` (OpenCLIP's rule: tensors under 2-D and those whose name contains
    ``bn``, ``ln``, ``bias`` or ``logit_scale``; all embeddings are decayed). Fixed for a run's life: a resume
    under another rule is refused."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 2000
    """Linear warmup from 0 to ``lr``."""
    schedule: str = "cosine"
    """The LR after the warmup (OpenCLIP's ``--lr-scheduler``): ``cosine`` decays to ``lr * min_lr_ratio`` at
    ``train.max_steps``; ``const`` stays at ``lr``; ``const-cooldown`` stays at ``lr`` until the last
    ``cooldown_steps`` steps, which decay it to ``lr * min_lr_ratio``. A constant run's checkpoint can be
    resumed with a cooldown (docs/reliability.md, "Branch a cooldown")."""
    min_lr_ratio: float = 0.0
    """Where the cosine or the cooldown ends, as a fraction of ``lr``."""
    cooldown_steps: int = 0
    """``const-cooldown``: the final steps of ``train.max_steps`` over which the LR decays (ignored otherwise)."""
    cooldown_power: float = 1.0
    """``const-cooldown``: the decay's shape, ``(1 - progress) ** power``: 1 linear, below 1 slower at first."""
    grad_clip_norm: Optional[float] = None
    """Clip the global gradient norm to this value; null disables clipping."""


@dataclass
class ProfileConfig:
    """torch.profiler traces of chosen steps, into ``RUN_DIR/profile/`` (one Chrome trace per rank)."""

    steps: Optional[List[int]] = None
    """``[START, END]``: profile steps START to END (inclusive, numbered as in ``metrics.jsonl``); null: none."""
    signal_steps: int = 5
    """Steps profiled from the next step on when a rank receives SIGURG (``kill -URG PID``); 0 ignores it."""
    memory_snapshot: bool = True
    """On CUDA, also record the allocator's history over the profiled steps and dump a memory snapshot
    (``*.pickle``, for https://pytorch.org/memory_viz)."""
    record_shapes: bool = False
    """Record input shapes of each operator (larger traces)."""
    with_stack: bool = False
    """Record Python stacks of each operator (much larger traces, more overhead)."""


@dataclass
class TrainLoopConfig:
    """The loop itself: length, precision, devices, seeds."""

    max_steps: int = 10_000
    """Optimizer steps to train for."""
    seed: int = 0
    """Base seed; each rank seeds itself with ``seed + rank``."""
    precision: str = "bf16"
    """``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + GradScaler; CUDA only)."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cuda`` or ``cpu``."""
    accum_steps: int = 1
    """Split each batch into this many sub-batches, caching features so the loss still sees the whole batch."""
    log_every_n_steps: int = 10
    """Write a ``metrics.jsonl`` line (and a console line) every N steps."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective (all-reduce, barrier, rendezvous) may wait for the other ranks before this rank
    fails: a rank that died or hung then ends the job instead of stalling it. Must cover the slowest
    thing one rank does while the others wait (rank 0 writing a checkpoint, a first compile)."""
    lock_stale_after_s: float = 600.0
    """The run directory's lock (``clip_train.lock``, held by rank 0) is taken over by a new trainer when its
    heartbeat is older than this (the holder died on another host). A dead holder on the same host, or the
    same SLURM job requeued, is taken over at once. See docs/reliability.md."""
    tf32: bool = True
    """Allow TF32 matmuls on GPUs that have them."""
    strategy: str = "ddp"
    """``ddp`` (each rank holds the whole model; gradients all-reduced) or ``fsdp`` (FSDP2: parameters,
    gradients and optimizer state sharded over ranks; for towers that do not fit with DDP). Needs torchrun."""
    compile: bool = False
    """torch.compile every transformer block / ResNet stage (first steps are slow while it compiles)."""
    channels_last: bool = False
    """ResNet and timm conv towers: NHWC memory format for the image tower (faster convolutions on tensor cores)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Profiler traces on demand (``train.profile.steps=[START,END]`` or SIGURG); see docs/observability.md."""


@dataclass
class CheckpointConfig:
    """When to save and where to resume from."""

    every_n_steps: int = 1000
    """Save every N steps; 0 saves only at the end."""
    keep_last: int = 3
    """Keep the newest N checkpoints (0 keeps all)."""
    keep_every_n_steps: int = 0
    """Also keep, beyond ``keep_last``, every checkpoint whose step is a multiple of this: the points to branch
    cooldowns or fine-tunes from later (a multiple of ``every_n_steps``; 0 keeps none extra)."""
    resume: str = "auto"
    """``auto``: newest complete checkpoint in the run dir, if any; ``none``: start fresh; or a checkpoint path.
    Another run's checkpoint starts a new run off it (a branch), used while this run dir has none of its own:
    a requeued branch continues from its own newest. An OpenCLIP training checkpoint (``epoch_N.pt``) continues
    that run at its epoch N (with ``openclip_steps_per_epoch`` and ``optim.no_decay=openclip``)."""
    openclip_steps_per_epoch: Optional[int] = None
    """Continuing an OpenCLIP run (``ckpt.resume=epoch_N.pt``): its optimizer steps per epoch, so that its
    epoch N resumes at step N x this on the same schedule; ``python -m clip_train.from_openclip`` writes it."""
    async_save: bool = False
    """Write checkpoints in the background: a step blocks only while the state is copied to host memory
    (pinned on CUDA); the write, fsync, manifest and ``latest`` follow in a thread, one save at a time.
    Holds one extra host copy of the state for the run's life."""


CKPT_ZERO_MEANS = {"every_n_steps": "save at the end only", "keep_last": "keep every checkpoint",
                   "keep_every_n_steps": "keep none beyond keep_last"}


@dataclass
class WandbConfig:
    """Weights & Biases, from rank 0 only. A key left null defers to the standard ``WANDB_*`` variable, so
    ``WANDB_MODE=offline`` (or ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_DIR``, ...) works as with any W&B
    script; a key set here overrides the environment."""

    mode: Optional[str] = None
    """``online``, ``offline`` (a local run under the run dir that ``wandb sync`` uploads) or ``disabled``;
    null: ``WANDB_MODE``, else ``default_mode``."""
    default_mode: str = "disabled"
    """The mode when neither ``mode`` nor ``WANDB_MODE`` sets one: ``disabled`` (logger=default) or ``online``
    (logger=wandb)."""
    project: Optional[str] = None
    """null: ``WANDB_PROJECT``, else ``clip_train``."""
    entity: Optional[str] = None
    """null: ``WANDB_ENTITY``, else the account's default entity."""
    name: Optional[str] = None
    """Run name; null: ``WANDB_NAME``, else the run directory's name."""
    group: Optional[str] = None
    """null: ``WANDB_RUN_GROUP``."""
    tags: Optional[List[str]] = None
    """null: ``WANDB_TAGS`` (comma-separated)."""
    dir: Optional[str] = None
    """Where W&B writes its ``wandb/`` folder; null: ``WANDB_DIR``, else the run directory. A resumed run
    continues the W&B run id stored in its checkpoint; a fresh one takes ``WANDB_RUN_ID`` when set."""


@dataclass
class TensorboardConfig:
    """TensorBoard event files from rank 0, under ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR``)."""

    enabled: bool = False
    """Write every ``metrics.jsonl`` value as a TensorBoard scalar too."""


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    console_every_n_steps: Optional[int] = None
    """Console progress line every N steps; defaults to ``train.log_every_n_steps``."""


@dataclass
class ZeroShotSetConfig:
    """One zero-shot classification set."""

    name: str = "zeroshot"
    data: str = "???"
    """An ImageFolder directory, or shards (brace pattern, or a folder of .tar) whose samples carry a class index."""
    classnames: str = "???"
    """A file with one class name per line: line i names class i of shards; an ImageFolder's folders are
    matched to the names by name (or by sorted position when no folder is a name; folders 0..N-1 by number);
    a mismatch is refused. ``imagenet``: the built-in ImageNet-1k names (OpenAI's, for ImageNet's val folders
    and ImageNet-V2's)."""
    templates: str = "openai"
    """``openai`` (80 ImageNet templates), ``simple`` (a few), or a file with one template per line using {}
    or {c} (CLIP_benchmark's files)."""
    class_key: str = "cls"
    """Shards only: the sample field holding the class index."""
    batch_size: int = 256
    max_samples: Optional[int] = None
    """Evaluate on at most this many samples (all by default)."""


@dataclass
class RetrievalSetConfig:
    """One image-text retrieval set (recall@1/5/10 both ways, as ``python -m clip_train.eval retrieval``)."""

    name: str = "retrieval"
    data: str = "???"
    """Image-caption shards; each text field holds one caption per line (or a JSON list). ``demo``: the digits."""
    text_key: str = "txt"
    batch_size: int = 256


@dataclass
class EvalConfig:
    every_n_steps: int = 0
    """Run the evaluation sets every N steps (0: only at the end of training)."""
    zeroshot: List[ZeroShotSetConfig] = field(default_factory=list)
    retrieval: List[RetrievalSetConfig] = field(default_factory=list)
    """Logged as ``retrieval_image_to_text_recall@1`` etc. (``retrieval_<name>_...`` for other names)."""


@dataclass
class TrainConfig:
    """Everything ``python -m clip_train`` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tokenizer: Optional[str] = None
    """null: CLIP's BPE (models whose text tower needs another tokenizer refuse to start); ``hf:PATH``: a
    local Hugging Face / SentencePiece tokenizer directory (SigLIP, XLM-RoBERTa, mT5, NLLB, ...)."""


def register_configs() -> None:
    """Register the schema so ``configs/train.yaml`` can start its defaults list with ``train_schema``."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)


class ConfigError(ValueError):
    """A configuration that cannot work, found before any expensive work starts."""


# Keys that were renamed (full dotted names). Hydra would only say the old one is "not in struct"; these get
# one line naming the new key instead.
RENAMED_KEYS = {f"data.{old}": renamed_option_message(old) for old in RENAMED_OPTIONS}


def override_key(override: str) -> str:
    """The dotted key an override sets: ``+data.x=1``, ``++data.x=1``, ``~data.x`` and ``data.x=1`` -> ``data.x``."""
    return override.lstrip("~+").split("=", 1)[0].strip()


def renamed_key_error(overrides: list[str]) -> str | None:
    """The one-line refusal for the first override that sets a renamed key, or None."""
    for override in overrides:
        message = RENAMED_KEYS.get(override_key(override))
        if message is not None:
            return message
    return None


def did_you_mean(key: str, names: set[str], prefix: str = "") -> str:
    """`` (did you mean PREFIX+NAME?)`` for the one of ``names`` spelt most like ``key``; ``""`` when none is, or
    when ``key`` is one of them (the error is then about its value, not its spelling)."""
    close = [] if key in names else difflib.get_close_matches(key, sorted(names), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def unknown_keys(node: object, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that its typed schema does not have.

    Hydra's ``+key=value`` adds a key even to a struct-mode config, and converting to the dataclasses then
    drops it without a word: ``+data.shuffle_bufer=4`` would train with the default buffer. Nodes whose schema
    is a plain dict (free-form options) are not looked into; the top-level ``hydra`` node is Hydra's own.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return []
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    names = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in node:
        if not prefix and key == "hydra":
            continue
        if key not in names:
            found.append(f"{prefix}{key}{did_you_mean(str(key), names, prefix)}")
        else:
            found += unknown_keys(node._get_node(key), f"{prefix}{key}.")
    return found


def check_known_keys(cfg: object) -> None:
    """``ConfigError`` naming the first key the schema does not have (see ``unknown_keys``)."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a clip_train option: remove it, or fix its name (every key is in "
                          "clip_train/config.py; python -m clip_train --cfg job prints the composed config)")


def renamed_key_in(err: BaseException) -> str | None:
    """The one-line refusal when a composition error (or one of its causes) is about a renamed key, e.g. one
    set in a YAML file, else None."""
    seen: BaseException | None = err
    while seen is not None:
        message = RENAMED_KEYS.get(str(getattr(seen, "full_key", "") or ""))  # OmegaConf's errors name the key
        if message is not None:
            return message
        seen = seen.__cause__ or seen.__context__
    return None


def close_key_hint(err: BaseException) -> str:
    """`` (did you mean optim.cooldown_steps?)`` when a composition error (or one of its causes) is about a key
    its dataclass does not have and one of its fields is spelt alike, else ``""``."""
    seen: BaseException | None = err
    while seen is not None:
        schema, key, full_key = (getattr(seen, name, None) for name in ("object_type", "key", "full_key"))
        if dataclasses.is_dataclass(schema) and key is not None and full_key:
            prefix = str(full_key)[: -len(str(key))] if str(full_key).endswith(str(key)) else ""
            return did_you_mean(str(key), {f.name for f in dataclasses.fields(schema)}, prefix)
        seen = seen.__cause__ or seen.__context__
    return ""


# OpenCLIP's --precision names, as users bring them: what they are called here.
OPENCLIP_PRECISIONS = {
    name: f" (OpenCLIP's {name} is train.precision={ours} here: autocast with fp32 weights)"
    for name, ours in (("amp", "fp16"), ("amp_bf16", "bf16"), ("amp_bfloat16", "bf16"))
} | {
    name: f" (OpenCLIP's {name} casts the weights; clip_train keeps fp32 weights: the closest is "
          f"train.precision={'bf16' if 'bf' in name else 'fp16'})"
    for name in ("pure_bf16", "pure_fp16")
}


def validate(cfg: TrainConfig, world_size: int, device_type: str) -> None:
    """Reject combinations the schema's types cannot express, each in one line that says how to fix it."""
    choices = {
        "train.precision": (cfg.train.precision, ("fp32", "bf16", "fp16")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "loss.name": (cfg.loss.name, ("clip", "siglip", "coca")),
        "loss.implementation": (cfg.loss.implementation, ("tiled", "exact")),
        "optim.name": (cfg.optim.name, ("adamw", "stable_adamw")),
        "optim.no_decay": (cfg.optim.no_decay, NO_DECAY_RULES),
        "logger.wandb.mode": (cfg.logger.wandb.mode, (None, "online", "offline", "disabled")),
        "logger.wandb.default_mode": (cfg.logger.wandb.default_mode, ("online", "offline", "disabled")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            names = ", ".join("null" if choice is None else choice for choice in allowed)
            hint = OPENCLIP_PRECISIONS.get(value, "") if key == "train.precision" else ""
            raise ConfigError(f"{key}={value!r} is not one of {names}{hint}")
    if cfg.train.precision == "fp16" and device_type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (it relies on GradScaler); on CPU use bf16 or fp32")
    if cfg.train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be at least 1, got {cfg.train.max_steps}")
    if cfg.train.accum_steps < 1 or cfg.data.batch_size % cfg.train.accum_steps != 0:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be a multiple of train.accum_steps={cfg.train.accum_steps}"
        )
    validate_coca(cfg)
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size is per rank and must be at least 1, got {cfg.data.batch_size}")
    if cfg.data.batch_size * world_size < 2:
        raise ConfigError("a contrastive loss needs at least 2 samples in the global batch; raise data.batch_size")
    global_batch = cfg.data.batch_size * world_size
    if cfg.data.order_streams >= 1 and global_batch % cfg.data.order_streams:
        raise ConfigError(f"data.order_streams={cfg.data.order_streams} must divide the global batch of "
                          f"{global_batch} samples ({world_size} ranks x data.batch_size={cfg.data.batch_size})")
    if not cfg.train.collective_timeout_s > 0:
        raise ConfigError(f"train.collective_timeout_s must be > 0 seconds, got {cfg.train.collective_timeout_s}")
    for key in ("every_n_steps", "keep_last", "keep_every_n_steps"):
        if getattr(cfg.ckpt, key) < 0:
            raise ConfigError(f"ckpt.{key} must be >= 0 (0: {CKPT_ZERO_MEANS[key]}), got {getattr(cfg.ckpt, key)}")
    every, keep_every = cfg.ckpt.every_n_steps, cfg.ckpt.keep_every_n_steps
    if keep_every and every and keep_every % every:
        raise ConfigError(f"ckpt.keep_every_n_steps={keep_every} must be a multiple of ckpt.every_n_steps={every}: "
                          "only those steps are saved")
    validate_values(cfg)
    validate_profile(cfg.train.profile, cfg.train.max_steps)
    validate_tokenizer(cfg)
    validate_scaling_options(cfg, world_size)


def _positive(key: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a positive number, got {value}")


def _check_schedule(optim: OptimConfig, max_steps: int) -> None:
    if optim.schedule not in LR_SCHEDULES:
        raise ConfigError(f"optim.schedule={optim.schedule!r} is not a schedule: use one of {', '.join(LR_SCHEDULES)}")
    if optim.cooldown_steps < 0:
        raise ConfigError(f"optim.cooldown_steps must be >= 0, got {optim.cooldown_steps}")
    _positive("optim.cooldown_power", optim.cooldown_power)
    if optim.schedule != "const-cooldown":
        return
    after_warmup = max_steps - min(optim.warmup_steps, max_steps)
    if not 1 <= optim.cooldown_steps <= after_warmup:
        raise ConfigError(
            f"optim.schedule=const-cooldown needs optim.cooldown_steps between 1 and {after_warmup} (the steps "
            f"after the warmup: train.max_steps={max_steps} - optim.warmup_steps={optim.warmup_steps}), got "
            f"{optim.cooldown_steps}"
        )


def validate_values(cfg: TrainConfig) -> None:
    """Intervals, the temperature, optimizer settings, worker counts and paths: each refused in one line
    before any work starts (instead of a ZeroDivisionError or IndexError deep in the run)."""
    for key, value in (("train.log_every_n_steps", cfg.train.log_every_n_steps),
                       ("logger.console_every_n_steps", cfg.logger.console_every_n_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be at least 1 (log every N steps), got {value}")
    if cfg.eval.every_n_steps < 0:
        raise ConfigError(f"eval.every_n_steps must be >= 0 (0: only at the end), got {cfg.eval.every_n_steps}")
    _positive("loss.temperature", cfg.loss.temperature)
    _positive("train.lock_stale_after_s", cfg.train.lock_stale_after_s)
    if cfg.train.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps must be at least 1, got {cfg.train.max_bad_steps}")
    optim = cfg.optim
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9,0.98]; got {list(optim.betas)}")
    if not optim.lr >= 0:  # NaN fails this too; an infinite lr is left to the non-finite step guard
        raise ConfigError(f"optim.lr must be a number >= 0, got {optim.lr}")
    _positive("optim.eps", optim.eps)
    _positive("optim.grad_clip_norm", optim.grad_clip_norm, allow_none=True)
    if optim.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    if optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio is a fraction of optim.lr in [0, 1], got {optim.min_lr_ratio}")
    _check_schedule(optim, cfg.train.max_steps)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0 (0 reads in the training process), got {cfg.data.num_workers}")
    if cfg.data.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer must be >= 0 (0 disables shuffling), got {cfg.data.shuffle_buffer}")
    if cfg.data.shuffle_shards < 1:
        raise ConfigError(f"data.shuffle_shards must be >= 1 (shards interleaved into one block of the global "
                          f"order; 1 reads one shard at a time), got {cfg.data.shuffle_shards}")
    if cfg.data.order_streams < 1:
        raise ConfigError(f"data.order_streams must be >= 1 (parallel streams of the global order), got "
                          f"{cfg.data.order_streams}")
    if cfg.data.num_workers > 0 and cfg.data.prefetch_factor < 1:
        raise ConfigError(f"data.prefetch_factor must be at least 1, got {cfg.data.prefetch_factor}")
    pretrained = cfg.model.pretrained
    if pretrained:
        from clip_train.checkpoint_paths import weights_not_found, weights_path

        if not weights_path(pretrained).exists():
            raise ConfigError(f"model.pretrained={pretrained}: {weights_not_found(str(pretrained))}")
    resume = cfg.ckpt.resume
    if resume not in ("auto", "none") and not Path(resume).expanduser().exists():
        raise ConfigError(f"ckpt.resume={resume} does not exist; give a step directory, its state.pt, a checkpoints/ "
                          "directory or a run directory, an OpenCLIP epoch_N.pt, or ckpt.resume=auto (newest in "
                          "the run dir) or none")
    from clip_train.train.openclip_run import continuation_problem

    problem = continuation_problem(cfg)  # None unless ckpt.resume names an OpenCLIP epoch_N.pt
    if problem:
        raise ConfigError(problem)


def validate_profile(profile: ProfileConfig, max_steps: int) -> None:
    """``train.profile.steps`` is ``[START, END]`` with 1 <= START <= END <= max_steps."""
    steps = profile.steps
    if steps is not None and (len(steps) != 2 or not 1 <= steps[0] <= steps[1] <= max_steps):
        raise ConfigError(
            f"train.profile.steps={list(steps)} must be [START,END] with 1 <= START <= END <= train.max_steps "
            f"({max_steps}), e.g. train.profile.steps=[10,12]"
        )
    if profile.signal_steps < 0:
        raise ConfigError(f"train.profile.signal_steps must be >= 0 (0 ignores SIGURG), got {profile.signal_steps}")


def validate_coca(cfg: TrainConfig) -> None:
    """``loss=coca`` and a CoCa model (one with ``model.multimodal``) go together."""
    is_coca = cfg.model.multimodal is not None
    if cfg.loss.name == "coca" and not is_coca:
        raise ConfigError(
            f"loss=coca trains a captioning decoder but model {cfg.model.name} has none (model.multimodal is null); "
            "pick a CoCa model (model=coca_tiny, or model=openclip model.name=coca_ViT-B-32) or loss=clip"
        )
    if is_coca and cfg.loss.name != "coca":
        raise ConfigError(
            f"model {cfg.model.name} is a CoCa model; train it with loss=coca "
            "(loss.caption_loss_weight=0 leaves only the contrastive term)"
        )
    if is_coca and cfg.train.accum_steps != 1:
        raise ConfigError(
            f"train.accum_steps={cfg.train.accum_steps}: gradient accumulation is not supported with loss=coca yet "
            "(its captioning term is per sub-batch); use train.accum_steps=1"
        )


def validate_tokenizer(cfg: TrainConfig) -> None:
    """``tokenizer`` is unset or ``hf:PATH`` of an existing path, and set where the model needs an HF tokenizer."""
    from clip_train.tokenizer import HF_PREFIX, missing_tokenizer_message, model_tokenizer_need

    if cfg.tokenizer is None:
        needed = model_tokenizer_need(cfg.model)
        if needed:
            raise ConfigError(missing_tokenizer_message(cfg.model.name, needed))
        return
    if not cfg.tokenizer.startswith(HF_PREFIX):
        raise ConfigError(f"tokenizer={cfg.tokenizer!r}: use tokenizer=hf:PATH (a local Hugging Face tokenizer directory)")
    if not Path(cfg.tokenizer[len(HF_PREFIX) :]).expanduser().exists():
        raise ConfigError(f"tokenizer={cfg.tokenizer}: no such file or directory")


def validate_scaling_options(cfg: TrainConfig, world_size: int) -> None:
    """The memory and speed options (strategy, patch dropout, locking, channels_last), each error in one line."""
    if cfg.train.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"train.strategy={cfg.train.strategy!r} is not one of ddp, fsdp")
    if cfg.train.strategy == "fsdp":
        from clip_train.train.torch_compat import fsdp_unsupported_reason  # loads FSDP: only for fsdp runs

        reason = fsdp_unsupported_reason()
        if reason:
            raise ConfigError(reason)
        if world_size < 2:
            raise ConfigError(
                "train.strategy=fsdp shards the model over ranks and this run has one process; "
                "launch with torchrun --nproc_per_node=N (N >= 2) or use train.strategy=ddp"
            )
    model = cfg.model
    if not 0.0 <= model.patch_dropout < 1.0:
        raise ConfigError(f"model.patch_dropout is the fraction of patches dropped, in [0, 1); got {model.patch_dropout}")
    if model.patch_dropout > 0 and not model.is_vit:
        raise ConfigError(
            f"model.patch_dropout drops ViT patch tokens but model {model.name} has no CLIP ViT image tower; set it to 0"
        )
    for tower in ("image", "text"):
        locked, unlocked = getattr(model, f"lock_{tower}"), getattr(model, f"lock_{tower}_unlocked_groups")
        if unlocked < 0:
            raise ConfigError(f"model.lock_{tower}_unlocked_groups must be >= 0, got {unlocked}")
        if unlocked and not locked:
            raise ConfigError(
                f"model.lock_{tower}_unlocked_groups={unlocked} has no effect without model.lock_{tower}=true"
            )
    if cfg.train.channels_last and model.is_vit:
        raise ConfigError(
            f"train.channels_last speeds up convolutional image towers; model {model.name} is a ViT (one patch "
            "conv), so leave it off"
        )
