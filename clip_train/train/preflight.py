"""Checks made before Hydra starts the job, so a refused run writes nothing at all.

``@hydra.main`` creates the run directory and writes ``.hydra/config.yaml``, ``overrides.yaml``,
``hydra.yaml`` and the job log before our code runs. A second trainer started on a live run's directory
would overwrite the first run's record, and a misspelt key would leave an empty run directory behind
and exit 1 with Hydra's multi-line report. So ``python -m clip_train`` first composes the same config
with Hydra's compose API, validates it, computes the run directory and (on rank 0) takes the run
directory's lock; only then does it hand over to ``@hydra.main``, pinning ``hydra.run.dir`` to the
directory it locked (a ``${now:...}`` run dir could otherwise tick over to another second in between).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clip_train.config import (
    ConfigError,
    TrainConfig,
    check_known_keys,
    close_key_hint,
    renamed_key_error,
    renamed_key_in,
    validate,
)

_PLAIN_OVERRIDE_VALUE = re.compile(r"^[A-Za-z0-9_/.\-+:@~%]+$")
_HYDRA_DETAIL_LINES = ("full_key:", "reference_type", "object_type", "Set the environment variable",
                       "To append to your config")  # struct mode refuses a "+key" for an unknown key too


@dataclass
class Preflight:
    config: TrainConfig
    run_dir: Path


def one_line(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages (and their causes) joined into one line, details dropped."""
    parts: list[str] = []
    seen: BaseException | None = err
    while seen is not None:
        for line in str(seen).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line and not line.startswith(_HYDRA_DETAIL_LINES) and line not in parts:
                parts.append(line)
        seen = seen.__cause__
    return "; ".join(parts) or type(err).__name__


def compose(config_dir: str, config_name: str, overrides: list[str]) -> DictConfig:
    """The config ``@hydra.main`` would build from ``overrides``, with its ``hydra`` node (nothing is written)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    init = (initialize_config_module(config_dir.removeprefix("pkg://").replace("/", "."), job_name="__main__",
                                     version_base="1.3")
            if config_dir.startswith("pkg://")
            else initialize_config_dir(config_dir, job_name="__main__", version_base="1.3"))
    try:
        with init:
            return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def job_config(composed: DictConfig) -> DictConfig:
    """What the task function receives from ``compose``'s result: the TrainConfig schema without Hydra's node."""
    job = composed.copy()
    OmegaConf.set_struct(job, False)
    del job["hydra"]
    return job


def check(config_dir: str, config_name: str, overrides: list[str], world_size: int) -> Preflight:
    """Compose, type and validate the run's config and compute its run directory; ``ConfigError`` in one line."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    renamed = renamed_key_error(overrides)
    if renamed is not None:
        raise ConfigError(renamed)
    try:
        cfg = compose(config_dir, config_name, overrides)
        HydraConfig.instance().set_config(cfg)
        run_dir = Path(str(cfg.hydra.run.dir))
        job = job_config(cfg)
        check_known_keys(job)
        typed: TrainConfig = OmegaConf.to_object(job)  # type: ignore[assignment]
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - every composition failure is a configuration error
        renamed = renamed_key_in(err)  # e.g. an old key in a YAML file
        if renamed is not None:
            raise ConfigError(renamed) from None
        raise ConfigError(
            f"{one_line(err)}{close_key_hint(err)} (keys and types are listed in clip_train/config.py; "
            "python -m clip_train --cfg job "
            "prints the composed config)"
        ) from None
    preference = typed.train.device
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    device_type = "cuda" if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()) else "cpu"
    validate(typed, world_size, device_type)
    if typed.data.train_shards is None:  # caught here, not by the loader, so the refused run leaves no run dir
        from clip_train.data.sources import unset_shards_message

        raise ConfigError(unset_shards_message())
    return Preflight(config=typed, run_dir=run_dir.expanduser().absolute())


def run_dir_override(run_dir: Path) -> str:
    """``hydra.run.dir=...``, quoted for Hydra's override grammar when the path needs it."""
    text = str(run_dir)
    if not _PLAIN_OVERRIDE_VALUE.match(text):
        text = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"hydra.run.dir={text}"
