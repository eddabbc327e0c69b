"""One metrics processor with pluggable backends: ``metrics.jsonl``, the console, Weights & Biases, TensorBoard.

Only rank 0 builds backends; every other rank gets a processor that drops what it is given.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

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
        self._file = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def truncate_metrics_after(path: Path, step: int) -> None:
    """Drop lines logged after ``step``: a resumed run re-logs them, so each step appears exactly once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


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

    def __init__(self, run_dir: Path, mode: str, project: str, entity: str | None, name: str | None,
                 tags: list[str], config: dict[str, Any], run_id: str | None) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            dir=str(run_dir),
            mode=mode,
            project=project,
            entity=entity,
            name=name or run_dir.name,
            tags=tags,
            config=config,
            id=run_id,  # None: W&B makes a new id, which the checkpoint then keeps
            resume="allow",
        )

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
