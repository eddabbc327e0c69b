"""Process-group set-up from torchrun's (or SLURM's) environment, and the few collectives the loop needs.

Everything runs on CPU with gloo as well as on CUDA with NCCL; a plain ``python -m clip_train`` is a
group of one and never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Before torch 2.8 (pytorch/pytorch#154976) a process group's destructor held the GIL while it joined
# gloo's worker threads, and a worker that has just finished a collective on a tensor made in Python needs
# the GIL to let go of it: destroy_process_group straight after such a collective could deadlock. Two gloo
# ranks doing all_gather_object then destroy_process_group, 100 rounds a run: on torch 2.4.1 and 2.7.1 a
# rank hung in every run (8 of 8, after 39 completed rounds across them), on 2.8.0 in none of 3. Sleeping
# first lets the workers take the GIL: no round hung of 600 with 10 ms (2.4.1), nor of 1,100 with 50 ms
# (2.4.1 and 2.7.1; 800 of them with both cores kept busy). The grace is 50 ms, paid once per process.
# (Kept here, not in torch_compat: that module loads FSDP.)
GLOO_TEARDOWN_GRACE_S = 0.05 if torch.__version__ < "2.8" else 0.0


@dataclass
class DistributedContext:
    """Who this process is and where it computes."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job as its launcher describes it, before any process group exists."""

    rank: int
    local_rank: int
    world_size: int
    launcher: str
    """``torchrun`` (or anything that sets RANK/WORLD_SIZE), ``slurm`` (one srun task per rank) or ``single``."""


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, local rank and world size from torchrun's variables or, failing those, from an srun step's.

    Only a job *step* counts as SLURM-launched (``SLURM_STEP_ID`` is set by srun, not in the batch shell
    or an salloc shell, where ``SLURM_NTASKS`` describes the allocation, not this process): a plain
    ``python -m clip_train`` typed inside an allocation stays a group of one instead of waiting for peers.
    """
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE") or env.get("RANK"):
        return LaunchEnv(
            rank=int(env.get("RANK") or 0),
            local_rank=int(env.get("LOCAL_RANK") or 0),
            world_size=int(env.get("WORLD_SIZE") or 1),
            launcher="torchrun",
        )
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID"):
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID") or 0),
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1),
            launcher="slurm",
        )
    return LaunchEnv(rank=0, local_rank=0, world_size=1, launcher="single")


def first_hostname(nodelist: str) -> str:
    """The first host of a SLURM hostlist: ``gpu[03-05,9],cpu1`` -> ``gpu03``; ``a[1-2]-b[7]`` -> ``a1-b7``.

    Parsed here rather than asking ``scontrol show hostnames`` so that any process of a step (submitit's
    included) finds rank 0's host without SLURM's commands on its PATH.
    """
    entry = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if entry is None or not entry.group(0):
        raise ValueError(f"cannot read a host name from the SLURM node list {nodelist!r}")
    # In each bracket group keep the start of its first range ("03-05,9" -> "03"), zero padding included.
    host = re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", entry.group(0))
    if "[" in host or "]" in host:
        raise ValueError(f"cannot read a host name from the SLURM node list {nodelist!r}")
    return host


def slurm_master_port(job_id: str) -> int:
    """A rendezvous port fixed by the job id: every task of the job computes the same one, and two jobs
    sharing a node get different ones (15000-29999, below Linux's ephemeral range)."""
    return 15000 + int(job_id) % 15000


def _export_slurm_rendezvous(launch: LaunchEnv) -> None:
    """Give an srun-launched rank what ``init_method="env://"`` reads; values already set win."""
    env = os.environ
    if not env.get("MASTER_ADDR"):
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise RuntimeError("launched by srun but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        env["MASTER_ADDR"] = first_hostname(nodelist)
    if not env.get("MASTER_PORT"):
        env["MASTER_PORT"] = str(slurm_master_port(env["SLURM_JOB_ID"]))
    # Libraries that read the torchrun names (and our own child processes) see the same identity.
    env.update(RANK=str(launch.rank), LOCAL_RANK=str(launch.local_rank), WORLD_SIZE=str(launch.world_size))


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` takes this rank's GPU when there is one, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _rendezvous_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, a store private to this restart attempt; elsewhere None (use env://).

    torchrun's workers share its agent's TCPStore, and after ``--max-restarts`` the new workers would find
    the keys the dead attempt left there and hang connecting to dead peers (pytorch/pytorch#135712).
    Prefixing every key with the restart count gives each attempt a clean namespace.

    Where the agent hosts no store for its workers (``TORCHELASTIC_USE_AGENT_STORE=False``, as torch 2.4's
    ``--standalone`` sets it), rank 0 hosts it, as torch's own ``env://`` does.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    base = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        timeout=timeout,
    )
    return dist.PrefixStore(f"clip_train/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def init_distributed(device_preference: str = "auto", timeout_s: float = 1800) -> DistributedContext:
    """Join the process group torchrun describes, or that of an srun step with one task per rank.

    Under srun the rank is ``SLURM_PROCID`` and rank 0's host the first of the step's nodes (MASTER_ADDR
    and MASTER_PORT, when set, win), so sbatch scripts and submitit need no launcher of their own.

    Collectives time out after ``timeout_s`` so a dead peer ends the job instead of hanging it.
    """
    launch = launch_env()
    world_size, rank, local_rank = launch.world_size, launch.rank, launch.local_rank
    device = pick_device(device_preference, local_rank)
    if launch.launcher == "slurm" and world_size > 1:
        _export_slurm_rendezvous(launch)
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _rendezvous_store(rank, world_size, timeout)
        if store is None:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown() -> None:
    """Leave the process group, if this process is in one."""
    if not dist.is_initialized():
        return
    if GLOO_TEARDOWN_GRACE_S and dist.get_backend() == "gloo":
        time.sleep(GLOO_TEARDOWN_GRACE_S)  # sleeping lets gloo's workers take the GIL
    dist.destroy_process_group()


def broadcast_object(obj: Any, ctx: DistributedContext, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, ctx: DistributedContext) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    if not ctx.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()
