"""Continuing an OpenCLIP training run from its ``epoch_N.pt``: what OpenCLIP's own ``--resume`` restores.

OpenCLIP's checkpoint holds ``{"epoch", "name", "state_dict", "optimizer", "scaler"?}`` and nothing else: the
weights, AdamW's moments and step counts, and the GradScaler. It resumes at the start of epoch N, at step
N x its steps per epoch, with fresh data order and random streams; so does this.

OpenCLIP numbers its optimizer's tensors group by group (the no-decay group first, then the decayed one),
each in its model's ``named_parameters()`` order, which is the order of the checkpoint's own ``state_dict``
(parameters and buffers both follow module order). Parameter names here are OpenCLIP's, and with
``optim.no_decay=openclip`` the groups hold the same tensors, so every moment is matched to its tensor by
name, and checked against its shape.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_train.models.pretrained import CheckpointError, read_tensor_pickle, unwrapped_name
from clip_train.train.checkpoint import MANIFEST_FILE, STATE_FILE
from clip_train.train.optim import openclip_exempt


def is_openclip_checkpoint_file(path: Path) -> bool:
    """A single file that is not a clip_train step's ``state.pt``: what an OpenCLIP run writes."""
    return path.is_file() and not (path.name == STATE_FILE and (path.parent / MANIFEST_FILE).is_file())


def continuation_problem(cfg: Any) -> str | None:
    """What a ``ckpt.resume`` naming an OpenCLIP ``epoch_N.pt`` still needs, in one line; None if nothing
    (or if ``ckpt.resume`` names no single file)."""
    path = Path(cfg.ckpt.resume).expanduser()
    if cfg.ckpt.resume in ("auto", "none") or not is_openclip_checkpoint_file(path):
        return None
    needed = []
    steps = cfg.ckpt.openclip_steps_per_epoch
    if steps is None or steps < 1:
        needed.append("ckpt.openclip_steps_per_epoch=N (that run's optimizer steps per epoch" +
                      (f"; got {steps})" if steps is not None else ")"))
    if cfg.optim.name != "adamw" or cfg.optim.no_decay != "openclip":
        needed.append(f"optim=adamw optim.no_decay=openclip (its AdamW groups; now optim.name={cfg.optim.name}, "
                      f"optim.no_decay={cfg.optim.no_decay})")
    if not needed:
        return None
    return (f"ckpt.resume={path} is a single file, read as an OpenCLIP training checkpoint; continuing it needs "
            + " and ".join(needed) + ": python -m clip_train.from_openclip ... --resume FILE prints the whole command")


def read_openclip_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's dict, or one line saying why it is not an OpenCLIP training checkpoint."""
    raw = read_tensor_pickle(path)
    missing = [key for key in ("epoch", "state_dict", "optimizer") if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise CheckpointError(
            f"ckpt.resume={path} is neither a clip_train checkpoint nor an OpenCLIP training checkpoint (it lacks "
            f"{', '.join(missing)}): give a run dir or step directory, an OpenCLIP epoch_N.pt, or, to start from "
            "its weights alone, model.pretrained=PATH"
        )
    optimizer = raw["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)
            and isinstance(optimizer.get("state"), dict)):
        raise CheckpointError(f"{path}: its 'optimizer' entry is not an optimizer state dict")
    return raw


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {unwrapped_name(name): p for name, p in model.named_parameters() if p.requires_grad}


def _openclip_moments(saved: dict[str, Any], weights: dict[str, torch.Tensor], model: nn.Module,
                      path: Path) -> dict[str, dict[str, Any]]:
    """Each trained tensor's AdamW state from the OpenCLIP checkpoint's ``saved`` optimizer state, by parameter
    name; ``weights`` is its state dict (unwrapped names, in its module order)."""
    groups = saved["param_groups"]
    if len(groups) != 2 or float(groups[0].get("weight_decay", -1)) != 0.0:
        raise CheckpointError(
            f"{path}: its optimizer has {len(groups)} parameter group(s), not OpenCLIP's AdamW layout (a no-decay "
            "group, then a decayed one); a run with --opt timm/... cannot be continued here"
        )
    trainable = _trainable(model)
    in_order = [name for name in weights if name in trainable]
    exempt: list[str] = []
    decayed: list[str] = []
    for name in in_order:
        (exempt if openclip_exempt(name, trainable[name]) else decayed).append(name)
    moments: dict[str, dict[str, Any]] = {}
    for group, names, what in zip(groups, (exempt, decayed), ("no-decay", "decayed")):
        if len(group["params"]) != len(names):
            raise CheckpointError(
                f"{path}: its optimizer's {what} group holds {len(group['params'])} tensors, this run trains "
                f"{len(names)} such: lock the towers as that run did (model.lock_image, model.lock_text and "
                "their unlocked groups) and use its architecture"
            )
        for index, name in zip(group["params"], names):
            state = saved["state"].get(index)
            if not state:
                continue  # never stepped (OpenCLIP creates state on a tensor's first update)
            shape = tuple(trainable[name].shape)
            for key in ("exp_avg", "exp_avg_sq"):
                value = state.get(key)
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise CheckpointError(f"{path}: the optimizer's {key} for {name} is {got}, the tensor is {shape}")
            moments[name] = state
    return moments


def state_from_openclip(
    path: Path,
    raw: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    loader_state: dict[str, Any],
    steps_per_epoch: int,
) -> dict[str, Any]:
    """The OpenCLIP checkpoint in the layout of a clip_train ``state.pt``, for the trainer's resume.

    ``optimizer`` must group tensors by ``optim.no_decay=openclip``; ``loader_state`` is this run's fresh
    loader state, moved to the start of epoch N (epoch mode) or to step N x ``steps_per_epoch`` (resampled).
    """
    epoch = int(raw["epoch"])
    step = epoch * steps_per_epoch
    weights = {unwrapped_name(key): value for key, value in raw["state_dict"].items()}
    moments = _openclip_moments(raw["optimizer"], weights, model, path)
    largest = max((int(torch.as_tensor(s["step"]).item()) for s in moments.values() if "step" in s), default=0)
    if largest > step:
        raise CheckpointError(
            f"{path}: its optimizer took {largest} steps, more than epoch {epoch} x "
            f"ckpt.openclip_steps_per_epoch={steps_per_epoch}: set the steps per epoch that run had "
            "(python -m clip_train.from_openclip prints them)"
        )
    name_of = {id(p): unwrapped_name(name) for name, p in model.named_parameters()}
    layout = optimizer.state_dict()
    index_of = {}
    for live_group, saved_group in zip(optimizer.param_groups, layout["param_groups"]):
        index_of.update({name_of[id(p)]: i for p, i in zip(live_group["params"], saved_group["params"])})
    optimizer_state = {"state": {index_of[name]: state for name, state in moments.items()},
                       "param_groups": layout["param_groups"]}

    schedule = copy.deepcopy(scheduler.state_dict())
    schedule["last_epoch"], schedule["_step_count"] = step, step + 1
    scaler_state = scaler.state_dict()
    if raw.get("scaler") and scaler.is_enabled():
        scaler_state = raw["scaler"]
    data = dict(loader_state, world_size=1, samples_seen=step * int(loader_state["global_batch_size"]))
    if data["mode"] == "epoch":
        data.update(epoch=epoch, batches_in_epoch=0)
    else:
        data.update(epoch=0, batches_in_epoch=step)
    data.update(skipped_samples=0, skipped_shards=0)
    return {
        "model": weights,
        "optimizer": optimizer_state,
        "scheduler": schedule,
        "scaler": scaler_state,
        "train_state": {"step": step, "skipped_steps": 0, "consecutive_bad_steps": 0},
        "per_rank": [{"dataloader": data}],  # no random streams: each rank seeds fresh ones from the step
        "model_config": {"name": raw.get("name") if isinstance(raw.get("name"), str) else "OpenCLIP"},
        "openclip_epoch": epoch,
    }
