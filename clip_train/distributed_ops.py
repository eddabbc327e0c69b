"""Differentiable collectives used by the contrastive losses.

A contrastive loss over the *global* batch needs other ranks' features, and the gradient of the loss with
respect to those features must travel back to the rank that produced them. Plain ``dist.all_gather`` cuts
the autograd graph (its output has no ``grad_fn``), which silently drops every cross-rank gradient term and
makes the per-parameter gradient wrong by a factor tied to the world size. The helpers here keep the graph:

- :func:`all_gather_with_grad` concatenates every rank's tensor along dim 0; its backward *sums* the
  incoming gradients of all ranks and hands each rank the slice of its own rows (a reduce-scatter).
- :func:`ring_send_recv` starts one step of a ring exchange (send to the next rank, receive from the
  previous one) and returns the pending works, so callers can overlap the transfer with compute. The
  losses that use it manage the backward direction themselves (see ``clip_train.loss``).

Every helper degrades to a no-op in a single process (``torch.distributed`` not initialised, or a group of
one), so the losses run unchanged on a laptop.

The trainer times these transfers (``comm_s`` in ``metrics.jsonl``) by handing :func:`set_collective_region`
a context manager that every collective here runs inside; by default it does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup if dist.is_available() else object

# torch 2.14 renamed the tensor-in/tensor-out collectives (the old names warn); older releases lack the new.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(
    dist, "reduce_scatter_tensor", None
)


_collective_region: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def set_collective_region(region: Callable[[], contextlib.AbstractContextManager] | None) -> None:
    """Run every collective of these helpers inside ``region()`` from now on (``None``: nothing, the default).

    Used to time communication apart from compute; the region may be entered from autograd's backward thread.
    """
    global _collective_region
    _collective_region = region or contextlib.nullcontext


def world_info(group: ProcessGroup | None = None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group`` (default: the world), or ``(1, 0)`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _global_rank(group: ProcessGroup | None, group_rank: int) -> int:
    """Point-to-point ops address peers by their rank in the default group."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        world, rank = world_info(group)
        ctx.group, ctx.world, ctx.rank, ctx.rows = group, world, rank, tensor.shape[0]
        tensor = tensor.contiguous()
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        with _collective_region():
            _all_gather_single(out, tensor, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # Every rank holds d(its own loss)/d(all rows); the gradient of rank r's rows is the sum over ranks
        # of their r-th slice. NCCL has a native reduce-scatter; gloo does not in every build, so there
        # we all-reduce the whole gradient and keep our slice (W times the traffic, only on CPU).
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            with _collective_region():
                _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return out, None
        summed = grad.clone()  # autograd may still reference ``grad``: never reduce it in place
        with _collective_region():
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        return summed[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows].clone(), None


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank of ``group`` along dim 0, keeping the autograd graph.

    All ranks must pass the same shape. Row block ``r`` of the result is rank ``r``'s tensor. In backward,
    each rank receives the sum over ranks of the gradient of its own row block, which is what makes
    ``sum over ranks of each rank's loss`` differentiate correctly. Returns ``tensor`` itself in a single
    process.
    """
    world, _ = world_info(group)
    if world == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def all_gather_no_grad(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 without autograd (for statistics, logging)."""
    world, _ = world_info(group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    with _collective_region():
        _all_gather_single(out, tensor, group=group)
    return out


def ring_send_recv(
    send: torch.Tensor,
    recv: torch.Tensor,
    group: ProcessGroup | None = None,
    tag: int = 0,
) -> list[dist.Work]:
    """Start one ring step: send ``send`` to rank ``r+1`` and receive into ``recv`` from rank ``r-1``.

    Returns the pending works; call :func:`wait_all` before reading ``recv`` or writing ``send`` (and keep
    a reference to ``send`` until then). Every
    rank of ``group`` must make the same sequence of calls. ``tag`` keeps two interleaved rings (e.g.
    features travelling forward and gradients following them) apart on backends that match by tag.
    """
    if not send.is_contiguous() or not recv.is_contiguous():
        # A temporary contiguous copy could be freed while the transfer is still in flight.
        raise ValueError("ring_send_recv needs contiguous send and recv tensors")
    world, rank = world_info(group)
    to_next = _global_rank(group, (rank + 1) % world)
    from_prev = _global_rank(group, (rank - 1) % world)
    ops = [
        dist.P2POp(dist.isend, send, to_next, group=group, tag=tag),
        dist.P2POp(dist.irecv, recv, from_prev, group=group, tag=tag),
    ]
    return list(dist.batch_isend_irecv(ops))


def wait_all(works: Sequence[dist.Work] | None) -> None:
    """Block until every work in ``works`` has completed (``None`` or empty: nothing to wait for)."""
    if not works:
        return
    with _collective_region():  # the part of a ring transfer that compute did not hide
        for work in works:
            work.wait()
