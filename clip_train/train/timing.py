"""Where a training step's time goes, measured without adding a host sync to the steps that are not logged.

:class:`StepTimer` times named regions of the step. On a GPU each region records a pair of CUDA events
on the current stream (asynchronous: the host does not wait) and the events are read only when a window is
collected, on a logging step that synchronises anyway; the region's time is then the GPU stream's time
between the two events. On a CPU every operation is synchronous, so the wall clock at the region's edges is
exact. Host-side waits (the data loader, evaluation, checkpointing) are always wall clock.

Every region is also a ``torch.profiler.record_function`` label, so a profiler trace names the same parts.

:class:`EtaEstimator` turns the clean step time and the measured evaluation and checkpoint durations into
an ETA that counts the evaluations and checkpoints still to come.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch.profiler import record_function


class LapLabels:
    """``record_function`` labels for straight-line code: :meth:`begin` ends the previous label and starts the next.

    Outside a profiler each label costs microseconds; inside one it names the region in the trace.
    """

    def __init__(self) -> None:
        self._open: record_function | None = None

    def begin(self, name: str) -> None:
        self.end()
        self._open = record_function(name)
        self._open.__enter__()

    def end(self) -> None:
        if self._open is not None:
            label, self._open = self._open, None
            label.__exit__(None, None, None)


class StepTimer:
    """Sums the time of named regions over a logging window; :meth:`collect` returns and resets the sums."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._spare: list[torch.cuda.Event] = []
        self._lap: tuple[str, Any] | None = None
        self._labels = LapLabels()

    def _event(self) -> torch.cuda.Event:
        event = self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Device work enqueued inside the block counts towards ``name`` (GPU: CUDA events; CPU: wall clock)."""
        with record_function(name):
            if self.cuda:
                start = self._event()
                try:
                    yield
                finally:
                    # Appending from autograd's device thread (a collective in backward) is safe under the GIL.
                    self._pending.append((name, start, self._event()))
            else:
                began = time.perf_counter()
                try:
                    yield
                finally:
                    self._host[name] += time.perf_counter() - began

    def begin(self, name: str) -> None:
        """Start region ``name``, ending the one :meth:`begin` started before (a lap timer for straight code)."""
        self.end()
        self._labels.begin(name)
        self._lap = (name, self._event() if self.cuda else time.perf_counter())

    def end(self) -> None:
        """End the region :meth:`begin` started, if any."""
        if self._lap is None:
            return
        name, start = self._lap
        self._lap = None
        if self.cuda:
            self._pending.append((name, start, self._event()))
        else:
            self._host[name] += time.perf_counter() - start
        self._labels.end()

    @contextlib.contextmanager
    def host_region(self, name: str) -> Iterator[None]:
        """Wall-clock time of the block towards ``name``: for waits on the host (data, eval, checkpoint)."""
        with record_function(name):
            began = time.perf_counter()
            try:
                yield
            finally:
                self._host[name] += time.perf_counter() - began

    def collect(self) -> dict[str, float]:
        """Seconds per region since the last call (one host sync on a GPU: call on logging steps only)."""
        totals = dict(self._host)
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                totals[name] = totals.get(name, 0.0) + start.elapsed_time(end) / 1000.0
                self._spare += (start, end)
        self._pending.clear()
        self._host.clear()
        return totals


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: the CUDA caching allocator's peak on a GPU, the peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def scheduled_between(after: int, up_to: int, every: int, last: int) -> int:
    """How many steps in ``(after, up_to]`` are multiples of ``every`` (0: none) or the final step ``last``."""
    count = (up_to // every - after // every) if every > 0 else 0
    if after < last <= up_to and (every <= 0 or last % every):
        count += 1
    return count


class EtaEstimator:
    """Remaining time = remaining steps x mean clean step time + remaining evals / checkpoints x their mean.

    Evaluations and checkpoints are counted once one of each has been timed (before that their cost is
    unknown and counts as zero).
    """

    def __init__(self, max_steps: int, start_step: int, eval_every: int | None, ckpt_every: int) -> None:
        self.max_steps = max_steps
        self.start_step = start_step
        self.eval_every = eval_every  # None: this run does not evaluate
        self.ckpt_every = ckpt_every
        self.train_s = 0.0
        self._durations: dict[str, list[float]] = {"eval": [], "checkpoint": []}

    def add_train(self, seconds: float) -> None:
        self.train_s += seconds

    def add(self, kind: str, seconds: float) -> None:
        """One evaluation (``eval``) or checkpoint (``checkpoint``) took ``seconds``."""
        self._durations[kind].append(seconds)

    def total(self, kind: str) -> float:
        """Seconds spent in every ``eval`` or ``checkpoint`` timed so far."""
        return sum(self._durations[kind])

    def _mean(self, kind: str) -> float:
        values = self._durations[kind]
        return sum(values) / len(values) if values else 0.0

    def eta_s(self, step: int) -> float:
        done = max(step - self.start_step, 1)
        remaining = self.max_steps - step
        eta = self.train_s / done * remaining
        if self.eval_every is not None:
            eta += self._mean("eval") * scheduled_between(step, self.max_steps, self.eval_every, self.max_steps)
        eta += self._mean("checkpoint") * scheduled_between(step, self.max_steps, self.ckpt_every, self.max_steps)
        return eta
