"""W&B follows the standard ``WANDB_*`` environment wherever the config leaves a key unset.

The offline run is read back from its ``.wandb`` file with W&B's own record schema (``tests.wandb_records``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from clip_train.config import ConfigError, WandbConfig
from clip_train.train.metrics import resolve_wandb_init
from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli
from tests.wandb_records import read_wandb_records, wandb_history


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _isolated_home(tmp_path: Path) -> dict[str, str | None]:
    """No ~/.netrc, no W&B settings file or key from the developer's account."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"), "WANDB_API_KEY": None,
            "NETRC": None}


def test_wandb_mode_offline_in_the_environment_alone_writes_an_offline_run_that_matches_metrics(
    cache_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = {**_isolated_home(tmp_path), "WANDB_MODE": "offline", "WANDB_PROJECT": "project-from-env",
           "WANDB_RUN_GROUP": "group-from-env", "WANDB_TAGS": "nightly,env"}
    result = run_cli([*FAST_DEMO, "train.max_steps=3", "ckpt.every_n_steps=0", f"hydra.run.dir={run_dir}"],
                     cache_dir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    (log_file,) = offline_run.glob("run-*.wandb")
    records = read_wandb_records(log_file)

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "project-from-env"
    assert run.run_group == "group-from-env"
    assert list(run.tags) == ["nightly", "env"]
    assert run.display_name == "run"  # the run dir's name
    assert offline_run.name.endswith(run.run_id)

    history = wandb_history(records)
    logged = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3] and sorted(history) == [1, 2, 3]
    for line in logged:
        row = history[line["step"]]
        for key, value in line.items():
            if key == "step":
                continue
            assert key in row, f"{key} missing from the W&B history"
            assert math.isclose(row[key], value, rel_tol=1e-9, abs_tol=1e-12), (key, row[key], value)


def test_wandb_mode_disabled_in_the_environment_beats_logger_wandb(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli([*FAST_DEMO, "logger=wandb", "train.max_steps=1", "ckpt.every_n_steps=0",
                      f"hydra.run.dir={run_dir}"], cache_dir, env={**_isolated_home(tmp_path), "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").is_file()
    assert not (run_dir / "wandb").exists()


def test_online_without_an_api_key_is_one_line_naming_wandb_mode_offline(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli([*FAST_DEMO, "train.max_steps=1", f"hydra.run.dir={run_dir}"], cache_dir,
                     env={**_isolated_home(tmp_path), "WANDB_MODE": "online"})
    assert result.returncode == 2, result.stderr[-3000:]
    output = result.stderr + result.stdout
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "WANDB_MODE=offline" in errors[0] and "API key" in errors[0], output[-2000:]
    assert "Traceback" not in output


def test_config_keys_override_the_environment_and_unset_keys_defer_to_it(tmp_path: Path) -> None:
    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "p-env", "WANDB_NAME": "n-env", "WANDB_DIR": "/d-env",
           "WANDB_RESUME": "must"}
    deferred = resolve_wandb_init(WandbConfig(), tmp_path / "run", None, env)
    # None means "not passed to wandb.init", so wandb takes the variable itself.
    assert deferred is not None
    assert (deferred.mode, deferred.project, deferred.name, deferred.dir, deferred.resume) == (None,) * 5
    assert deferred.group is None and deferred.tags is None and deferred.entity is None

    explicit = resolve_wandb_init(
        WandbConfig(mode="online", project="p", name="n", dir="/d", group="g", tags=["t"], entity="e"),
        tmp_path / "run", "abc123", env,
    )
    assert (explicit.mode, explicit.project, explicit.name, explicit.dir) == ("online", "p", "n", "/d")
    assert (explicit.group, explicit.tags, explicit.entity, explicit.id) == ("g", ["t"], "e", "abc123")

    # Nothing in the environment: our defaults (W&B off under logger=default; project clip_train; run dir).
    assert resolve_wandb_init(WandbConfig(), tmp_path / "run", None, {}) is None
    defaults = resolve_wandb_init(WandbConfig(default_mode="online"), tmp_path / "run", None, {})
    assert (defaults.mode, defaults.project, defaults.name, defaults.dir, defaults.resume) == (
        "online", "clip_train", "run", str(tmp_path / "run"), "allow")
    assert resolve_wandb_init(WandbConfig(mode="disabled"), tmp_path, None, {"WANDB_MODE": "online"}) is None

    with pytest.raises(ConfigError, match="WANDB_MODE='ofline'"):
        resolve_wandb_init(WandbConfig(), tmp_path, None, {"WANDB_MODE": "ofline"})
