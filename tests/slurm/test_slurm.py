"""The launch path on a real SLURM cluster (``make test-slurm``): two-node training, preemption by hand and by
time limit that requeues and resumes exactly, a requeued branch of another run, a crashing rank that fails
the job fast, and a submitit sweep.

Jobs run one after another: on a small shared machine, concurrent jobs only slow each other's start-up.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.cli_helpers import read_metrics, train_losses
from tests.slurm.slurm_helpers import (
    FINAL_STATES,
    Job,
    job_env,
    run,
    sbatch,
    wait_for_lines,
)

pytestmark = pytest.mark.slurm

STEPS = 20
FAST = ["+experiment=demo", "train.log_every_n_steps=1", "data.batch_size=8", "data.num_workers=0",
        "eval.zeroshot=[]", "ckpt.every_n_steps=0", "ckpt.keep_last=0"]
TWO_BY_TWO = FAST + [f"train.max_steps={STEPS}"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A demo dataset built once, before any rank needs it."""
    from clip_train.data.demo import DEMO_VERSION, ensure_demo_data

    root = tmp_path_factory.mktemp("cache")
    ensure_demo_data(str(root / f"demo-v{DEMO_VERSION}"))
    return root


def _sweep_job_ids(sweep_dir: Path) -> list[str]:
    """The array tasks (``<array id>_<index>``) submitit created for a sweep, by index."""
    found = sweep_dir / ".submitit"
    names = [p.name for p in found.iterdir() if re.fullmatch(r"\d+_\d+", p.name)] if found.is_dir() else []
    return sorted(names, key=lambda name: int(name.rsplit("_", 1)[1]))


@pytest.fixture(scope="module")
def root(slurm_cluster, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def reference(root: Path, cache_dir: Path) -> Job:
    """An uninterrupted 2 nodes x 2 processes run: the losses the preempted run must reproduce."""
    job = sbatch(["--nodes=2"], TWO_BY_TWO, root / "reference", job_env(cache_dir, 2))
    assert job.wait(timeout=600) == "COMPLETED", job.log()[-4000:]
    return job


def _run_dir(job: Job) -> Path:
    """The run directory the sbatch script derives from the job id when no hydra.run.dir is given."""
    return job.submit_dir / "outputs" / f"slurm-{job.job_id}"


def _training_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir) if "loss" in m]


def test_two_nodes_four_ranks_train_to_the_end(reference: Job) -> None:
    job = reference
    run_dir = _run_dir(job)
    assert "2 node(s) x 2 process(es)" in job.log()
    lines = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert all(m["world_size"] == 4 and m["global_batch_size"] == 32 for m in lines)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").resolve().name.endswith(f"{STEPS:09d}")
    nodes = {line["NNodes"] for line in job.accounting()}
    assert nodes == {"2"}


def test_usr2_checkpoints_requeues_and_resumes_with_the_same_losses(
        reference: Job, root: Path, cache_dir: Path) -> None:
    job = sbatch(["--nodes=2"], TWO_BY_TWO, root / "preempted", job_env(cache_dir, 2))
    run_dir = _run_dir(job)
    wait_for_lines(run_dir / "metrics.jsonl", 2, job, timeout=600)
    # As `--signal=USR2@120` delivers it at the time limit: to the job's steps, i.e. every rank.
    run(["scancel", "--signal=USR2", job.job_id])
    signalled_at = time.monotonic()
    assert job.wait(timeout=420) == "COMPLETED", job.log()[-4000:]

    log = job.log()
    assert job.restarts() == 1, log[-4000:]
    assert job.accounting()[0]["State"] == "REQUEUED"
    assert log.count("SIGUSR2 received") == 4, "every rank gets the signal"
    saved = [line for line in log.splitlines() if "preempted: checkpoint written at step" in line]
    assert saved, log[-4000:]
    step = int(saved[0].rsplit("step ", 1)[1].split(";")[0])
    assert 2 <= step < STEPS
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:09d}'} at step {step}" in log
    assert "restart 1" in log, "the requeued job ran the script again"
    assert _training_steps(run_dir) == list(range(1, STEPS + 1)), "every step exactly once"
    # Equal up to the last bit of float32: the logged loss is a mean over ranks, and gloo's all-reduce
    # across 4 ranks on 2 nodes may sum in a different order from run to run (measured: 1-ulp differences
    # at isolated steps, in the uninterrupted run too, with the steps after them equal again, so the
    # training state itself is identical).
    assert train_losses(run_dir) == pytest.approx(train_losses(_run_dir(reference)), rel=1e-6, abs=0)
    print(f"USR2 to completion after requeue: {time.monotonic() - signalled_at:.0f}s")


def test_a_requeued_cooldown_branch_continues_from_its_own_checkpoint(
        reference: Job, root: Path, cache_dir: Path) -> None:
    # The sbatch line names the run it branches from; the requeued job runs that same line again.
    source = _run_dir(reference) / "checkpoints" / f"step_{STEPS:09d}"
    branch = [*FAST, "data.batch_size=32", f"train.max_steps={2 * STEPS}", "optim.warmup_steps=2",
              "optim.schedule=const-cooldown", f"optim.cooldown_steps={STEPS}",
              f"ckpt.resume={source}"]  # one rank x 32: the reference's global batch
    job = sbatch(["--nodes=1"], branch, root / "branch", job_env(cache_dir, 1))
    run_dir = _run_dir(job)
    wait_for_lines(run_dir / "metrics.jsonl", 2, job, timeout=600)
    run(["scancel", "--signal=USR2", job.job_id])
    assert job.wait(timeout=420) == "COMPLETED", job.log()[-4000:]

    log = job.log()
    assert job.restarts() == 1, log[-4000:]
    assert f"resumed from {source} at step {STEPS}" in log and "another run's checkpoint" in log
    assert "this run dir has its own: continuing from" in log, "the requeued branch kept its own steps"
    assert _training_steps(run_dir) == list(range(STEPS + 1, 2 * STEPS + 1)), "every branch step exactly once"
    assert not (run_dir / "checkpoints" / "abandoned").exists()
    lrs = [m["lr"] for m in read_metrics(run_dir) if "loss" in m]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cooled down to 0
    assert _training_steps(_run_dir(reference)) == list(range(1, STEPS + 1)), "the source run is untouched"


def test_time_limit_signal_requeues_and_resumes(root: Path, cache_dir: Path) -> None:
    # --time=3 with the script's USR2@120: SLURM sends it when at most 150 s are left, checking every 30 s,
    # so 30-60 s into the job. max_steps is out of reach: only the time limit stops this run.
    job = sbatch(["--nodes=1", "--time=3"], FAST + ["train.max_steps=100000"], root / "time_limit",
                 job_env(cache_dir, 1))
    run_dir = _run_dir(job)
    deadline = time.monotonic() + 400
    while job.restarts() < 1:
        assert time.monotonic() < deadline, f"no requeue from the time limit:\n{job.log()[-4000:]}"
        assert job.state() not in FINAL_STATES, job.log()[-4000:]
        time.sleep(2)
    # The requeued run would get the same 3 minutes (and the same warning); give it room to show it resumes.
    run(["scontrol", "update", f"JobId={job.job_id}", "TimeLimit=30"])
    first_run = job.accounting()[0]
    assert first_run["State"] == "REQUEUED", job.accounting()
    ran_for = datetime.fromisoformat(first_run["End"]) - datetime.fromisoformat(first_run["Start"])
    assert ran_for.total_seconds() < 3 * 60, "it stopped before the limit, not at it"

    # The requeued job resumes in the same run dir; a few more steps prove it trains on, then stop it.
    deadline = time.monotonic() + 300
    while "resumed from" not in job.log():
        assert time.monotonic() < deadline, job.log()[-4000:]
        assert job.state() not in FINAL_STATES, job.log()[-4000:]
        time.sleep(1)
    log = job.log()
    step = int(log.split("resumed from", 1)[1].split(" at step ")[1].split()[0])
    wait_for_lines(run_dir / "metrics.jsonl", step + 3, job, timeout=300)
    job.cancel()

    assert "SIGUSR2 received" in log and "requeued SLURM job" in log
    complete = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]  # a killed writer may leave half a line
    steps = [json.loads(line)["step"] for line in complete]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= step + 3, "every step exactly once"


def test_a_crashing_rank_fails_the_job_within_a_minute(root: Path, cache_dir: Path) -> None:
    demo_train = min(cache_dir.glob("demo-v*/train"))
    per_node = root / "per_node_shards"
    per_node.mkdir()
    (per_node / "node1").symlink_to(demo_train)  # node2 has no shards: its rank fails, node1's would wait
    shards = sorted(p.stem for p in demo_train.glob("*.tar"))
    pattern = f"{per_node}/${{oc.env:SLURMD_NODENAME}}/{{{shards[0]}..{shards[-1]}}}.tar"
    job = sbatch(["--nodes=2"], FAST + ["train.max_steps=20", f"data.train_shards='{pattern}'"],
                 root / "crash", job_env(cache_dir, 1))
    deadline = time.monotonic() + 600
    while "matched no files" not in job.log():
        assert time.monotonic() < deadline, job.log()[-4000:]
        if job.state() in FINAL_STATES:
            break
        time.sleep(0.5)
    seen_crash = datetime.now()
    assert job.wait(timeout=120) == "FAILED", job.log()[-4000:]
    log = job.log()
    assert "per_node_shards/node2/" in log and "matched no files" in log, log[-4000:]
    ended = datetime.fromisoformat(job.info()["EndTime"])
    assert (ended - seen_crash).total_seconds() < 60, "the job waited on after its rank crashed"
    assert not (_run_dir(job) / "metrics.jsonl").exists()


def test_submitit_sweep_runs_each_point_on_two_nodes_and_resumes_after_usr2(root: Path, cache_dir: Path) -> None:
    sweep_dir = root / "sweep"
    sweep_log = root / "sweep.log"
    with open(sweep_log, "w") as out:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "clip_train", "-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
             "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=0", "hydra.launcher.timeout_min=10",
             *FAST, f"train.max_steps={STEPS}", "loss.temperature=0.1,0.05", f"hydra.sweep.dir={sweep_dir}"],
            cwd=root, env=job_env(cache_dir), stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        _check_sweep(sweep, sweep_dir, sweep_log)
    finally:
        if sweep.poll() is None:
            sweep.terminate()
            for job_id in _sweep_job_ids(sweep_dir):
                run(["scancel", job_id], check=False)


def _check_sweep(sweep: subprocess.Popen, sweep_dir: Path, sweep_log: Path) -> None:
    # Preempt the first sweep point mid-run: submitit must requeue it and it must resume.
    first = sweep_dir / "0" / "metrics.jsonl"
    deadline = time.monotonic() + 420
    while not (first.exists() and len(first.read_text().splitlines()) >= 3):
        assert sweep.poll() is None, sweep_log.read_text()[-4000:]
        assert time.monotonic() < deadline, sweep_log.read_text()[-4000:]
        time.sleep(0.3)
    ids = _sweep_job_ids(sweep_dir)
    assert len(ids) == 2, ids
    run(["scancel", "--signal=USR2", ids[0]])
    assert sweep.wait(timeout=600) == 0, sweep_log.read_text()[-4000:]

    for index, temperature in enumerate([0.1, 0.05]):
        run_dir = sweep_dir / str(index)
        lines = [m for m in read_metrics(run_dir) if "loss" in m]
        assert [m["step"] for m in lines] == list(range(1, STEPS + 1)), f"sweep point {index}"
        assert all(m["world_size"] == 2 and m["global_batch_size"] == 16 for m in lines)
        assert f"temperature: {temperature}" in (run_dir / ".hydra" / "config.yaml").read_text()
        accounting = Job(ids[index], sweep_dir).accounting()
        assert {r["NNodes"] for r in accounting} == {"2"}
    requeued = Job(ids[0], sweep_dir)
    # submitit reports a result as soon as the task writes it, while the job may still be tearing down.
    assert requeued.wait(timeout=120) == "COMPLETED" and requeued.restarts() == 1
    assert requeued.accounting()[0]["State"] == "REQUEUED"
    assert "resumed from" in (sweep_dir / "0" / "__main__.log").read_text()

