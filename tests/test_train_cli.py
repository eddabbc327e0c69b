"""The training app end to end, in subprocesses: config errors, resume, torchrun, W&B offline."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from clip_train.train import checkpoint as ckpt
from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli, train_losses


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_help_names_the_app_and_how_to_start_it_and_writes_nothing(cache_dir: Path, tmp_path: Path) -> None:
    result = run_cli(["+experiment=demo", "--help"], cache_dir, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    head = result.stdout.split("== Configuration groups ==")[0]
    assert head.startswith("clip_train: ") and "__main__" not in head
    assert "python -m clip_train +experiment=NAME" in head and "torchrun --nproc_per_node=N" in head
    assert "train_shards: demo" in result.stdout  # the help shows the config these overrides compose
    assert list(tmp_path.iterdir()) == []


# Hydra's + adds keys even in struct mode; without our check "+data.shuffle_bufer=4" trained with the default
# buffer. Without +, Hydra refuses the key itself; either way the one line names the key it resembles.
@pytest.mark.parametrize(("override", "named", "resembled"), [
    ("train.max_stepz=3", "train.max_stepz", "train.max_steps"),
    ("+data.shuffle_bufer=4", "data.shuffle_bufer", "data.shuffle_buffer"),
], ids=["typo", "typo-added-with-plus"])
def test_a_misspelt_key_is_named_with_the_key_it_resembles(
    override: str, named: str, resembled: str, cache_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli([*FAST_DEMO, override, f"hydra.run.dir={run_dir}"], cache_dir, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and named in errors[0], errors
    assert f"(did you mean {resembled}?)" in errors[0]
    assert not run_dir.exists()


def test_unknown_keys_of_a_composed_config_are_found_at_any_depth() -> None:
    """What the task function checks too (sweep jobs and submitit skip the pre-Hydra check)."""
    from omegaconf import OmegaConf, open_dict

    from clip_train.config import TrainConfig, unknown_keys

    cfg = OmegaConf.structured(TrainConfig)
    assert unknown_keys(cfg) == []
    with open_dict(cfg.model.vision), open_dict(cfg.optim):  # what Hydra's + does to struct nodes
        cfg.model.vision.widht = 3
        cfg.optim.lrr = 0.1
    assert unknown_keys(cfg) == ["model.vision.widht (did you mean model.vision.width?)",
                                 "optim.lrr (did you mean optim.lr?)"]


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


def test_two_rank_torchrun_agrees_on_a_timestamped_run_dir_and_writes_metrics_once(
    cache_dir: Path, tmp_path: Path
) -> None:
    # ${now:} resolves in each process; with microseconds the two ranks' own values always differ, so
    # a single run dir proves that the ranks took rank 0's.
    result = run_cli([*FAST_DEMO, "train.max_steps=4", "train.log_every_n_steps=2", "data.batch_size=8",
                      "ckpt.every_n_steps=0", "hydra.run.dir=runs/${now:%H-%M-%S-%f}"], cache_dir,
                     torchrun_procs=2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines] == [2, 4]  # rank 0 alone writes: each step once
    for m in lines:
        assert m["world_size"] == 2 and m["global_batch_size"] == 16
        assert math.isfinite(m["loss"]) and m["lr"] > 0 and m["skipped_samples"] == 0
        assert 0 < m["temperature"] < 1 and m["samples_per_s"] > 0
        assert m["data_wait_s"] >= 0 and m["compute_s"] > 0 and 0 <= m["data_wait_fraction"] <= 1
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no stray .hydra/ or outputs/
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


def test_bf16_checkpoint_holds_every_part_and_resume_path_or_none(cache_dir: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    args = [*FAST_DEMO, "train.precision=bf16", "data.batch_size=8", "ckpt.every_n_steps=0"]
    result = run_cli([*args, "train.max_steps=2", f"hydra.run.dir={first}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(math.isfinite(loss) for loss in train_losses(first).values())
    step_dir = first / "checkpoints" / ckpt.step_dir_name(2)
    saved = torch.load(step_dir / ckpt.STATE_FILE, weights_only=True)  # plain containers and tensors only
    assert {"model", "optimizer", "scheduler", "scaler", "train_state", "per_rank", "world_size",
            "wandb_run_id", "config", "model_config"} <= set(saved)
    assert saved["train_state"]["step"] == 2 and saved["scheduler"]["last_epoch"] == 2
    assert type(saved["config"]) is dict and saved["config"]["train"]["precision"] == "bf16"
    (rank0,) = saved["per_rank"]
    assert {"python", "numpy", "torch"} <= set(rank0["rng"])
    assert rank0["dataloader"]["samples_seen"] == 16 and rank0["dataloader"]["world_size"] == 1

    # The same command again (a finished job started twice) trains nothing and says so, reporting (and
    # returning to Hydra's sweepers) the final evaluation it logged; these runs skip evaluation, so one is added.
    with (first / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 2, "zeroshot_top1": 0.25, "zeroshot_top5": 0.75}) + "\n")
    before = (first / "metrics.jsonl").read_text()
    result = run_cli([*args, "train.max_steps=2", f"hydra.run.dir={first}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "nothing to train: the run is at step 2 and train.max_steps=2" in output
    assert "finished 2 steps; final zeroshot_top1 0.2500, zeroshot_top5 0.7500" in output
    assert (first / "metrics.jsonl").read_text() == before

    # ckpt.resume=PATH continues a given checkpoint in another run dir.
    result = run_cli([*args, "train.max_steps=3", f"ckpt.resume={step_dir}", f"hydra.run.dir={second}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stdout + result.stderr
    assert list(train_losses(second)) == [3]

    # ckpt.resume=none starts afresh even where checkpoints exist.
    result = run_cli([*args, "train.max_steps=1", "ckpt.resume=none", f"hydra.run.dir={first}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" not in result.stdout + result.stderr
    assert list(train_losses(first)) == [1]


def test_siglip_run_starts_from_the_paper_temperature_and_bias(cache_dir: Path, tmp_path: Path) -> None:
    # lr 1e-6: Adam moves a parameter by about lr per step, so two steps leave the initial values readable.
    result = run_cli([*FAST_DEMO, "loss=siglip", "optim.lr=1e-6", "data.batch_size=8", "train.max_steps=2",
                      "ckpt.every_n_steps=0", f"hydra.run.dir={tmp_path}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert lines[0]["temperature"] == pytest.approx(0.1, rel=1e-4)  # logit_scale = ln 10
    model = torch.load(tmp_path / "checkpoints" / ckpt.step_dir_name(2) / ckpt.STATE_FILE, weights_only=True)["model"]
    assert model["logit_scale"].item() == pytest.approx(math.log(10), abs=1e-5)
    assert model["logit_bias"].item() == pytest.approx(-10.0, abs=1e-5)


def test_bad_samples_in_the_shards_reach_metrics_as_skipped_samples(cache_dir: Path, tmp_path: Path) -> None:
    from tests.data.data_helpers import good_sample, write_tar

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):  # each shard: 12 good samples and 4 that cannot be decoded
        samples = [good_sample(s * 100 + i) for i in range(12)]
        samples += [{"__key__": f"bad{s}{i}", "png": b"<html>404</html>", "txt": b"gone"} for i in range(4)]
        write_tar(str(shards / f"{s:05d}.tar"), samples)
    run_dir = tmp_path / "run"
    result = run_cli([*FAST_DEMO, f"data.train_shards='{shards}/{{00000..00001}}.tar'", "data.batch_size=8",
                      "train.max_steps=6", "ckpt.every_n_steps=0", f"hydra.run.dir={run_dir}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [m["skipped_samples"] for m in read_metrics(run_dir) if "loss" in m]
    assert len(skipped) == 6 and skipped == sorted(skipped)  # a running total
    assert skipped[-1] > 0  # 48 good samples trained on from shards that are a quarter bad
