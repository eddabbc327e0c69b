"""The distributed APIs that moved or grew between the oldest torch we support (2.4) and today's.

FSDP2 and DTensor shipped in torch 2.4 under private module names and became public later (DTensor in
2.5, FSDP2 in 2.6); cluster images pin older torch builds for their CUDA, so both paths are tried. What
an old torch lacks outright is detected here once, so callers can refuse it in one line.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed.checkpoint as dcp

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
except ImportError:  # torch 2.4-2.5
    from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch 2.4
    from torch.distributed._tensor import DTensor  # type: ignore[no-redef]

__all__ = [
    "DTensor",
    "MixedPrecisionPolicy",
    "fsdp_unsupported_reason",
    "fully_shard",
    "load_in_this_process",
    "register_fsdp_forward_method",
]


def fsdp_unsupported_reason() -> str | None:
    """Why ``train.strategy=fsdp`` cannot run on this torch, or None when it can.

    Our FSDP keeps ``logit_scale`` and the other scalars replicated through ``fully_shard``'s
    ``ignored_params``, which torch added in 2.7.
    """
    if "ignored_params" in inspect.signature(fully_shard).parameters:
        return None
    return (f"train.strategy=fsdp needs torch 2.7 or newer (fully_shard's ignored_params) and this is torch "
            f"{torch.__version__}; upgrade torch or use train.strategy=ddp")


DCP_LOAD_TAKES_NO_DIST = "no_dist" in inspect.signature(dcp.load).parameters  # torch 2.5 onwards


def load_in_this_process(state: dict[str, torch.Tensor], reader: dcp.StorageReader) -> None:
    """Fill ``state`` from a DCP checkpoint in this process alone, even where a process group exists."""
    if DCP_LOAD_TAKES_NO_DIST:
        dcp.load(state, storage_reader=reader, no_dist=True)
    else:  # torch 2.4: only the loader underneath takes no_dist
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        _load_state_dict(state, storage_reader=reader, no_dist=True)
