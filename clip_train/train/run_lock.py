"""One writer per run directory: a lease file that rank 0 holds for the whole run.

Two trainers writing one run directory (a requeued job while the old one lingers on a dead node, a
double submission) interleave ``metrics.jsonl`` and race on checkpoints. So rank 0 takes a lease before
anything in the run directory is written, and keeps it until the run ends.

The lease is the file ``clip_train.lock`` in the run directory, created with ``O_CREAT | O_EXCL`` (atomic
on local file systems and on NFSv3+/Lustre, unlike ``flock``, which NFS may not propagate between
clients). It holds JSON naming the holder (host, pid, process start time, SLURM job id, torchrun run id,
start time, a random token). The holder's heartbeat is the file's modification time, refreshed by a
daemon thread every ``stale_after_s / 4`` seconds (capped at 30 s) with ``os.utime``, which needs no free
space, so a full disk cannot make a live run look dead.

A lease is taken over (with a warning) when its holder is gone:

- the same SLURM job id (a requeued job, same id) or torchrun run id (an elastic restart) as ours: at once;
- the same host and a pid that is no longer running (or now belongs to another process): at once;
- a heartbeat older than ``stale_after_s`` (a holder on another host that died): then.

Takeover renames the old lease aside (only one contender's rename succeeds) and creates a fresh one
with ``O_EXCL``, so two trainers racing for a stale lease still end with one holder. The hosts' clocks must
agree to well within ``stale_after_s``. The holder checks the token on every heartbeat: if another trainer
took the lease over (its heartbeat stalled for longer than the timeout), :func:`RunLock.lost` becomes
true and the trainer stops before writing again.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("clip_train")

LOCK_FILE = "clip_train.lock"


class RunDirLocked(RuntimeError):
    """The run directory is held by another live trainer."""


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)": state is field 3, starttime field 22


def _pid_alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    if start_time is not None and Path("/proc").is_dir():
        return _process_start_time(pid) == start_time
    return True


def _identity() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start_time(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "token": secrets.token_hex(8),
    }


@dataclass
class Holder:
    """What a lease file says about the trainer holding it, and how old its heartbeat is."""

    info: dict[str, Any]
    heartbeat_age_s: float

    def describe(self) -> str:
        info = self.info
        job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
        return (f"host {info.get('host', '?')} pid {info.get('pid', '?')}{job}, started {info.get('started', '?')}, "
                f"heartbeat {self.heartbeat_age_s:.0f} s ago")


def read_holder(path: Path) -> Holder | None:
    """The lease at ``path`` (None if there is none). An unreadable one counts as a holder of unknown identity."""
    try:
        with open(path, encoding="utf-8") as f:
            age = time.time() - os.fstat(f.fileno()).st_mtime
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = {}
    if not isinstance(info, dict):  # damaged (a lease is never half-written): only the heartbeat retires it
        info = {}
    return Holder(info=info, heartbeat_age_s=max(0.0, age))


def takeover_reason(holder: Holder, me: dict[str, Any], stale_after_s: float) -> str | None:
    """Why ``holder`` may be replaced by ``me`` (None: it is live and keeps the directory)."""
    info = holder.info
    if me.get("slurm_job_id") and info.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it was held by this same SLURM job {me['slurm_job_id']} before a requeue or restart"
    if me.get("torchelastic_run_id") and info.get("torchelastic_run_id") == me["torchelastic_run_id"]:
        return "it was held by this same torchrun job before an elastic restart"
    same_host = info.get("host") == me["host"] and isinstance(info.get("pid"), int)
    if same_host and not _pid_alive(info["pid"], info.get("pid_start")):
        return f"its process {info['pid']} on this host is no longer running"
    if holder.heartbeat_age_s > stale_after_s:
        return f"its heartbeat is {holder.heartbeat_age_s:.0f} s old (more than {stale_after_s:g} s)"
    return None


class RunLock:
    """The lease on one run directory, held from :meth:`acquire` until :meth:`release`."""

    def __init__(self, run_dir: Path, stale_after_s: float = 600.0) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.stale_after_s = stale_after_s
        self.identity = _identity()
        self._held = False
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------- taking it
    def _create(self) -> bool:
        """Create the lease with O_EXCL; False if one exists. The contents are written before anyone can
        see a half-written file: a unique temporary is filled, then hard-linked into place (link fails
        if the name exists, atomically, on NFS too)."""
        tmp = self.run_dir / f".{LOCK_FILE}.{self.identity['token']}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, (json.dumps(self.identity) + "\n").encode())
            os.fsync(fd)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: plain O_EXCL on the lease itself
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.identity) + "\n")
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _retire(self, holder: Holder) -> None:
        """Move a dead holder's lease aside, unless another contender got there first."""
        aside = self.run_dir / f".{LOCK_FILE}.stale.{self.identity['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else retired it; the O_EXCL create decides who holds it now
        moved = read_holder(aside)
        if moved is not None and moved.info.get("token") != holder.info.get("token"):
            # Between our read and our rename another contender replaced the dead lease with its live one.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the lease, or raise :class:`RunDirLocked` naming the live holder. Touches nothing else."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._held = True
                self._start_heartbeat()
                return
            holder = read_holder(self.path)
            if holder is None:
                continue  # released between our attempt and our read
            reason = takeover_reason(holder, self.identity, self.stale_after_s)
            if reason is None:
                raise RunDirLocked(
                    f"run directory {self.run_dir} is in use by another trainer ({holder.describe()}); wait for it "
                    f"to finish, stop it, or choose another hydra.run.dir (a lock whose heartbeat is older than "
                    f"train.lock_stale_after_s={self.stale_after_s:g} s is taken over; the lock is {self.path})"
                )
            log.warning("taking over the lock on %s from %s: %s", self.run_dir, holder.describe(), reason)
            self._retire(holder)
        raise RunDirLocked(f"could not take the lock {self.path}: other trainers keep racing for it")

    # ------------------------------------------------------------------------------------------ holding
    def _still_mine(self) -> bool:
        holder = read_holder(self.path)
        return holder is not None and holder.info.get("token") == self.identity["token"]

    def _heartbeat(self) -> None:
        interval = min(30.0, self.stale_after_s / 4)
        while not self._stop.wait(interval):
            try:
                if not self._still_mine():
                    self._lost = True
                    os.write(2, f"clip_train: another trainer took over the lock {self.path}\n".encode())
                    return
                os.utime(self.path)
            except OSError:
                continue  # a transient file system error; the next beat tries again

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="clip_train-run-lock", daemon=True)
        self._thread.start()

    def lost(self) -> bool:
        """True once another trainer has taken the lease over (this one must stop writing)."""
        return self._lost

    @property
    def held(self) -> bool:
        return self._held and not self._lost

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, if it is still ours."""
        self._stop.set()
        if self._held and not self._lost:
            try:
                if self._still_mine():
                    self.path.unlink(missing_ok=True)
            except OSError:
                pass  # the next trainer takes a leftover lease over (same host, dead pid)
        self._held = False


_current: RunLock | None = None


def hold(run_dir: Path, stale_after_s: float) -> RunLock:
    """Take the lease on ``run_dir`` for this process, unless it already holds it (idempotent)."""
    global _current
    run_dir = Path(run_dir).resolve()
    if _current is not None and _current.held and _current.run_dir == run_dir:
        return _current
    lock = RunLock(run_dir, stale_after_s)
    lock.acquire()
    _current = lock
    return lock


def current() -> RunLock | None:
    """The lease this process holds, if any."""
    return _current


def release() -> None:
    """Release this process's lease (at the end of the run)."""
    global _current
    if _current is not None:
        _current.release()
        _current = None
