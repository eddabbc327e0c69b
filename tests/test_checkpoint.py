"""Atomic checkpoints, verification, fallback to the previous good one, pruning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from clip_train.train import checkpoint as ckpt
from clip_train.train.metrics import truncate_metrics_after


def save(root: Path, step: int) -> Path:
    return ckpt.write_checkpoint(root, step, {"step": step, "weights": torch.full((4,), float(step))})


def test_write_verify_and_latest(tmp_path: Path) -> None:
    path = save(tmp_path, 10)
    assert ckpt.verify_checkpoint(path) == 10
    assert (tmp_path / "latest").resolve() == path.resolve()
    assert ckpt.load_checkpoint(path)["weights"].tolist() == [10.0] * 4
    assert not list(tmp_path.glob(".tmp-*"))


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path: Path, caplog) -> None:
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    state = newest / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        found = ckpt.find_resumable(tmp_path)
    assert found is not None and found.name == ckpt.step_dir_name(10)
    assert any("step_000000020" in r.message and "bytes" in r.message for r in caplog.records)


def test_corrupt_bytes_of_the_same_size_are_detected(tmp_path: Path) -> None:
    path = save(tmp_path, 5)
    state = path / ckpt.STATE_FILE
    data = bytearray(state.read_bytes())
    data[-30] ^= 0xFF
    state.write_bytes(bytes(data))
    try:
        ckpt.verify_checkpoint(path)
    except ckpt.CheckpointCorrupt as err:
        assert "SHA-256" in str(err)
    else:
        raise AssertionError("corruption went unnoticed")


def test_unfinished_save_is_ignored(tmp_path: Path) -> None:
    save(tmp_path, 1)
    unfinished = tmp_path / ckpt.step_dir_name(2)
    unfinished.mkdir()
    (unfinished / ckpt.STATE_FILE).write_bytes(b"partial")
    assert ckpt.find_resumable(tmp_path).name == ckpt.step_dir_name(1)


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == [ckpt.step_dir_name(4), ckpt.step_dir_name(3)]



def test_prune_also_keeps_every_nth_step_for_later_branches(tmp_path: Path) -> None:
    for step in range(2, 22, 2):
        save(tmp_path, step)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_every_n_steps=8)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [20, 18, 16, 8]


def test_resolve_accepts_run_dir_checkpoint_dir_or_step_dir(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    save(root, 3)
    newest = save(root, 7)
    assert ckpt.resolve_checkpoint_path(tmp_path / "run") == newest
    assert ckpt.resolve_checkpoint_path(root) == newest
    assert ckpt.resolve_checkpoint_path(newest / ckpt.STATE_FILE) == newest.resolve()


def test_metrics_after_the_resumed_step_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (10, 20, 30)] + ['{"step": 40, "lo']
    path.write_text("\n".join(lines))
    truncate_metrics_after(path, 20)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]


def test_keep_every_n_steps_must_fall_on_saved_steps() -> None:
    from clip_train.config import ConfigError, TrainConfig, validate

    cfg = TrainConfig()
    cfg.ckpt.every_n_steps, cfg.ckpt.keep_every_n_steps = 1000, 2500
    with pytest.raises(ConfigError, match="ckpt.keep_every_n_steps=2500 must be a multiple of ckpt.every_n_steps=1000"):
        validate(cfg, world_size=1, device_type="cpu")
    cfg.ckpt.keep_every_n_steps = 5000
    validate(cfg, world_size=1, device_type="cpu")
