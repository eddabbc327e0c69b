"""What a resume takes from the checkpoint and what from the new config, and keeping one timeline.

From the checkpoint: weights, optimizer moments and step counts, the schedule's position (the step), the
data position, every RNG stream, the skip counters, the W&B run id (when the checkpoint is the run dir's own:
another run's checkpoint starts a new run off it). From the new config: everything else, the optimizer's
hyperparameters in particular (``optim.lr``, ``weight_decay``, ``betas``, ``eps``, ``warmup_steps``,
``schedule`` and its ``min_lr_ratio``/``cooldown_*``, ``grad_clip_norm``) and ``train.max_steps`` (which
shapes the schedule). :func:`config_changes` lists what differs from the config stored in the checkpoint, one line each.

Resuming from a checkpoint older than the run's newest starts a new timeline from it: the newer step
directories belong to the abandoned one, so :func:`retire_newer_checkpoints` moves them under
``checkpoints/abandoned/<UTC timestamp>/`` (with the metrics lines they had logged), where
``ckpt.resume=auto`` no longer finds them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from clip_train.data.config import RENAMED_OPTIONS
from clip_train.train import checkpoint as ckpt_io

log = logging.getLogger("clip_train")

ABANDONED_DIR = "abandoned"
# Keys that name how to start, not what to train: a difference there is expected, not news.
_NOT_COMPARED = ("ckpt.resume",)
# A config saved before a rename holds the old key; it is the same setting under its new name.
_RENAMED_KEYS = {f"data.{old}": f"data.{new}" for old, (new, _) in RENAMED_OPTIONS.items()}


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``; lists stay whole (``optim.betas`` is one value)."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(saved: dict | None, new: dict) -> list[str]:
    """``"optim.lr 0.003 -> 1e-05"`` for every key whose value differs between the two configs (a key saved
    under a name since renamed is compared under its new name)."""
    if not saved:
        return []
    old = {_RENAMED_KEYS.get(key, key): value for key, value in flatten(saved).items()}
    now = flatten(new)
    lines = []
    for key in sorted(set(old) | set(now)):
        if key.startswith(_NOT_COMPARED):
            continue
        before, after = old.get(key, "(unset)"), now.get(key, "(unset)")
        if before != after:
            lines.append(f"{key} {before} -> {after}")
    return lines


def decay_rule_change(saved: dict | None, new: dict) -> str | None:
    """One line when the new config's ``optim.no_decay`` differs from the checkpoint's, else None.

    The rule decides which tensors each optimizer group holds, and saved moments are matched to tensors by
    their place in the groups: under another rule they would land on other tensors, so the resume is refused.
    """
    if not saved:
        return None
    before = (saved.get("optim") or {}).get("no_decay", "clip")  # checkpoints from before the key: "clip"
    after = (new.get("optim") or {}).get("no_decay", "clip")
    if before == after:
        return None
    return (f"optim.no_decay={after} differs from the checkpoint's {before}: its optimizer moments are grouped by "
            f"that rule, so it cannot change on resume. Resume with optim.no_decay={before}, or start afresh "
            f"from its weights with model.pretrained=CHECKPOINT")


def retire_newer_checkpoints(checkpoint_dir: Path, step: int, metrics_path: Path) -> Path | None:
    """Move every step directory newer than ``step`` (and the metrics they logged) aside; repoint ``latest``.

    Returns the folder they went to, or None when there was nothing newer.
    """
    newer = [path for saved, path in ckpt_io.list_checkpoints(checkpoint_dir) if saved > step]
    if not newer:
        return None
    target = checkpoint_dir / ABANDONED_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
        suffix += 1
    target.mkdir(parents=True)
    for path in newer:
        os.replace(path, target / path.name)
    _save_abandoned_metrics(metrics_path, step, target)
    kept = checkpoint_dir / ckpt_io.step_dir_name(step)
    latest = checkpoint_dir / ckpt_io.LATEST
    if kept.is_dir():
        ckpt_io.point_latest(checkpoint_dir, kept.name)
    elif latest.is_symlink():
        latest.unlink()  # the resumed checkpoint lives elsewhere; the next save points latest again
    log.warning("resuming from step %d while newer checkpoints existed: moved %s to %s (that timeline is "
                "abandoned; ckpt.resume=auto now continues this one)", step, ", ".join(p.name for p in newer), target)
    return target


def _save_abandoned_metrics(metrics_path: Path, step: int, target: Path) -> None:
    """Keep the abandoned timeline's metrics lines next to its checkpoints (the run's file drops them)."""
    if not metrics_path.is_file():
        return
    dropped = []
    for line in metrics_path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) > step:
                dropped.append(line)
        except (ValueError, AttributeError):
            continue
    if dropped:
        (target / metrics_path.name).write_text("".join(line + "\n" for line in dropped))
