"""``python -m clip_train [overrides]``: the Hydra training app (also under ``torchrun``).

Only rank 0 lets Hydra write its run directory (``.hydra/``, the job log); the other ranks are told
before Hydra starts to write nothing, and learn the run directory from rank 0 once the group is up, so
a timestamped ``hydra.run.dir`` cannot differ between ranks.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

import hydra
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from clip_train.config import (
    ConfigError,
    TrainConfig,
    check_known_keys,
    register_configs,
    renamed_key_error,
    validate,
)
from clip_train.config_source import hydra_config_path
from clip_train.errors import reason
from clip_train.models.pretrained import CheckpointError
from clip_train.train import preemption, preflight, run_lock
from clip_train.train.checkpoint import CheckpointCorrupt, DiskFull
from clip_train.train.distributed import launch_env

log = logging.getLogger("clip_train")

# Exit codes (docs/reliability.md). 2: configuration and input errors (a clear one-line message, no
# traceback); 3 (preemption.EXIT_PREEMPTED): stopped on a preemption signal with a checkpoint written;
# 4: too many non-finite steps in a row (restarting as is would diverge again); 5: a collective failed or
# timed out because another rank died or hung (restart: the run resumes from its newest checkpoint).
# 6: the disk filled up while writing (the run directory is left as it was before the failed write; free
# space and rerun); 130 (preemption.EXIT_INTERRUPTED): stopped by Ctrl-C / SIGINT after a checkpoint.
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 4
EXIT_PEER_LOST = 5
EXIT_DISK_FULL = 6

# Hydra's config directory, relative to this file (also read by the pre-Hydra checks in main()).
# The checkout's configs/ (absolute) when run from source, else the copy inside the installed package (pkg://).
CONFIG_PATH = hydra_config_path()
CONFIG_NAME = "train"

register_configs()


def _is_multirun(argv: list[str]) -> bool:
    """``-m``, or a sweep from configs/sweep/ (they set ``hydra.mode: MULTIRUN``)."""
    return any(
        arg in ("-m", "--multirun") or arg.startswith(("+sweep=", "sweep=", "hydra.mode=MULTIRUN")) for arg in argv
    )


def _quiet_non_zero_ranks(argv: list[str]) -> list[str]:
    """Overrides that keep a non-zero rank from writing into (or creating) the run directory."""
    if launch_env().rank == 0:
        return argv
    kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging="))]
    return kept + ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def train(cfg: DictConfig) -> dict[str, float]:
    """Set up the process group, validate, build the Trainer and run it. Returns the final eval metrics."""
    from clip_train.train.distributed import broadcast_object, init_distributed, pick_device, shutdown

    # Again here: under submitit this function is called without main(), after submitit's own handler.
    preemption.install()
    preemption.install_terminate()
    preemption.install_interrupt()
    check_known_keys(cfg)
    typed: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    launch = launch_env()
    validate(typed, launch.world_size, pick_device(typed.train.device, launch.local_rank).type)
    ctx = init_distributed(typed.train.device, timeout_s=typed.train.collective_timeout_s)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        if ctx.is_main:  # a no-op when main() took it already; sweeps and submitit jobs take it here
            run_lock.hold(Path(HydraConfig.get().runtime.output_dir), typed.train.lock_stale_after_s)
        run_dir = Path(broadcast_object(HydraConfig.get().runtime.output_dir if ctx.is_main else None, ctx))
        from clip_train.train.trainer import Trainer  # heavy imports after the cheap checks

        trainer = Trainer(typed, run_dir, ctx, resolved_config=OmegaConf.to_container(cfg, resolve=True))
        return trainer.train()
    finally:
        preemption.disarm()
        run_lock.release()
        shutdown()


@hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except preemption.Preempted as stop:
        if preemption.interrupted():
            log.info("%s; stopped by Ctrl-C (exit %d): rerun the same command to resume", stop,
                     preemption.EXIT_INTERRUPTED)
        else:
            log.info("%s; handing the job back to the scheduler", stop)
        preemption.hand_off(launch_env().rank)
        return None
    except (ConfigError, CheckpointError, CheckpointCorrupt, run_lock.RunDirLocked, ValueError,
            FileNotFoundError) as err:
        log.error("clip_train: error: %s", err)
        sys.exit(EXIT_BAD_INPUT)
    except DiskFull as err:
        log.error("clip_train: error: %s", err)
        sys.exit(EXIT_DISK_FULL)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        log.error("clip_train: error: %s", DiskFull.describe(err))
        sys.exit(EXIT_DISK_FULL)
    except RuntimeError as err:
        if isinstance(err, torch.distributed.DistError) or "/gloo/" in str(err):
            _lost_peer(err)
        from clip_train.train.trainer import TrainingDiverged  # the trainer module is loaded by now

        if not isinstance(err, TrainingDiverged):
            raise
        log.error("clip_train: error: %s", err)
        sys.exit(EXIT_DIVERGED)
    # Hydra's sweepers (e.g. Optuna) optimise the returned value.
    return next((v for k, v in results.items() if k.endswith("_top1")), None)


def _lost_peer(err: RuntimeError) -> None:
    """A failed collective (NCCL raises DistError; gloo a RuntimeError from its transport): one line, exit 5."""
    log.error("clip_train: error: rank %d lost contact with the other ranks (%s); one of them died or hung. "
              "Restart the job: it resumes from the newest checkpoint", launch_env().rank, reason(err))
    sys.exit(EXIT_PEER_LOST)


def main() -> None:
    # First thing: a preemption signal that arrives while Hydra composes the config must not kill us.
    preemption.install()
    preemption.install_terminate()
    preemption.install_interrupt()
    if _is_multirun(sys.argv) and launch_env().world_size > 1:
        sys.stderr.write(
            "clip_train: error: run Hydra sweeps (-m) outside torchrun and srun; every rank would run the whole "
            "sweep. Use `python -m clip_train -m ...` (each job starts its own ranks) or -m hydra/launcher=slurm\n"
        )
        sys.exit(EXIT_BAD_INPUT)
    renamed = renamed_key_error([a for a in sys.argv[1:] if not a.startswith("-")])
    if renamed is not None:  # every mode and rank (sweeps and ranks > 0 skip the pre-Hydra checks below)
        sys.stderr.write(f"clip_train: error: {renamed}\n")
        sys.exit(EXIT_BAD_INPUT)
    sys.argv = sys.argv[:1] + _quiet_non_zero_ranks(sys.argv[1:])
    if _plain_single_run(sys.argv[1:]) and launch_env().rank == 0:
        sys.argv = sys.argv[:1] + _check_and_lock(sys.argv[1:])
    try:
        hydra_main()
    finally:
        run_lock.release()


def _plain_single_run(overrides: list[str]) -> bool:
    """A single run with overrides only (no -m, --cfg, --help, --config-dir...): the pre-Hydra checks apply."""
    return not _is_multirun(overrides) and not any(arg.startswith("-") for arg in overrides)


def _check_and_lock(overrides: list[str]) -> list[str]:
    """Before Hydra writes anything: compose and validate the config, then take the run directory's lock.

    Any refusal is one line and exit 2, with nothing written (a second trainer on a live run's directory
    leaves that run's ``.hydra/``, metrics and checkpoints untouched). Returns the overrides with
    ``hydra.run.dir`` pinned to the directory now locked.
    """
    config_dir = CONFIG_PATH if CONFIG_PATH.startswith("pkg://") else str((Path(__file__).parent / CONFIG_PATH).resolve())
    try:
        checked = preflight.check(config_dir, CONFIG_NAME, overrides, launch_env().world_size)
        run_lock.hold(checked.run_dir, checked.config.train.lock_stale_after_s)
    except (ConfigError, run_lock.RunDirLocked) as err:
        sys.stderr.write(f"clip_train: error: {err}\n")
        sys.exit(EXIT_BAD_INPUT)
    except OSError as err:  # the run directory cannot be created or written (full disk, permissions)
        message = DiskFull.describe(err) if err.errno == errno.ENOSPC else f"cannot use the run directory: {err}"
        sys.stderr.write(f"clip_train: error: {message}\n")
        sys.exit(EXIT_DISK_FULL if err.errno == errno.ENOSPC else EXIT_BAD_INPUT)
    kept = [a for a in overrides if not a.lstrip("+").startswith("hydra.run.dir=")]
    return [*kept, preflight.run_dir_override(checked.run_dir)]


if __name__ == "__main__":
    main()
