"""Running ``python -m clip_train`` (and torchrun) in subprocesses the way users do."""

from __future__ import annotations

import json
import os
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
    return subprocess.run(command, cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # tests assert on the exit status themselves


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
