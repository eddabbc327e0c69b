"""torch.profiler traces of chosen training steps, on request: by config or by a signal to a running rank.

``train.profile.steps=[START,END]`` profiles steps START to END; ``kill -URG PID`` (or ``scancel
--signal=URG JOB``) makes the rank that receives it profile its next ``train.profile.signal_steps`` steps.
Each rank writes its own Chrome trace, ``RUN_DIR/profile/trace_steps<START>-<END>_rank<R>.json`` (open it
in https://ui.perfetto.dev or chrome://tracing), and on CUDA a memory snapshot of the same steps,
``memory_steps<START>-<END>_rank<R>.pickle`` (drag it onto https://pytorch.org/memory_viz). The step's regions
carry ``record_function`` labels: ``data``, ``forward``, ``loss``, ``backward``, ``optimizer`` (and
``forward_backward``, ``comm``, ``eval``, ``checkpoint``).

Why SIGURG: SIGUSR1 belongs to NCCL and other tools, SIGUSR2 is our preemption signal (``preemption.py``),
SIGTERM/SIGINT stop the run, SIGPROF drives sampling profilers (py-spy, scalene, gprof), SIGWINCH arrives
whenever a terminal is resized, and the real-time signals terminate any process without a handler. SIGURG's
default action is to *ignore* it, and nothing in a training job uses it (it reports out-of-band socket
data only to processes that ask for it with ``F_SETOWN``): a SIGURG that reaches a DataLoader worker, a
torchrun agent or the batch shell does nothing, so sending it to a whole job is safe.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from clip_train.config import ProfileConfig

log = logging.getLogger("clip_train")

PROFILE_SIGNAL = signal.SIGURG
PROFILE_DIR = "profile"
MEMORY_HISTORY_ENTRIES = 100_000
"""Allocator events kept for the CUDA memory snapshot (the newest ones win)."""


def trace_path(run_dir: Path, first: int, last: int, rank: int) -> Path:
    return run_dir / PROFILE_DIR / f"trace_steps{first}-{last}_rank{rank}.json"


def memory_snapshot_path(run_dir: Path, first: int, last: int, rank: int) -> Path:
    return run_dir / PROFILE_DIR / f"memory_steps{first}-{last}_rank{rank}.pickle"


class OnDemandProfiler:
    """Starts ``torch.profiler`` before a chosen step and writes the trace after the last one.

    The loop calls :meth:`before_step` with the number of the step about to run and :meth:`after_step` with
    the step just finished; :meth:`close` writes a trace still being recorded (the run stopped early).
    """

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device, max_steps: int) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.rank = rank
        self.device = device
        self.max_steps = max_steps
        self.written: list[Path] = []
        self._configured_done = False
        self._requested = False
        self._profile: torch.profiler.profile | None = None
        self._window: tuple[int, int] = (0, 0)
        self._previous_handler: Any = None
        self._installed_in: int | None = None

    # ------------------------------------------------------------------ the signal

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._installed_in:  # a forked DataLoader worker inherited the handler
            return
        self._requested = True
        # os.write, not logging: the handler may interrupt code that holds the logging lock.
        os.write(2, f"clip_train: SIGURG received; profiling the next {self.cfg.signal_steps} steps\n".encode())

    def install_signal(self) -> None:
        """Take SIGURG as a request for a trace (main thread only; ``signal_steps=0`` leaves it alone)."""
        if self.cfg.signal_steps <= 0 or threading.current_thread() is not threading.main_thread():
            return
        self._installed_in = os.getpid()
        self._previous_handler = signal.signal(PROFILE_SIGNAL, self._on_signal)

    def restore_signal(self) -> None:
        if self._installed_in is not None and threading.current_thread() is threading.main_thread():
            signal.signal(PROFILE_SIGNAL, self._previous_handler or signal.SIG_DFL)  # SIG_DFL: ignored
            self._installed_in = None

    # ------------------------------------------------------------------ the loop's calls

    def before_step(self, step: int) -> None:
        if self._profile is not None:
            return
        steps = self.cfg.steps
        if steps is not None and not self._configured_done and steps[0] <= step <= steps[1]:
            self._configured_done = True
            self._start(step, steps[1])
        elif self._requested:
            self._requested = False
            self._start(step, min(step + self.cfg.signal_steps - 1, self.max_steps))

    def after_step(self, step: int) -> None:
        if self._profile is not None and step >= self._window[1]:
            self._stop(step)

    def close(self, step: int) -> None:
        """Write the trace being recorded, if any (ends at ``step``, the last step that ran)."""
        if self._profile is not None:
            self._stop(step)

    # ------------------------------------------------------------------ start / stop

    def _start(self, first: int, last: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type != "cuda":
            # Kineto logs "ERROR: gpuGetDeviceCount failed" on every CPU-only stop; it is not an error here.
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        else:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.cfg.memory_snapshot:
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._profile = torch.profiler.profile(
            activities=activities, record_shapes=self.cfg.record_shapes, with_stack=self.cfg.with_stack,
        )
        self._profile.start()
        self._window = (first, last)
        log.info("profiling steps %d-%d (rank %d)", first, last, self.rank)

    def _stop(self, step: int) -> None:
        profile, self._profile = self._profile, None
        assert profile is not None
        profile.stop()
        first = self._window[0]
        path = trace_path(self.run_dir, first, step, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        profile.export_chrome_trace(str(partial))
        os.replace(partial, path)  # whole or absent: a reader never sees a half-written trace
        self.written.append(path)
        if self.device.type == "cuda" and self.cfg.memory_snapshot:
            snapshot = memory_snapshot_path(self.run_dir, first, step, self.rank)
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)
        log.info("profiler trace of steps %d-%d written to %s (open in https://ui.perfetto.dev)", first, step, path)
