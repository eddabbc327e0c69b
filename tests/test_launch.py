"""Launch without a cluster: the scripts' command lines from fake SLURM variables, SLURM-derived ranks,
preemption hand-off, local sweeps (4-job multirun, configs/sweep/), the SLURM launcher config, and a
run through submitit's local executor. The real cluster is in tests/slurm/ (``make test-slurm``)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clip_train.train import preemption
from clip_train.train.distributed import first_hostname, launch_env, slurm_master_port
from tests.cli_helpers import FAST_DEMO, REPO, cli_env, read_metrics, run_cli

SBATCH = REPO / "launch" / "slurm.sbatch"
TORCHRUN = REPO / "launch" / "torchrun.sh"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ---------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN])
def test_scripts_parse(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    assert os.access(script, os.X_OK)


def _render(script: Path, env: dict[str, str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CLIP_TRAIN_", "MASTER_", "NNODES"))}
    return subprocess.run(["bash", str(script), *args], env={**clean, "CLIP_TRAIN_DRY_RUN": "1", **env},
                          cwd=cwd, capture_output=True, text=True, check=False, timeout=30)


def _command(output: str, prefix: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith((prefix + "srun ", prefix + "python ")))
    return shlex.split(line[len(prefix):])


BRACES = "data.train_shards='/data/laion/{00000..41407}.tar'"


def test_sbatch_renders_one_task_per_rank_on_cpu_nodes(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "1",
           "CLIP_TRAIN_NPROC_PER_NODE": "2"}
    result = _render(SBATCH, env, ["+experiment=demo", BRACES], tmp_path)
    assert result.returncode == 0, result.stderr
    cmd = _command(result.stdout, "slurm.sbatch: ")
    assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd
    assert {"--nodes=2", "--ntasks-per-node=2", "--ntasks=4", "--cpus-per-task=1", "--overcommit"} <= set(cmd)
    # Overrides reach clip_train unchanged, after a run dir fixed by the job id.
    assert cmd[-3:] == ["hydra.run.dir=outputs/slurm-4242", "+experiment=demo", BRACES]
    assert "runpy.run_module(\"clip_train\"" in cmd[cmd.index("-c") + 1]
    assert "SIGUSR2" in cmd[cmd.index("-c") + 1]


def test_sbatch_takes_ranks_from_gpus_and_keeps_a_given_run_dir(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96"}
    result = _render(SBATCH, env, ["hydra.run.dir=/runs/a", "optim.lr=1e-3"], tmp_path)
    cmd = _command(result.stdout, "slurm.sbatch: ")
    assert {"--nodes=4", "--ntasks-per-node=8", "--ntasks=32", "--cpus-per-task=12"} <= set(cmd)
    assert "--overcommit" not in cmd
    assert cmd[-2:] == ["hydra.run.dir=/runs/a", "optim.lr=1e-3"]
    assert not any(a.startswith("hydra.run.dir=outputs/") for a in cmd)


def test_sbatch_directives_and_bad_input(tmp_path: Path) -> None:
    text = SBATCH.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=USR2@120" in text
    result = _render(SBATCH, {"SLURM_JOB_ID": "1", "CLIP_TRAIN_NPROC_PER_NODE": "two"}, [], tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "CLIP_TRAIN_NPROC_PER_NODE" in result.stderr
    result = _render(SBATCH, {}, [], tmp_path)
    assert result.returncode == 2 and "sbatch" in result.stderr


def test_torchrun_script_renders_c10d_rendezvous_and_refuses_half_configured_nodes(tmp_path: Path) -> None:
    env = {"NNODES": "2", "MASTER_ADDR": "node0", "CLIP_TRAIN_RUN_ID": "vitb16-run1",
           "CLIP_TRAIN_NPROC_PER_NODE": "4", "CLIP_TRAIN_MAX_RESTARTS": "3"}
    result = _render(TORCHRUN, env, [BRACES], tmp_path)
    assert result.returncode == 0, result.stderr
    cmd = _command(result.stderr, "torchrun.sh: ")
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500",
            "--rdzv-id=vitb16-run1", "--max-restarts=3"} <= set(cmd)
    assert cmd[-4:] == ["-m", "clip_train", "hydra.run.dir=outputs/vitb16-run1", BRACES]

    single = _command(_render(TORCHRUN, {"CLIP_TRAIN_NPROC_PER_NODE": "2"}, [], tmp_path).stderr, "torchrun.sh: ")
    assert "--standalone" in single and "--nproc-per-node=2" in single
    for env, missing in [({"NNODES": "2"}, "MASTER_ADDR"), ({"NNODES": "2", "MASTER_ADDR": "h"}, "CLIP_TRAIN_RUN_ID")]:
        result = _render(TORCHRUN, env, [], tmp_path)
        assert result.returncode == 2 and missing in result.stderr and result.stderr.count("\n") == 1


# ---------------------------------------------------------------- ranks from SLURM's variables


def test_launch_env_reads_torchrun_then_srun_steps_only() -> None:
    assert launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}).world_size == 8
    srun = launch_env({"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
                       "SLURM_NTASKS": "99"})
    assert (srun.rank, srun.local_rank, srun.world_size, srun.launcher) == (5, 1, 8, "slurm")
    # A batch or salloc shell has SLURM_PROCID and the allocation's SLURM_NTASKS but no step: a group of one.
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"}).world_size == 1
    # torchrun inside srun: torchrun's variables win.
    both = launch_env({"RANK": "2", "WORLD_SIZE": "16", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"})
    assert (both.rank, both.launcher) == (2, "torchrun")


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("node[1-2]", "node1"), ("gpu[003-005,9],cpu1", "gpu003"), ("a[1-2]-b[7,8]", "a1-b7"),
    ("x-y.z[001]", "x-y.z001"),
])
def test_first_hostname_of_a_slurm_node_list(nodelist: str, first: str) -> None:
    assert first_hostname(nodelist) == first


def test_bad_node_list_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="node list"):
        first_hostname("[")


def test_master_port_is_fixed_by_the_job_id() -> None:
    assert slurm_master_port("123") == slurm_master_port("123") != slurm_master_port("124")
    assert 15000 <= slurm_master_port("987654321") < 30000


def test_sweep_is_refused_inside_an_srun_step(cache_dir: Path) -> None:
    env = cli_env(cache_dir)
    env.update(SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID="5")
    result = subprocess.run([sys.executable, "-m", "clip_train", "+sweep=lr", *FAST_DEMO], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "srun" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- preemption


@pytest.fixture
def fresh_preemption(monkeypatch):
    """The module's state as in a new process, and USR2's handler put back afterwards."""
    before = signal.getsignal(signal.SIGUSR2)
    monkeypatch.setattr(preemption, "_received", False)
    monkeypatch.setattr(preemption, "_previous", None)
    yield
    signal.signal(signal.SIGUSR2, before)


def test_signal_sets_a_flag_and_is_handed_to_the_previous_handler_on_rank_0(fresh_preemption) -> None:
    calls: list[int] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # e.g. submitit's
    preemption.install()
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.05)
    assert preemption.requested() and calls == [], "nothing but the flag while training"
    preemption.hand_off(rank=1)
    assert calls == []
    preemption.hand_off(rank=0)
    assert calls == [signal.SIGUSR2]
    preemption.disarm()
    assert signal.getsignal(signal.SIGUSR2) is not preemption._on_signal


def test_under_slurm_rank_0_requeues_the_job(fresh_preemption, monkeypatch, tmp_path: Path) -> None:
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'called'}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    preemption.install()
    preemption.hand_off(rank=1)
    assert not (tmp_path / "called").exists()
    preemption.hand_off(rank=0)
    assert (tmp_path / "called").read_text().split() == ["requeue", "77"]

    fake.write_text("#!/bin/sh\necho 'Requested operation is presently disabled' >&2\nexit 1\n")
    with pytest.raises(SystemExit) as stop:
        preemption.hand_off(rank=0)
    assert stop.value.code == preemption.EXIT_PREEMPTED


def test_usr2_checkpoints_the_current_step_and_the_rerun_resumes_exactly(cache_dir: Path, tmp_path: Path) -> None:
    args = [*FAST_DEMO, "train.max_steps=400", "ckpt.every_n_steps=0", f"hydra.run.dir={tmp_path}"]
    command = [sys.executable, "-m", "clip_train", *args]
    proc = subprocess.Popen(command, cwd=REPO, env=cli_env(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR2)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == preemption.EXIT_PREEMPTED, output[-3000:]
    steps = [m["step"] for m in read_metrics(tmp_path)]
    assert steps and steps[-1] < 400, "stopped early"
    assert (tmp_path / "checkpoints" / "latest").resolve().name == f"step_{steps[-1]:09d}"

    result = run_cli([*args[:-1], "train.max_steps=" + str(steps[-1] + 3), f"hydra.run.dir={tmp_path}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, steps[-1] + 4))


# ---------------------------------------------------------------- sweeps and launchers


def test_four_job_local_multirun_writes_four_runs_with_their_values(cache_dir: Path, tmp_path: Path) -> None:
    result = run_cli(["-m", *FAST_DEMO, "train.max_steps=2", "ckpt.every_n_steps=0", "data.batch_size=4,8",
                      "loss.temperature=0.1,0.05", f"hydra.sweep.dir={tmp_path}"], cache_dir, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = set()
    for job in range(4):
        run_dir = tmp_path / str(job)
        assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        seen.add((config["data"]["batch_size"], config["loss"]["temperature"]))
        assert read_metrics(run_dir)[0]["global_batch_size"] == config["data"]["batch_size"]
    assert seen == {(4, 0.1), (4, 0.05), (8, 0.1), (8, 0.05)}


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from clip_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("sweep, key, values", [
    ("temperature", "loss.temperature", "0.1,0.07,0.05,0.03"),
    ("batch_size", "data.batch_size", "64,128,256"),
    ("lr", "optim.lr", "1e-4,3e-4,5e-4,1e-3"),
])
def test_sweep_configs_are_multiruns_over_one_key(sweep: str, key: str, values: str) -> None:
    cfg = _compose(["+experiment=demo", f"+sweep={sweep}"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {key: values}


def test_slurm_launcher_config_composes_to_one_task_per_gpu() -> None:
    from hydra.utils import instantiate

    cfg = _compose(["+experiment=demo", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
                    "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout > 0
    assert "export SLURM_KILL_BAD_EXIT=1" in launcher.setup
    assert instantiate(launcher).params["tasks_per_node"] == 4


def test_slurm_launcher_config_validates_with_cfg_job(cache_dir: Path) -> None:
    result = run_cli(["--cfg", "job", "+experiment=demo", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
                      "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=0"], cache_dir, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load(result.stdout)["model"]["name"]
    bad = run_cli(["--cfg", "job", "hydra/launcher=slurm", "hydra.launcher.nodez=2"], cache_dir, timeout=120)
    assert bad.returncode != 0 and "nodez" in bad.stderr + bad.stdout


def test_submitit_local_executor_runs_a_sweep_job(cache_dir: Path, tmp_path: Path) -> None:
    result = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *FAST_DEMO,
                      "train.max_steps=2", "ckpt.every_n_steps=0", f"hydra.sweep.dir={tmp_path}"],
                     cache_dir, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "0")] == [1, 2]
    assert (tmp_path / "0" / "checkpoints" / "latest").exists()
    assert list((tmp_path / ".submitit").glob("*/*_result.pkl"))
