"""Running ``python -m clip_train`` (and torchrun) in subprocesses the way users do."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A few fast steps of the demo: no eval, no workers unless a test asks for them.
FAST_DEMO = [
    "+experiment=demo",
    "train.log_every_n_steps=1",
    "data.batch_size=32",
    "data.num_workers=0",
    "eval.zeroshot=[]",
]


def cli_env(cache_dir: Path) -> dict[str, str]:
    # A developer's own WANDB_* settings (WANDB_MODE=online, a project) must not reach the tests' runs.
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(
        CLIP_TRAIN_CACHE=str(cache_dir),
        OMP_NUM_THREADS="1",  # tests run side by side on 2 cores
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        HYDRA_FULL_ERROR="0",
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return env


def run_cli(args: list[str], cache_dir: Path, timeout: float = 300, torchrun_procs: int | None = None,
            cwd: Path | None = None, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """``python -m clip_train ARGS`` (or under torchrun); ``env`` adds to (or, with None values, removes
    from) the test environment."""
    if torchrun_procs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={torchrun_procs}", "-m", "clip_train", *args]
    else:
        command = [sys.executable, "-m", "clip_train", *args]
    full_env = cli_env(cache_dir)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return run_to_completion(command, timeout, cwd=cwd or REPO, env=full_env)


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, parents first. torchrun starts each rank in a session of its own,
    so no one process group holds a job: signalling all of it means signalling each of these."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def kill_process_tree(root: int) -> None:
    """SIGKILL ``root`` and every descendant, read before any dies (an orphan no longer names its parent)."""
    for pid in process_tree(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_to_completion(command: list[str], timeout: float, **popen_args) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)``, except that a command
    that overstays is killed with all its descendants: ``subprocess.run`` kills only torchrun itself, and
    its ranks would live on as orphans, loading the cores for every test after."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_args) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(proc.pid)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(command, timeout, out, err) from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)  # tests assert on the status


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a rendezvous the test sets up itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def write_perturbed_tiny_checkpoint(run_dir: Path, step: int = 5):
    """The tiny model moved away from its initialisation (so every weight matters), saved as ``run_dir``'s
    training checkpoint at ``step``; returns the model in eval mode."""
    import dataclasses

    import torch

    import clip_train
    from clip_train.train.checkpoint import write_checkpoint

    torch.manual_seed(0)
    model = clip_train.create_model("tiny").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    write_checkpoint(run_dir / "checkpoints", step,
                     {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)})
    return model
