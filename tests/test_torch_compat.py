"""What a cluster image with an older torch (2.4 onwards, as pyproject declares) meets, tested on today's.

docs/scaling.md ("Older torch") gives what the whole suite did on torch 2.4.1; these tests pin the places
where 2.4 differs in behaviour rather than in an import path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from clip_train.config import ConfigError, TrainConfig, validate
from clip_train.models.registry import get_model_config
from clip_train.train import torch_compat

_JOIN_AND_SUM = textwrap.dedent("""
    import torch, torch.distributed as dist
    from clip_train.train.distributed import init_distributed, shutdown
    ctx = init_distributed("cpu", timeout_s=60)
    total = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(total)
    print(f"rank {ctx.rank} of {ctx.world_size}: {total.item():g}")
    shutdown()
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ranks_meet_where_torchrun_leaves_the_store_to_rank_0() -> None:
    """torch 2.4's ``torchrun --standalone`` hosts no store for its workers (TORCHELASTIC_USE_AGENT_STORE=False):
    rank 0 must host it, or every rank waits as a client until the timeout."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, TORCHELASTIC_RUN_ID="compat", TORCHELASTIC_USE_AGENT_STORE="False",
                   TORCHELASTIC_RESTART_COUNT="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-c", _JOIN_AND_SUM], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == f"rank {rank} of 2: 3"


def test_fsdp_on_a_torch_without_ignored_params_is_refused_in_one_line(monkeypatch) -> None:
    def fully_shard_of_torch_2_4(module, *, mesh=None, reshard_after_forward=True, mp_policy=None,
                                 offload_policy=None):
        raise AssertionError("validation must refuse before sharding anything")

    monkeypatch.setattr(torch_compat, "fully_shard", fully_shard_of_torch_2_4)
    cfg = TrainConfig(model=get_model_config("tiny"))
    cfg.train.strategy, cfg.train.precision = "fsdp", "fp32"
    with pytest.raises(ConfigError) as refused:
        validate(cfg, 2, "cpu")
    message = str(refused.value)
    assert "\n" not in message
    assert "torch 2.7 or newer" in message and "train.strategy=ddp" in message
    cfg.train.strategy = "ddp"
    validate(cfg, 2, "cpu")
