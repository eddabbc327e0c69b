"""Preemption: the scheduler's warning signal becomes a checkpoint at a step boundary, then a requeue.

SLURM sends SIGUSR2 some time before it stops a job (``--signal=USR2@120`` in ``launch/slurm.sbatch``,
submitit's ``signal_delay_s``, or ``scancel --signal=USR2 JOB`` by hand). USR2 rather than USR1 because
NCCL claims SIGUSR1 for itself. The handler only sets a flag: the Trainer checks it once per step,
agrees on it across ranks (``any_rank``) so every rank stops after the *same* step, saves a checkpoint
and raises :class:`Preempted`. ``python -m clip_train`` then calls :func:`hand_off`, which brings the job
back: submitit's own handler when submitit launched us, ``scontrol requeue`` from rank 0 under any other
SLURM job, or exit code :data:`EXIT_PREEMPTED` elsewhere (so ``torchrun --max-restarts`` or a wrapper
script can restart, and ``ckpt.resume=auto`` continues from the checkpoint).

Under SLURM every rank exits 0 after the requeue: srun's ``--kill-on-bad-exit`` would otherwise kill
rank 0 on the first non-zero exit of a peer, possibly before it has requeued the job.

SIGINT (Ctrl-C) is taken like SIGTERM and ends with :data:`EXIT_INTERRUPTED` (130); a second SIGINT exits
at once (a save in progress is abandoned as its temporary directory, never torn).

SIGTERM (a time limit, ``scancel``, torchrun shutting its workers down; torchrun escalates to SIGKILL
after 30 s) is taken the same way, up to the checkpoint, but then ends with :data:`EXIT_PREEMPTED` on
every rank without requeueing: a user's ``scancel`` must stay cancelled, and SLURM requeues a job it
preempts by itself when the partition is set up to.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("clip_train")

PREEMPT_SIGNAL = signal.SIGUSR2
EXIT_PREEMPTED = 3
"""Exit code of a run stopped by the preemption signal after writing its checkpoint, outside SLURM."""
EXIT_INTERRUPTED = 130
"""Exit code of a run stopped by Ctrl-C (SIGINT) after writing its checkpoint: 128 + SIGINT, as shells report."""

_received = False
_terminated = False
_interrupted = False
_previous: Any = None


class Preempted(Exception):
    """The run stopped early on the preemption signal; its checkpoint for ``step`` is complete on disk."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted: checkpoint written at step {step}")
        self.step = step


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = True
    # os.write, not logging: a signal handler may interrupt code that holds the logging lock.
    os.write(2, f"clip_train: {signal.Signals(signum).name} received; checkpointing after this step\n".encode())


def install() -> None:
    """Handle the preemption signal from now on (idempotent; main thread only).

    Whatever handled it before, submitit's requeue handler in particular, is kept and called by
    :func:`hand_off` once the checkpoint is written, instead of running mid-step with nothing saved.
    """
    global _previous, _received
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(PREEMPT_SIGNAL)
    if current is _on_signal:
        return
    _previous, _received = current, False
    signal.signal(PREEMPT_SIGNAL, _on_signal)
    # launch/slurm.sbatch starts ranks with the signal blocked, so one that SLURM sends while Python is
    # still importing torch waits, pending, until this handler can take it (instead of killing the rank).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {PREEMPT_SIGNAL})


def disarm() -> None:
    """Training is over, so a late signal has nothing left to checkpoint: ignore it from now on.

    Not the default action: Python restores that during interpreter shutdown, and a USR2 arriving then
    (a time-limit warning as the run finishes) would kill a rank by signal and fail a finished job.
    A handler that was there before us (submitit's) gets the signal back.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(PREEMPT_SIGNAL) is _on_signal:
        signal.signal(PREEMPT_SIGNAL, _previous if callable(_previous) else signal.SIG_IGN)
    # The same for SIGTERM: once the checkpoint is written and the exit code chosen, a repeated SIGTERM
    # must not turn that exit into death by signal (torchrun still escalates to SIGKILL if we linger).
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_terminate:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # SIGINT keeps its handler: a first Ctrl-C now has nothing to wait for and is ignored, a second one
    # exits at once (never a KeyboardInterrupt traceback from the interpreter's shutdown).


def requested() -> bool:
    """Whether this process has received the preemption signal, SIGTERM or SIGINT."""
    return _received or _terminated or _interrupted


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    if _interrupted:
        # A second Ctrl-C: stop now. A save in progress is only ever a .tmp-step_* directory until its
        # atomic rename, so leaving mid-save loses that save, never an earlier checkpoint.
        os.write(2, b"clip_train: second SIGINT; exiting now without waiting for the checkpoint\n")
        os._exit(EXIT_INTERRUPTED)
    _interrupted = True
    os.write(2, b"clip_train: SIGINT received; checkpointing after this step, then exiting (Ctrl-C again to "
                b"exit at once)\n")


def install_interrupt() -> None:
    """Take Ctrl-C (SIGINT) like SIGTERM: checkpoint at the next step boundary, then exit 130 (main thread).

    Instead of Python's KeyboardInterrupt, which would unwind from wherever the step was, with no checkpoint.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_interrupt)


def interrupted() -> bool:
    return _interrupted


def _on_terminate(signum: int, frame: FrameType | None) -> None:
    global _terminated
    _terminated = True
    os.write(2, b"clip_train: SIGTERM received; checkpointing after this step, then exiting\n")


def install_terminate() -> None:
    """Take SIGTERM as a request to checkpoint at the next step boundary and exit (main thread only).

    A second SIGTERM while the checkpoint is written only sets the flag again, so it cannot tear the save.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_terminate)


def requeue_slurm_job(job_id: str) -> None:
    """``scontrol requeue``: SLURM ends this run of the job and queues it again under the same id."""
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RuntimeError("scontrol is not on PATH, so the job cannot requeue itself") from None
    except subprocess.CalledProcessError as err:
        reason = (err.stderr or err.stdout or "").strip().splitlines()
        raise RuntimeError(
            f"scontrol requeue {job_id} failed ({reason[-1] if reason else f'exit {err.returncode}'}); "
            "submit with --requeue, or resubmit by hand: the run resumes from its checkpoint"
        ) from None


def hand_off(rank: int) -> None:
    """After the preemption checkpoint (and the process group's teardown): make the run come back.

    Returns on ranks that should simply end with exit code 0; exits the process otherwise.
    """
    if _interrupted:  # Ctrl-C: the user stops the run; never requeue
        sys.exit(EXIT_INTERRUPTED)
    if _terminated and not _received:  # SIGTERM alone: stop with the checkpoint, never requeue on our own
        sys.exit(EXIT_PREEMPTED)
    if callable(_previous):
        # submitit: rank 0's handler pickles the job again, requeues it and exits; other ranks just end.
        if rank == 0:
            _previous(PREEMPT_SIGNAL, None)
        return
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        if rank == 0:
            try:
                requeue_slurm_job(job_id)
            except RuntimeError as err:
                log.error("clip_train: error: %s", err)
                sys.exit(EXIT_PREEMPTED)
            log.info("requeued SLURM job %s; it resumes from the checkpoint in the same run directory", job_id)
        return
    sys.exit(EXIT_PREEMPTED)
