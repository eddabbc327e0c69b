"""Translate an OpenCLIP training command into the clip_train command that trains the same run.

    python -m clip_train.from_openclip torchrun --nproc_per_node 8 -m open_clip_train.main \\
        --model ViT-B-32 --train-data '/data/laion/{00000..41407}.tar' --train-num-samples 400000000 \\
        --batch-size 256 --epochs 32 --warmup 2000 --lr 5e-4 --wd 0.2 --precision amp_bf16 --workers 8

prints ``torchrun --nproc_per_node 8 -m clip_train model=openclip model.name=ViT-B-32 ...`` on stdout: every
setting that shapes the run is written out, OpenCLIP's defaults included (its ``--precision amp``, its
model-dependent betas, its epoch-mode reading when ``--dataset-resampled`` is absent), and OpenCLIP's epochs
become the steps its scheduler counts: ``(batches per epoch // accum_freq) * epochs``, batches per epoch
rounded up to whole global batches and to a multiple of ``--workers``, as OpenCLIP rounds them. That count
depends on the world size, read from ``torchrun``'s ``--nnodes`` x ``--nproc_per_node`` or given as
``--world-size N`` (before the command). Flags that change nothing here, or whose meaning differs, get one
line each on stderr; flags clip_train cannot honour stop the translation with one line naming them all.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from clip_train.cli_help import DefaultsHelpFormatter

# How OpenCLIP is started: the token naming its entry point; what precedes it is the launcher.
_ENTRY_MODULES = ("open_clip_train.main", "training.main")
_ENTRY_SCRIPTS = ("open_clip_train/main.py", "training/main.py")

# OpenCLIP's --precision -> train.precision. OpenCLIP's bf16/fp16/pure_* cast the weights themselves; clip_train
# always keeps fp32 weights under autocast, so those have no equivalent.
_PRECISIONS = {"amp": "fp16", "amp_bf16": "bf16", "amp_bfloat16": "bf16", "fp32": "fp32"}

# Flags that change nothing about the trained model here, and why.
_NO_EFFECT = {
    "cache_dir": "weights are read from local paths (model.pretrained)",
    "log_local": "every rank logs to the console; rank 0 writes metrics.jsonl",
    "dist_url": "torchrun's rendezvous sets up the process group",
    "dist_backend": "NCCL on CUDA, gloo on CPU",
    "debug": "use hydra.verbose=true for debug logging",
    "copy_codebase": "the run dir keeps the resolved config (.hydra/config.yaml)",
    "ddp_static_graph": "not needed",
    "no_set_device_rank": "each rank uses cuda:LOCAL_RANK",
    "save_most_recent": "RUN_DIR/checkpoints/latest always points at the newest checkpoint",
    "local_loss": "the loss is always the exact global-batch loss, tiled in O(batch) memory",
    "gather_with_grad": "gradients always flow through the gathered features: the exact gradient",
    "loss_dist_impl": "the tiled loss gathers features once per step",
    "torchscript": "python -m clip_train.export writes the exported model",
    "force_custom_text": "both text-tower key layouts load",
    "wandb_notes": "W&B notes are not a clip_train key; add them in the W&B UI",
    "lock_image_freeze_bn_stats": "a locked image tower's BatchNorm statistics are always frozen",
    "lock_text_freeze_layer_norm": "a locked text tower's LayerNorms are always frozen",
    "remote_sync": "checkpoints stay in the run dir; sync it with your own tool (aws s3 sync, rclone)",
    "remote_sync_frequency": "see --remote-sync",
    "remote_sync_protocol": "see --remote-sync",
    "csv_separator": "only with --dataset-type csv",
    "csv_img_key": "only with --dataset-type csv",
    "csv_caption_key": "only with --dataset-type csv",
    "val_num_samples": "the retrieval set is read to its end",
}

# Flags with no clip_train equivalent: the translation stops, naming them.
_UNSUPPORTED = {
    "distill_model": "distillation is not supported",
    "distill_pretrained": "distillation is not supported",
    "horovod": "launch with torchrun instead",
    "use_bnb_linear": "bitsandbytes linear layers are not supported",
    "trace": "tracing the model is not supported",
    "use_bn_sync": "SyncBatchNorm is not supported",
    "pretrained_image": "timm's pretrained image weights are downloaded; pass a local file as model.pretrained",
}

# OpenCLIP's flags and defaults (open_clip_train/params.py), as (flag, kind, default).
_FLAGS: tuple[tuple[str, str, object], ...] = (
    ("--train-data", "str", None), ("--train-data-upsampling-factors", "str", None), ("--val-data", "str", None),
    ("--train-num-samples", "int", None), ("--val-num-samples", "int", None), ("--dataset-type", "str", "auto"),
    ("--dataset-resampled", "flag", False), ("--csv-separator", "str", "\t"), ("--csv-img-key", "str", "filepath"),
    ("--csv-caption-key", "str", "title"), ("--imagenet-val", "str", None), ("--imagenet-v2", "str", None),
    ("--cache-dir", "str", None), ("--logs", "str", "./logs/"), ("--log-local", "flag", False),
    ("--name", "str", None), ("--workers", "int", 4), ("--batch-size", "int", 64), ("--epochs", "int", 32),
    ("--epochs-cooldown", "int", None), ("--lr", "float", None), ("--beta1", "float", None),
    ("--beta2", "float", None), ("--eps", "float", None), ("--wd", "float", 0.2), ("--momentum", "float", None),
    ("--warmup", "int", 10000), ("--opt", "str", "adamw"), ("--use-bn-sync", "flag", False),
    ("--skip-scheduler", "flag", False), ("--lr-scheduler", "str", "cosine"), ("--lr-cooldown-end", "float", 0.0),
    ("--lr-cooldown-power", "float", 1.0), ("--save-frequency", "int", 1), ("--save-most-recent", "flag", False),
    ("--zeroshot-frequency", "int", 2), ("--val-frequency", "int", 1), ("--resume", "str", None),
    ("--precision", "str", "amp"), ("--model", "str", "RN50"), ("--pretrained", "str", ""),
    ("--pretrained-image", "flag", False), ("--lock-image", "flag", False),
    ("--lock-image-unlocked-groups", "int", 0), ("--lock-image-freeze-bn-stats", "flag", False),
    ("--image-mean", "floats", None), ("--image-std", "floats", None), ("--image-interpolation", "str", None),
    ("--image-resize-mode", "str", None), ("--aug-cfg", "kv", None), ("--grad-checkpointing", "flag", False),
    ("--local-loss", "flag", False), ("--gather-with-grad", "flag", False), ("--force-context-length", "int", None),
    ("--force-image-size", "ints", None), ("--force-quick-gelu", "flag", False),
    ("--force-patch-dropout", "float", None), ("--force-custom-text", "flag", False),
    ("--torchscript", "flag", False), ("--torchcompile", "flag", False), ("--trace", "flag", False),
    ("--accum-freq", "int", 1), ("--device", "str", "cuda"), ("--dist-url", "str", None),
    ("--dist-backend", "str", None), ("--report-to", "str", ""), ("--wandb-notes", "str", ""),
    ("--wandb-project-name", "str", "open-clip"), ("--debug", "flag", False), ("--copy-codebase", "flag", False),
    ("--horovod", "flag", False), ("--ddp-static-graph", "flag", False), ("--no-set-device-rank", "flag", False),
    ("--seed", "int", 0), ("--grad-clip-norm", "float", None), ("--lock-text", "flag", False),
    ("--lock-text-unlocked-layers", "int", 0), ("--lock-text-freeze-layer-norm", "flag", False),
    ("--log-every-n-steps", "int", 100), ("--coca-caption-loss-weight", "float", 2.0),
    ("--coca-contrastive-loss-weight", "float", 1.0), ("--remote-sync", "str", None),
    ("--remote-sync-frequency", "int", 300), ("--remote-sync-protocol", "str", "s3"),
    ("--delete-previous-checkpoint", "flag", False), ("--distill-model", "str", None),
    ("--distill-pretrained", "str", None), ("--use-bnb-linear", "str", None), ("--siglip", "flag", False),
    ("--loss-dist-impl", "str", None),
)


class TranslationError(ValueError):
    """An OpenCLIP command that cannot be translated; the message is one line saying why and what to do."""


@dataclass
class Translation:
    """The clip_train command: ``launcher + ["-m", "clip_train"] + overrides``, and the notes for stderr."""

    launcher: list[str]
    overrides: list[str]
    world_size: int
    steps_per_epoch: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return [*self.launcher, "-m", "clip_train", *self.overrides]

    @property
    def command(self) -> str:
        return " ".join(_shell_quote(token) for token in self.argv)


def _shell_quote(token: str) -> str:
    """``shlex.quote``, but an override holding Hydra's single quotes is double-quoted when that is safe, as
    the docs write them: ``"data.train_shards='/data/{00000..41407}.tar'"``."""
    if "'" in token and not any(c in token for c in '"$`\\!'):
        return f'"{token}"'
    return shlex.quote(token)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise TranslationError(f"not an OpenCLIP command line: {message}")


def _openclip_parser() -> argparse.ArgumentParser:
    parser = _Parser(add_help=False)
    for flag, kind, default in _FLAGS:
        if kind == "flag":
            parser.add_argument(flag, action="store_true", default=default)
        elif kind in ("floats", "ints"):
            parser.add_argument(flag, nargs="+", type=float if kind == "floats" else int, default=default)
        elif kind == "kv":
            parser.add_argument(flag, nargs="*", default=default)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], default=default)
    return parser


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(launcher, OpenCLIP flags)``: the tokens before OpenCLIP's entry point (``-m open_clip_train.main``,
    ``.../open_clip_train/main.py``) and after it. A command of flags alone has an empty launcher."""
    for i, token in enumerate(argv):
        if token in _ENTRY_MODULES or token.replace("\\", "/").endswith(_ENTRY_SCRIPTS):
            launcher = list(argv[:i])
            if launcher and launcher[-1] == "-m":
                launcher.pop()
            return launcher, list(argv[i + 1:])
    if argv and not argv[0].startswith("-"):
        raise TranslationError(f"no OpenCLIP entry point in the command (expected -m open_clip_train.main or "
                               f"a path ending in open_clip_train/main.py after {argv[0]!r})")
    return [], list(argv)


def _launcher_option(launcher: list[str], names: tuple[str, ...]) -> str | None:
    for i, token in enumerate(launcher):
        for name in names:
            if token == name and i + 1 < len(launcher):
                return launcher[i + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


def launcher_world_size(launcher: list[str]) -> int | None:
    """``--nnodes x --nproc_per_node`` of a torchrun launcher (1 for plain python); None when unknown."""
    if not launcher:
        return 1
    program = os.path.basename(launcher[0])
    is_torchrun = program == "torchrun" or "torch.distributed.run" in launcher or "torch.distributed.launch" in launcher
    if not is_torchrun:
        return 1 if program.startswith("python") else None
    nproc = _launcher_option(launcher, ("--nproc_per_node", "--nproc-per-node")) or "1"
    nnodes = _launcher_option(launcher, ("--nnodes",)) or "1"
    if not (nproc.isdigit() and nnodes.isdigit()):
        return None
    return int(nproc) * int(nnodes)


def openclip_batches_per_epoch(num_samples: int, batch_size: int, world_size: int, workers: int) -> int:
    """Batches OpenCLIP's WebDataset loader gives each rank per epoch: whole global batches, rounded up to a
    multiple of the loader workers (it repeats a few samples rather than drop any)."""
    workers = max(1, workers)
    batches = math.ceil(num_samples / (batch_size * world_size))
    return math.ceil(batches / workers) * workers


def newest_openclip_checkpoint(folder: str | os.PathLike) -> str | None:
    """An OpenCLIP run's ``epoch_latest.pt``, else its highest ``epoch_N.pt``, in ``folder`` or its
    ``checkpoints/`` (what OpenCLIP's ``--resume latest`` picks); None if there is none."""
    found = {name[len("epoch_"):-len(".pt")]: os.path.join(where, name)
             for where in (folder, os.path.join(folder, "checkpoints")) if os.path.isdir(where)
             for name in os.listdir(where) if name.startswith("epoch_") and name.endswith(".pt")}
    if "latest" in found:
        return found["latest"]
    numbered = [epoch for epoch in found if epoch.isdigit()]
    return found[max(numbered, key=int)] if numbered else None


def _hydra_str(value: str) -> str:
    """A Hydra override value quoted so braces, commas and ``=`` in it stay part of the string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _hydra_list(values: Sequence[float]) -> str:
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


def _dataset_size(patterns: list[str]) -> int | None:
    """Samples in the shards, from the counts next to them (shards.json, OpenCLIP's sizes.json or __len__,
    img2dataset stats): what OpenCLIP reads when ``--train-num-samples`` is absent."""
    import braceexpand

    from clip_train.data.manifest import openclip_total, sample_counts

    urls = [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]
    try:
        counts = sample_counts(urls)
        return sum(counts) if counts is not None else openclip_total(urls)
    except OSError:
        return None  # shards not reachable from here: the user gives --train-num-samples
    except ValueError as exn:  # a sizes.json / __len__ that is there but broken: say so, not "missing"
        raise TranslationError(str(exn)) from None


def _model_name(name: str, quick_gelu: bool) -> tuple[str, object]:
    """``name`` (with ``-quickgelu`` for ``--force-quick-gelu``) and its ModelConfig, refused in one line unless
    clip_train builds it."""
    from clip_train.config import did_you_mean
    from clip_train.models.registry import get_model_config, list_models

    def build(candidate: str, flag: str) -> object:
        try:
            return get_model_config(candidate)
        except ValueError as exn:
            hint = did_you_mean(candidate, set(list_models()))
            raise TranslationError(f"{flag} {candidate}: {exn}{hint}") from None

    model_cfg = build(name, "--model")
    if quick_gelu and not name.endswith("-quickgelu"):
        name = f"{name}-quickgelu"
        model_cfg = build(name, "--force-quick-gelu: --model")
    return name, model_cfg


def _augmentation(items: Sequence[str]) -> dict[str, object]:
    """``--aug-cfg KEY=VALUE ...`` as OpenCLIP reads it: each value a Python literal, else the string."""
    parsed: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise TranslationError(f"--aug-cfg {item}: expected KEY=VALUE, e.g. scale='(0.4, 1.0)'")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value
    for key in ("scale", "ratio"):
        value = parsed.get(key)
        if key in parsed and not (isinstance(value, (tuple, list)) and len(value) == 2
                                  and all(isinstance(v, (int, float)) for v in value)):
            raise TranslationError(f"--aug-cfg {key}={value!r}: expected two numbers, e.g. {key}='(0.4, 1.0)'")
    return parsed


def _is_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pt", ".bin", ".safetensors", ".pth"))


def translate(argv: Sequence[str], world_size: int | None = None, imagenet_classnames: str = "imagenet",
              tokenizer: str | None = None) -> Translation:
    """The clip_train command for the OpenCLIP command ``argv`` (launcher included, or its flags alone).

    ``world_size`` overrides what the launcher says (needed for ``srun`` and other launchers).
    ``imagenet_classnames``: the class names for ``--imagenet-val`` / ``--imagenet-v2`` (default: the built-in
    ImageNet names, OpenAI's, which OpenCLIP uses too). ``tokenizer``: a local directory holding the Hugging
    Face tokenizer a model needs (SigLIP, XLM-RoBERTa, ...), which OpenCLIP downloads by itself.
    """
    launcher, flags = split_command(argv)
    given = {token.split("=", 1)[0] for token in flags if token.startswith("--")}
    args = _openclip_parser().parse_args(flags)
    world = world_size if world_size is not None else launcher_world_size(launcher)
    if world is None:
        raise TranslationError(f"cannot tell the world size from {shlex.join(launcher)!r}: pass --world-size N "
                               "(the number of GPUs of the job) before the command")
    if world < 1:
        raise TranslationError(f"--world-size must be >= 1, got {world}")
    if not launcher:
        launcher = ["python"] if world == 1 else ["torchrun", f"--nproc_per_node={world}"]
    notes: list[str] = []

    def given_flag(dest: str) -> bool:
        return "--" + dest.replace("_", "-") in given

    refused = [f"--{dest.replace('_', '-')} ({why})" for dest, why in _UNSUPPORTED.items() if getattr(args, dest)]
    if args.opt != "adamw":
        refused.append(f"--opt {args.opt} (clip_train's optimizers: optim=adamw, optim=stable_adamw)")
    if args.precision not in _PRECISIONS:
        nearest = "amp_bf16 (train.precision=bf16)" if "bf" in args.precision else "amp (train.precision=fp16)"
        refused.append(f"--precision {args.precision} (clip_train keeps fp32 weights under autocast; the closest "
                       f"is --precision {nearest})")
    train_data = args.train_data
    if args.dataset_type == "synthetic":
        refused.append("--dataset-type synthetic (use data.train_shards=demo for a built-in dataset)")
    elif args.dataset_type == "csv" or (args.dataset_type == "auto" and train_data
                                        and train_data.lower().endswith((".csv", ".tsv"))):
        convert = shlex.join(["python", "-m", "clip_train.data.make_shards", train_data or "TABLE.csv", "shards/",
                              "--image-col", args.csv_img_key, "--caption-col", args.csv_caption_key])
        refused.append(f"--dataset-type csv (write shards from the table once: {convert}; then "
                       "--train-data 'shards/{00000..N}.tar')")
    if args.pretrained and not _is_path(args.pretrained):
        refused.append(f"--pretrained {args.pretrained} (an OpenCLIP download tag: download the weights file and "
                       "pass its path)")
    if args.force_image_size and len(set(args.force_image_size)) > 1:
        refused.append(f"--force-image-size {' '.join(map(str, args.force_image_size))} (square images only)")
    if args.image_interpolation == "random" or args.image_resize_mode == "longest":
        refused.append("--image-interpolation random / --image-resize-mode longest (not supported)")
    if not train_data:
        refused.append("--train-data (missing: clip_train trains on WebDataset shards)")
    augment = _augmentation(args.aug_cfg or [])
    if other := sorted(set(augment) - {"scale", "ratio", "use_timm"}):
        refused.append(f"--aug-cfg {', '.join(other)} (clip_train's training augmentation is the random resized "
                       "crop: scale and ratio only)")
    if refused:
        raise TranslationError("cannot translate " + "; ".join(refused))

    from clip_train.tokenizer import model_tokenizer_need

    model_name, model_cfg = _model_name(args.model, args.force_quick_gelu)
    overrides = ["model=openclip", f"model.name={model_name}"]
    needed = model_tokenizer_need(model_cfg)
    if tokenizer:
        overrides.append(f"tokenizer={_hydra_str('hf:' + tokenizer)}")
    elif needed:
        raise TranslationError(f"--model {args.model} needs the Hugging Face tokenizer {needed!r}, which OpenCLIP "
                               f"downloads: fetch it once (hf download {needed} --local-dir DIR) and pass "
                               "--tokenizer DIR before the command")
    if args.pretrained:
        overrides.append(f"model.pretrained={_hydra_str(args.pretrained)}")
    if args.force_image_size:
        overrides.append(f"model.force_image_size={args.force_image_size[0]}")
    if args.force_context_length:
        overrides.append(f"model.force_context_length={args.force_context_length}")
    if args.force_patch_dropout is not None:
        overrides.append(f"model.patch_dropout={args.force_patch_dropout}")
    if args.grad_checkpointing:
        overrides.append("model.grad_checkpointing=true")
    if args.lock_image:
        overrides += ["model.lock_image=true", f"model.lock_image_unlocked_groups={args.lock_image_unlocked_groups}"]
    if args.lock_text:
        overrides += ["model.lock_text=true", f"model.lock_text_unlocked_groups={args.lock_text_unlocked_layers}"]
    for dest in ("image_mean", "image_std"):
        if getattr(args, dest):
            overrides.append(f"model.{dest}={_hydra_list(getattr(args, dest))}")
    if args.image_interpolation:
        overrides.append(f"model.image_interpolation={args.image_interpolation}")
    if args.image_resize_mode:
        overrides.append(f"model.image_resize_mode={args.image_resize_mode}")

    # Data: OpenCLIP reads each shard once per epoch unless --dataset-resampled.
    patterns = train_data.split("::")
    if args.train_data_upsampling_factors:
        weights = [float(w) for w in args.train_data_upsampling_factors.split("::")]
        if len(weights) != len(patterns):
            raise TranslationError(f"--train-data-upsampling-factors has {len(weights)} weights for "
                                   f"{len(patterns)} --train-data sources (separate both with ::)")
        if not args.dataset_resampled:
            raise TranslationError("--train-data-upsampling-factors needs --dataset-resampled (as in OpenCLIP)")
        sources = ",".join(f"{{shards:{_hydra_str(p)},weight:{w!r}}}" for p, w in zip(patterns, weights))
        overrides.append(f"data.train_shards=[{sources}]")
    elif len(patterns) > 1:
        overrides.append("data.train_shards=[" + ",".join(_hydra_str(p) for p in patterns) + "]")
    else:
        overrides.append(f"data.train_shards={_hydra_str(patterns[0])}")
    # OpenCLIP's random resized crop: scale (0.9, 1.0) by default; its ratio is read only by timm's crop.
    scale, ratio = augment.get("scale", (0.9, 1.0)), (3 / 4, 4 / 3)
    if "ratio" in augment:
        if augment.get("use_timm"):
            ratio = augment["ratio"]
        else:
            notes.append("--aug-cfg ratio: OpenCLIP reads it only with use_timm=True, so the default 3/4-4/3 is kept")
    overrides += [f"data.train_crop_scale={_hydra_list(scale)}", f"data.train_crop_ratio={_hydra_list(ratio)}"]
    accum = max(1, args.accum_freq)
    # OpenCLIP's --accum-freq K accumulates K batches of --batch-size into one update; clip_train's
    # train.accum_steps splits one batch into K sub-batches, so the batch holds all K.
    overrides += [f"data.resampled={'true' if args.dataset_resampled else 'false'}",
                  f"data.batch_size={args.batch_size * accum}", f"train.accum_steps={accum}",
                  f"data.num_workers={args.workers}"]
    num_samples = args.train_num_samples if args.train_num_samples is not None else _dataset_size(patterns)
    if num_samples is None:
        raise TranslationError("--train-num-samples is needed: no sizes.json, __len__ or shards.json next to the "
                               "shards says how many samples an epoch holds (OpenCLIP needs it too)")
    if args.train_num_samples is not None and not args.dataset_resampled:
        overrides.append(f"data.epoch_samples={args.train_num_samples}")
    batches_per_epoch = openclip_batches_per_epoch(num_samples, args.batch_size, world, args.workers)
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise TranslationError(f"--accum-freq {accum} is more than the {batches_per_epoch} batches of an epoch")
    total_steps = steps_per_epoch * args.epochs

    # Optimizer and schedule. OpenCLIP's betas and eps default by architecture (CLIP paper: ViT or ResNet).
    vit = "vit" in args.model.lower()
    beta1 = args.beta1 if args.beta1 is not None else 0.9
    beta2 = args.beta2 if args.beta2 is not None else (0.98 if vit else 0.999)
    eps = args.eps if args.eps is not None else (1e-6 if vit else 1e-8)
    lr = args.lr if args.lr is not None else 5e-4
    # OpenCLIP decays its embeddings (only sub-2-D tensors and bn/ln/bias/logit_scale names are exempt).
    overrides += ["optim=adamw", f"optim.lr={lr!r}", f"optim.weight_decay={args.wd!r}", "optim.no_decay=openclip",
                  f"optim.betas={_hydra_list([beta1, beta2])}", f"optim.eps={eps!r}"]
    if args.skip_scheduler:
        overrides += ["optim.schedule=const", "optim.warmup_steps=0"]
    elif args.lr_scheduler == "const-cooldown":
        if args.epochs_cooldown is None:
            raise TranslationError("--lr-scheduler const-cooldown needs --epochs-cooldown (as in OpenCLIP)")
        overrides += ["optim.schedule=const-cooldown", f"optim.warmup_steps={args.warmup}",
                      f"optim.cooldown_steps={steps_per_epoch * args.epochs_cooldown}",
                      f"optim.cooldown_power={args.lr_cooldown_power!r}",
                      f"optim.min_lr_ratio={args.lr_cooldown_end / lr!r}"]
    elif args.lr_scheduler in ("cosine", "const"):
        overrides += [f"optim.schedule={args.lr_scheduler}", f"optim.warmup_steps={args.warmup}",
                      "optim.min_lr_ratio=0.0"]
    else:
        raise TranslationError(f"--lr-scheduler {args.lr_scheduler}: OpenCLIP's are cosine, const, const-cooldown")
    if args.grad_clip_norm is not None:
        overrides.append(f"optim.grad_clip_norm={args.grad_clip_norm!r}")

    # Loss: OpenCLIP picks CoCa's loss from the model name and SigLIP's from --siglip.
    if "coca" in args.model.lower():
        overrides += ["loss=coca", f"loss.caption_loss_weight={args.coca_caption_loss_weight!r}",
                      f"loss.clip_loss_weight={args.coca_contrastive_loss_weight!r}"]
    elif args.siglip:
        overrides.append("loss=siglip")
    else:
        overrides += ["loss=clip", "loss.temperature=0.07"]

    # The loop, checkpoints and logging.
    overrides += [f"train.max_steps={total_steps}", f"train.precision={_PRECISIONS[args.precision]}",
                  f"train.seed={args.seed}", f"train.log_every_n_steps={args.log_every_n_steps}"]
    if args.device.startswith("cpu"):
        overrides.append("train.device=cpu")
    elif args.device != "cuda":
        notes.append(f"--device {args.device}: each rank uses cuda:LOCAL_RANK (set CUDA_VISIBLE_DEVICES to pick GPUs)")
    if args.torchcompile:
        overrides.append("train.compile=true")
    if args.save_frequency > 0:
        overrides.append(f"ckpt.every_n_steps={steps_per_epoch * args.save_frequency}")
    else:
        overrides.append("ckpt.every_n_steps=0")
        notes.append("--save-frequency 0: clip_train still saves one checkpoint at the end")
    overrides.append(f"ckpt.keep_last={1 if args.delete_previous_checkpoint else 0}")
    resume = args.resume
    if resume == "latest":
        # The run dir is OpenCLIP's log dir: its own newest epoch file, if the OpenCLIP run got that far.
        found = newest_openclip_checkpoint(os.path.join(args.logs, args.name)) if args.name else None
        if found is None:
            overrides.append("ckpt.resume=auto")  # clip_train's default: a rerun continues from the newest checkpoint
        else:
            notes.append(f"--resume latest: continues OpenCLIP's newest checkpoint there, {found}; once this run has "
                         "saved, a rerun continues from its own newest")
        resume = found
    if resume:
        # OpenCLIP's epoch_N.pt: its weights, AdamW state and GradScaler continue at step N x steps per epoch.
        overrides += [f"ckpt.resume={_hydra_str(resume)}", f"ckpt.openclip_steps_per_epoch={steps_per_epoch}"]
        notes.append(f"--resume {resume}: OpenCLIP's epoch N continues at step N x {steps_per_epoch}, with its "
                     "weights, AdamW moments and GradScaler (a file holding weights alone: use --pretrained)")
    if args.name:
        overrides.append(f"hydra.run.dir={_hydra_str(os.path.join(args.logs, args.name))}")
    reports = {r.strip() for r in args.report_to.split(",") if r.strip()}
    if "all" in reports:
        reports = {"wandb", "tensorboard"}
    if "wandb" in reports:
        overrides += ["logger=wandb", f"logger.wandb.project={_hydra_str(args.wandb_project_name)}"]
    if "tensorboard" in reports:
        overrides.append("logger.tensorboard.enabled=true")
    if unknown := sorted(reports - {"wandb", "tensorboard"}):
        raise TranslationError(f"--report-to {','.join(unknown)}: OpenCLIP's are wandb, tensorboard, all")

    # Evaluation: OpenCLIP's val data gives retrieval recall (its val loss is not computed here), ImageNet
    # the zero-shot accuracy; both run every N epochs and after the last.
    zeroshot = []
    if args.zeroshot_frequency > 0:
        for name, folder in (("imagenet", args.imagenet_val), ("imagenet_v2", args.imagenet_v2)):
            if folder:  # OpenCLIP's ImageNet names and OpenAI's 80 templates, both built in here too
                zeroshot.append(f"{{name:{name},data:{_hydra_str(folder)},"
                                f"classnames:{_hydra_str(imagenet_classnames)},templates:openai}}")
    every_epochs = []
    if zeroshot:
        overrides.append("eval.zeroshot=[" + ",".join(zeroshot) + "]")
        every_epochs.append(args.zeroshot_frequency)
    if args.val_data and args.val_frequency > 0:
        overrides.append(f"eval.retrieval=[{{name:val,data:{_hydra_str(args.val_data)}}}]")
        every_epochs.append(args.val_frequency)
        notes.append("--val-data: evaluated for retrieval recall@1/5/10 (OpenCLIP's val loss is not computed)")
    if every_epochs:
        overrides.append(f"eval.every_n_steps={steps_per_epoch * min(every_epochs)}")

    for dest, why in _NO_EFFECT.items():
        if given_flag(dest):
            notes.append(f"--{dest.replace('_', '-')}: no effect here ({why})")
    if args.lock_image and not args.lock_image_freeze_bn_stats and not vit:
        notes.append("--lock-image: the locked tower's BatchNorm statistics are frozen too (OpenCLIP updates them "
                     "without --lock-image-freeze-bn-stats)")
    notes.append(f"an epoch is {steps_per_epoch} steps at world size {world}: {args.epochs} epochs = "
                 f"train.max_steps={total_steps}")
    return Translation(launcher=launcher, overrides=overrides, world_size=world, steps_per_epoch=steps_per_epoch,
                       notes=notes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.from_openclip", formatter_class=DefaultsHelpFormatter,
        description="Print the clip_train command that trains what an OpenCLIP training command trains.",
        usage="%(prog)s [--world-size N] [--tokenizer DIR] [--imagenet-classnames FILE] [--] OPENCLIP_COMMAND ...",
        epilog="e.g. python -m clip_train.from_openclip torchrun --nproc_per_node 8 -m open_clip_train.main "
               "--model ViT-B-32 --train-data '/data/{00000..41407}.tar' --train-num-samples 400000000 ...")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs the job runs on (default: torchrun's --nnodes x --nproc_per_node, else 1)")
    parser.add_argument("--tokenizer", default=None,
                        help="local directory of the Hugging Face tokenizer the model needs (SigLIP, ...)")
    parser.add_argument("--imagenet-classnames", default="imagenet",
                        help="class names for --imagenet-val / --imagenet-v2: a file, one name per line, or the "
                             "built-in 'imagenet' (OpenAI's, as OpenCLIP's)")
    # Our options come first; the OpenCLIP command is everything from the first other token (or after --).
    argv = list(sys.argv[1:] if argv is None else argv)
    split = 0
    while split < len(argv) and argv[split] in ("-h", "--help", "--world-size", "--tokenizer", "--imagenet-classnames"):
        split += 1 if argv[split] in ("-h", "--help") else 2
    ns = parser.parse_args(argv[:split])
    command = argv[split + 1:] if argv[split:split + 1] == ["--"] else argv[split:]
    if not command:
        parser.error("give the OpenCLIP command to translate after the options")
    try:
        translation = translate(command, ns.world_size, ns.imagenet_classnames, ns.tokenizer)
    except TranslationError as exn:
        print(f"{parser.prog}: error: {exn}", file=sys.stderr)
        return 2
    for note in translation.notes:
        print(f"note: {note}", file=sys.stderr)
    print(translation.command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
