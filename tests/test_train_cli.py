"""The training app end to end, in subprocesses: config errors, resume, torchrun, W&B offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from clip_train.train import checkpoint as ckpt
from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli, train_losses


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_unknown_config_key_is_named(cache_dir: Path, tmp_path: Path) -> None:
    result = run_cli([*FAST_DEMO, "train.max_stepz=3", f"hydra.run.dir={tmp_path}"], cache_dir, timeout=120)
    assert result.returncode != 0
    assert "max_stepz" in result.stderr + result.stdout


def test_fp16_on_cpu_is_one_clear_line_before_any_work(cache_dir: Path, tmp_path: Path) -> None:
    result = run_cli([*FAST_DEMO, "train.precision=fp16", f"hydra.run.dir={tmp_path}"], cache_dir, timeout=120)
    assert result.returncode == 2
    errors = [line for line in (result.stderr + result.stdout).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "fp16" in errors[0] and "CUDA" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_logs_the_same_losses_as_an_uninterrupted_run(cache_dir: Path, tmp_path: Path, workers: int) -> None:
    args = [*FAST_DEMO, "train.max_steps=8", "ckpt.every_n_steps=4", "ckpt.keep_last=0",
            f"data.num_workers={workers}"]
    full = tmp_path / "full"
    result = run_cli([*args, f"hydra.run.dir={full}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = train_losses(full)
    assert sorted(reference) == list(range(1, 9))

    # The same run, as if it had died after step 6: checkpoint 8 never written, metrics up to 6 logged.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, symlinks=True)
    shutil.rmtree(resumed / "checkpoints" / ckpt.step_dir_name(8))
    (resumed / "checkpoints" / "latest").unlink()
    result = run_cli([*args, f"hydra.run.dir={resumed}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr + result.stdout
    steps = [m["step"] for m in read_metrics(resumed) if "loss" in m]
    assert steps == list(range(1, 9)), "every step must appear exactly once"
    assert train_losses(resumed) == reference


def test_two_rank_torchrun_writes_metrics_once(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli([*FAST_DEMO, "train.max_steps=4", "train.log_every_n_steps=2", "data.batch_size=8",
                      "ckpt.every_n_steps=0", f"hydra.run.dir={run_dir}"], cache_dir, torchrun_procs=2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines] == [2, 4]
    assert all(m["world_size"] == 2 and m["global_batch_size"] == 16 for m in lines)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "outputs").exists()
    assert (run_dir / "checkpoints" / ckpt.step_dir_name(4)).is_dir()


def test_wandb_offline_run_is_written_and_resumed_with_the_same_id(cache_dir: Path, tmp_path: Path) -> None:
    args = [*FAST_DEMO, "logger.wandb.mode=offline", "ckpt.every_n_steps=2", f"hydra.run.dir={tmp_path}"]
    result = run_cli([*args, "train.max_steps=2"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = runs[0].name.rsplit("-", 1)[-1]
    saved = torch.load(tmp_path / "checkpoints" / ckpt.step_dir_name(2) / ckpt.STATE_FILE, weights_only=True)
    assert saved["wandb_run_id"] == run_id

    result = run_cli([*args, "train.max_steps=4", "optim.warmup_steps=1"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "wandb").glob("offline-run-*")}
    assert ids == {run_id}
