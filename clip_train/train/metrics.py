"""One metrics processor with pluggable backends: ``metrics.jsonl``, the console, Weights & Biases.

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


class ConsoleBackend:
    """A progress line: step, loss, throughput and ETA."""

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
        done = step - self._start_step
        elapsed = time.monotonic() - self._start
        eta = elapsed / max(done, 1) * (self.max_steps - step)
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | temperature %.4f | %.0f samples/s | data wait %.0f%% | ETA %s",
            step,
            self.max_steps,
            _plain(metrics["loss"]),
            _plain(metrics.get("lr", 0.0)),
            _plain(metrics.get("temperature", 0.0)),
            _plain(metrics.get("samples_per_s", 0.0)),
            100 * _plain(metrics.get("data_wait_fraction", 0.0)),
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )

    def close(self) -> None:
        pass


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
