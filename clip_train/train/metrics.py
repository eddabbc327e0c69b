"""One metrics processor with pluggable backends: ``metrics.jsonl``, the console, Weights & Biases, TensorBoard.

Only rank 0 builds backends; every other rank gets a processor that drops what it is given.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from clip_train.config import ConfigError, WandbConfig

log = logging.getLogger("clip_train")

METRICS_FILE = "metrics.jsonl"


class MetricsBackend(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _plain(value: Any) -> Any:
    """Python scalars from tensors and numpy scalars.

    A non-finite value stays a float: ``metrics.jsonl`` writes it as ``NaN`` / ``Infinity``, which Python's
    json, pandas and W&B read back as numbers (a diverging loss must stay plottable and comparable).
    """
    return value.item() if hasattr(value, "item") else value


class JsonlBackend:
    """Appends one JSON object per logged step to ``metrics.jsonl``, flushed at once (a kill loses nothing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - held open for the run, closed in close()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def truncate_metrics_after(path: Path, step: int) -> None:
    """Drop lines logged after ``step``: a resumed run re-logs them, so each step appears exactly once.

    Lines are appended in step order, so what goes is a tail: the file is cut in place (``os.truncate``),
    which needs no free space (a rerun on a full disk must get as far as its own clear error). Only a file
    whose kept lines are not a prefix (edited by hand) is rewritten through a temporary file.
    """
    if not path.is_file():
        return
    data = path.read_bytes()
    kept, offset, cut = [], 0, None
    for raw in data.splitlines(keepends=True):
        try:
            keep = json.loads(raw).get("step", 0) <= step and raw.endswith(b"\n")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            keep = False  # a line torn by a kill mid-write
        if keep:
            kept.append(raw)
            if cut is None:
                offset += len(raw)
        elif cut is None:
            cut = offset
    if cut is None:
        return
    if offset == sum(len(line) for line in kept):  # the kept lines are exactly the first `cut` bytes
        os.truncate(path, cut)
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)


def evaluation_at(path: Path, step: int) -> dict[str, float]:
    """The evaluation results logged at ``step`` (its lines without a training ``loss``), or {} when none."""
    results: dict[str, float] = {}
    if not path.is_file():
        return results
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step") == step and "loss" not in record:
            results.update({k: float(v) for k, v in record.items()
                            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return results


def _share(metrics: dict[str, Any], key: str) -> float:
    """``key``'s seconds as a percentage of the window's training time (``train_s``)."""
    total = _plain(metrics.get("train_s", 0.0)) or 0.0
    return 100.0 * (_plain(metrics.get(key, 0.0)) or 0.0) / total if total > 0 else 0.0


class ConsoleBackend:
    """A progress line: step, loss, throughput, where the step's time went, peak memory and ETA."""

    def __init__(self, max_steps: int, every_n_steps: int, start_step: int = 0) -> None:
        self.max_steps = max_steps
        self.every_n_steps = max(1, every_n_steps)
        self._start = time.monotonic()
        self._start_step = start_step

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if "loss" not in metrics:
            evals = ", ".join(f"{k} {_plain(v):.4f}" for k, v in metrics.items() if isinstance(_plain(v), float))
            log.info("step %d eval | %s", step, evals)
            return
        if step % self.every_n_steps and step != self.max_steps:
            return
        if "eta_s" in metrics:  # the trainer's estimate, which counts the evaluations and checkpoints to come
            eta = _plain(metrics["eta_s"])
        else:
            done = step - self._start_step
            eta = (time.monotonic() - self._start) / max(done, 1) * (self.max_steps - step)
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | temperature %.4f | %.0f samples/s | data wait %.0f%% | "
            "fwd+bwd %.0f%% | optim %.0f%% | comm %.0f%% | peak mem %.2f GiB | ETA %s",
            step,
            self.max_steps,
            _plain(metrics["loss"]),
            _plain(metrics.get("lr", 0.0)),
            _plain(metrics.get("temperature", 0.0)),
            _plain(metrics.get("samples_per_s", 0.0)),
            100 * _plain(metrics.get("data_wait_fraction", 0.0)),
            _share(metrics, "forward_backward_s"),
            _share(metrics, "optimizer_s"),
            _share(metrics, "comm_s"),
            _plain(metrics.get("peak_mem_gib", 0.0)),
            _format_duration(eta),
        )

    def close(self) -> None:
        pass


# WANDB_MODE values that wandb 0.17+ understands ("dryrun" and "run" are its old names for offline/online).
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")
# The project when neither logger.wandb.project nor WANDB_PROJECT names one (W&B's own is "uncategorized").
DEFAULT_WANDB_PROJECT = "clip_train"


@dataclass
class WandbInit:
    """The keyword arguments for ``wandb.init``: what the config sets, and None where the ``WANDB_*``
    environment (or W&B's own default) decides, because an explicit argument would override the environment."""

    mode: str | None
    project: str | None
    entity: str | None
    name: str | None
    group: str | None
    tags: list[str] | None
    dir: str | None
    id: str | None
    resume: str | None


def resolve_wandb_init(
    cfg: WandbConfig, run_dir: Path, run_id: str | None, environ: Mapping[str, str] | None = None
) -> WandbInit | None:
    """Merge ``logger.wandb`` with the standard ``WANDB_*`` environment; None when W&B is off.

    Precedence per setting: the config key when set, else the environment variable, else our default
    (mode ``logger.wandb.default_mode``, project ``clip_train``, name the run dir's name, files under the run
    dir). ``run_id`` is the id a resumed training run stored in its checkpoint; it wins over ``WANDB_RUN_ID``
    so the resumed run continues the same W&B run.
    """
    env = os.environ if environ is None else environ
    env_mode = env.get("WANDB_MODE") or None
    if env_mode is not None and env_mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={env_mode!r} is not one of {', '.join(WANDB_MODES)}; fix or unset it")
    if cfg.mode is not None:
        mode: str | None = cfg.mode
        effective = cfg.mode
    elif env_mode is not None:
        mode, effective = None, env_mode  # wandb reads WANDB_MODE itself
    else:
        mode = effective = cfg.default_mode
    if effective == "disabled":
        return None

    def unless_env(value: Any, variable: str, fallback: Any = None) -> Any:
        if value is not None:
            return value
        return None if env.get(variable) else fallback

    return WandbInit(
        mode=mode,
        project=unless_env(cfg.project, "WANDB_PROJECT", DEFAULT_WANDB_PROJECT),
        entity=cfg.entity,  # None: WANDB_ENTITY, else the account's default entity
        name=unless_env(cfg.name, "WANDB_NAME", run_dir.name),
        group=cfg.group,  # None: WANDB_RUN_GROUP
        tags=list(cfg.tags) if cfg.tags is not None else None,  # None: WANDB_TAGS (comma-separated)
        dir=unless_env(cfg.dir, "WANDB_DIR", str(run_dir)),
        id=run_id,  # None: WANDB_RUN_ID, else a new id, which the checkpoint then keeps
        resume=None if env.get("WANDB_RESUME") else "allow",
    )


def _format_duration(seconds: float) -> str:
    """``H:MM:SS``, with days in front past 24 hours (``2d 03:04:05``)."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {clock}" if days else clock


TENSORBOARD_DIR = "tensorboard"


class TensorboardBackend:
    """Every numeric value of each ``metrics.jsonl`` record as a TensorBoard scalar of the same name.

    Written by rank 0 under ``RUN_DIR/tensorboard/`` and flushed at every record. On resume, ``purge_step``
    tells TensorBoard to drop what an earlier attempt logged after the checkpoint, as ``metrics.jsonl`` does.
    """

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # ValueError: the CLI reports it in one line with exit code 2
            raise ValueError(
                "logger.tensorboard.enabled=true needs the tensorboard package: pip install tensorboard"
            ) from None

        self.log_dir = run_dir / TENSORBOARD_DIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            value = _plain(value)
            if isinstance(value, (int, float)):  # bools too, as 0/1
                self._writer.add_scalar(key, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbBackend:
    """A W&B run under the run dir, resumed (same id) when the training run resumes."""

    def __init__(self, settings: WandbInit, config: dict[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        if settings.dir is not None:
            Path(settings.dir).expanduser().mkdir(parents=True, exist_ok=True)  # logger.wandb.dir may be new
        try:
            self.run = wandb.init(**asdict(settings), config=config)
        except wandb.errors.UsageError as err:
            if "API key" not in str(err):
                raise
            # wandb raises this in online mode when no key is found and it cannot prompt (a batch job).
            raise ConfigError(
                "W&B is online but no API key is configured: run `wandb login` or set WANDB_API_KEY, or log "
                "locally with WANDB_MODE=offline (upload later with `wandb sync RUN_DIR/wandb/offline-run-*`)"
            ) from None

    @classmethod
    def from_config(
        cls, cfg: WandbConfig, run_dir: Path, config: dict[str, Any], run_id: str | None
    ) -> WandbBackend | None:
        """The backend ``logger.wandb`` and the ``WANDB_*`` environment ask for, or None when W&B is off."""
        settings = resolve_wandb_init(cfg, run_dir, run_id)
        return None if settings is None else cls(settings, config)

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsProcessor:
    """Fans each logged record out to the backends (rank 0 only)."""

    def __init__(self, backends: list[MetricsBackend] | None = None) -> None:
        self.backends = backends or []

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for backend in self.backends:
            backend.log(step, metrics)

    @property
    def wandb_run_id(self) -> str | None:
        for backend in self.backends:
            if isinstance(backend, WandbBackend):
                return backend.run_id
        return None

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
