"""What a cluster image with an older torch (2.4 onwards, as pyproject declares) meets, tested on today's.

docs/scaling.md ("Older torch") gives what the whole suite did on torch 2.4.1; these tests pin the places
where 2.4 differs in behaviour rather than in an import path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from clip_train.config import ConfigError, TrainConfig, validate
from clip_train.models.registry import get_model_config
from clip_train.train import torch_compat
from tests.cli_helpers import free_port

_JOIN_AND_SUM = textwrap.dedent("""
    import torch, torch.distributed as dist
    from clip_train.train.distributed import init_distributed, shutdown
    ctx = init_distributed("cpu", timeout_s=60)
    total = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(total)
    print(f"rank {ctx.rank} of {ctx.world_size}: {total.item():g}")
    shutdown()
""")


def test_ranks_meet_where_torchrun_leaves_the_store_to_rank_0() -> None:
    """torch 2.4's ``torchrun --standalone`` hosts no store for its workers (TORCHELASTIC_USE_AGENT_STORE=False):
    rank 0 must host it, or every rank waits as a client until the timeout."""
    port = free_port()
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


_GATHER_THEN_LEAVE = textwrap.dedent("""
    import sys
    from datetime import timedelta
    import torch, torch.distributed as dist
    from clip_train.train.distributed import shutdown
    rank, rounds, store_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    for round_ in range(rounds):
        store = dist.FileStore(f"{store_path}.{round_}", 2)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
        gathered = [None, None]
        dist.all_gather_object(gathered, torch.full((64,), float(rank)))
        assert [float(part[0]) for part in gathered] == [0.0, 1.0]
        shutdown()  # at once, while gloo's workers may still hold the gather's tensors
    print(f"rank {rank}: {rounds} rounds")
""")


def test_leaving_the_group_straight_after_a_gather_never_hangs(tmp_path) -> None:
    """The eval CLI's shape (all_gather_object, then shutdown) round after round: on torch 2.4.1, without
    shutdown's grace, a rank hung in destroy_process_group and this test timed out."""
    rounds = 40
    procs = [subprocess.Popen([sys.executable, "-c", _GATHER_THEN_LEAVE, str(rank), str(rounds),
                               str(tmp_path / "store")], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in range(2)]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("a rank hung leaving its process group after an all_gather_object")
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == f"rank {rank}: {rounds} rounds"


def test_shutdown_sleeps_before_destroying_a_gloo_group_only_where_torch_needs_it(monkeypatch) -> None:
    import torch.distributed as dist

    from clip_train.train import distributed

    calls: list[str] = []
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: calls.append(f"sleep {seconds}"))
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (calls.append("destroy"), destroy())[1])
    for grace, expected in ((0.05, ["sleep 0.05", "destroy"]), (0.0, ["destroy"])):
        monkeypatch.setattr(distributed, "GLOO_TEARDOWN_GRACE_S", grace)
        calls.clear()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        distributed.shutdown()
        assert calls == expected and not dist.is_initialized()
    distributed.shutdown()  # outside a group: nothing to leave
    assert calls == expected
