"""Submitting to and watching a real SLURM cluster from tests: sbatch, job state, the job's output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.cli_helpers import REPO, cli_env

SBATCH_SCRIPT = REPO / "launch" / "slurm.sbatch"
SLURM_LOCAL = REPO.parent / "shared" / "tools" / "slurm-local"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


def run(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def idle_nodes() -> int:
    """Nodes ``sinfo`` reports as usable (0 when there is no cluster)."""
    if shutil.which("sinfo") is None:
        return 0
    try:
        result = run(["sinfo", "-h", "-o", "%D %t"], timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return 0
    if result.returncode != 0:
        return 0
    usable = ("idle", "mix", "alloc", "comp")
    return sum(int(n) for n, state in (line.split() for line in result.stdout.splitlines() if line.strip())
               if state.rstrip("*~#") in usable)


def job_env(cache_dir: Path, nproc_per_node: int | None = None) -> dict[str, str]:
    """The environment a user has when calling sbatch: the venv's python first on PATH (sbatch exports it)."""
    env = cli_env(cache_dir)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("CLIP_TRAIN_NPROC_PER_NODE", None)
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)
    if nproc_per_node is not None:
        env["CLIP_TRAIN_NPROC_PER_NODE"] = str(nproc_per_node)
    return env


@dataclass
class Job:
    """A submitted batch job: its id, the directory it was submitted from, and its output file."""

    job_id: str
    submit_dir: Path

    @property
    def output(self) -> Path:
        return self.submit_dir / f"slurm-{self.job_id}.out"

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else "(no output file yet)"

    def info(self) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, StartTime, EndTime, ...)."""
        text = run(["scontrol", "show", "job", "-o", self.job_id], timeout=20).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def state(self) -> str:
        return self.info()["JobState"]

    def restarts(self) -> int:
        return int(self.info().get("Restarts", "0"))

    def wait(self, timeout: float, until: set[str] = FINAL_STATES) -> str:
        """Poll until the job reaches one of ``until``; cancel it and fail with its log on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state in until:
                return state
            time.sleep(1)
        self.cancel()
        raise AssertionError(f"job {self.job_id} still {state} after {timeout:.0f}s; log:\n{self.log()[-4000:]}")

    def cancel(self) -> None:
        run(["scancel", self.job_id], check=False)

    def accounting(self) -> list[dict[str, str]]:
        """Every run of the job (``sacct --duplicates``: a requeued job has one REQUEUED line per requeue)."""
        fields = ["JobID", "State", "Start", "End", "NNodes", "NTasks", "ExitCode"]
        text = run(["sacct", "-n", "-P", "-X", "--duplicates", "-j", self.job_id, "-o", ",".join(fields)]).stdout
        return [dict(zip(fields, line.split("|"))) for line in text.splitlines() if line.strip()]


def sbatch(args: list[str], overrides: list[str], submit_dir: Path, env: dict[str, str]) -> Job:
    """``sbatch [args] launch/slurm.sbatch [overrides]`` from ``submit_dir``."""
    submit_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["sbatch", "--parsable", *args, str(SBATCH_SCRIPT), *overrides], cwd=submit_dir,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
    return Job(result.stdout.strip().split(";")[0], submit_dir)


def wait_for_lines(path: Path, count: int, job: Job, timeout: float) -> None:
    """Wait until ``path`` (a metrics.jsonl) has ``count`` lines while the job runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if job.state() in FINAL_STATES:
            raise AssertionError(f"job {job.job_id} ended before {path} had {count} lines:\n{job.log()[-4000:]}")
        time.sleep(0.3)
    job.cancel()
    raise AssertionError(f"{path} did not reach {count} lines in {timeout:.0f}s:\n{job.log()[-4000:]}")
