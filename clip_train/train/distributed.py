"""Process-group set-up from torchrun's (or SLURM's) environment, and the few collectives the loop needs.

Everything runs on CPU with gloo as well as on CUDA with NCCL; a plain ``python -m clip_train`` is a
group of one and never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


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


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` takes this rank's GPU when there is one, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _rendezvous_store(timeout: timedelta) -> dist.Store | None:
    """Under torchrun, a store private to this restart attempt; elsewhere None (use env://).

    torchrun's workers share its agent's TCPStore, and after ``--max-restarts`` the new workers would find
    the keys the dead attempt left there and hang connecting to dead peers (pytorch/pytorch#135712).
    Prefixing every key with the restart count gives each attempt a clean namespace.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    base = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"clip_train/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def init_distributed(device_preference: str = "auto", timeout_s: float = 1800) -> DistributedContext:
    """Join the process group torchrun (or SLURM, through RANK/WORLD_SIZE/MASTER_*) describes.

    Collectives time out after ``timeout_s`` so a dead peer ends the job instead of hanging it.
    """
    world_size = _env_int("WORLD_SIZE", default=1)
    rank = _env_int("RANK", default=0)
    local_rank = _env_int("LOCAL_RANK", default=0)
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _rendezvous_store(timeout)
        if store is None:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown() -> None:
    if dist.is_initialized():
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
