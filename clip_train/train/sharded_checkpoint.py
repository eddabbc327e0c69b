"""Sharded (FSDP2) model and optimizer state through ``torch.distributed.checkpoint`` (DCP).

Under ``train.strategy=fsdp`` no rank holds the whole model, so each rank writes its own shards into the
step directory's ``sharded/`` folder (DCP's format: one ``.distcp`` file per rank and a ``.metadata``
index written by rank 0). The rest of the checkpoint (schedule, counters, RNG and data positions, config)
is small and replicated, and rank 0 writes it to ``state.pt`` as for DDP. The step directory is then
sealed like any other (manifest over every file, atomic rename, ``latest``), so ``ckpt.resume=auto``,
``keep_last`` and corruption fallback work unchanged.

DCP reshards on load: a sharded checkpoint resumes on another number of ranks, and also into a
DDP (unsharded) run, since loading only needs a state dict of the right keys and shapes to fill.
The run directory must be on a file system every rank sees (it already must be for DDP resume).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from clip_train.train import checkpoint as ckpt_io
from clip_train.train.torch_compat import load_in_this_process

SHARDED_DIR = "sharded"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` index but refuses every global it does not need.

    DCP reads that index with plain ``pickle.load``, so a crafted checkpoint could run code on resume or
    export. The index only ever names DCP's own metadata dataclasses and enums, ``torch.Size``, dtypes,
    layouts and paths; anything else (``os.system``, ``builtins.eval``, ...) is refused before it is called.
    """

    _DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    _PATHS = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path")

    def find_class(self, module: str, name: str) -> Any:
        if module in self._DCP_MODULES:
            found = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        elif module == "pathlib" and name in self._PATHS:
            return getattr(pathlib, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index")


def check_metadata(directory: Path) -> None:
    """Raise ``CheckpointCorrupt`` unless every DCP index in ``directory`` holds only metadata (no code)."""
    for index in sorted(directory.glob("*.metadata")):
        try:
            _MetadataUnpickler(io.BytesIO(index.read_bytes())).load()
        except Exception as err:  # noqa: BLE001 - whatever is wrong, the index cannot be trusted
            raise ckpt_io.CheckpointCorrupt(
                f"{directory.parent.name}: refusing {SHARDED_DIR}/{index.name}: it is not a plain DCP index "
                f"and could run code when read ({str(err)[:200]})"
            ) from None


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, with the pickled index checked by :func:`check_metadata` before DCP unpickles it."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        check_metadata(Path(self.path))
        return super().read_metadata(*args, **kwargs)


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint directory ``path`` keeps its model and optimizer as DCP shards."""
    return (path / SHARDED_DIR).is_dir()


def save_sharded_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, replicated_state: dict | None,
    is_main: bool,
) -> Path | None:
    """Collective: every rank writes its shards; rank 0 adds ``replicated_state`` as ``state.pt`` and seals.

    Returns the step directory on rank 0 (None elsewhere).
    """
    tmp = root / f".tmp-{ckpt_io.step_dir_name(step)}"
    if is_main:
        ckpt_io.start_checkpoint(root, step)
    dist.barrier()  # the empty temporary directory exists before anyone writes into it
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / SHARDED_DIR)
    dist.barrier()  # every rank's shards and rank 0's .metadata are on disk
    final = None
    if is_main:
        torch.save(replicated_state, tmp / ckpt_io.STATE_FILE)
        final = ckpt_io.commit_checkpoint(root, step, tmp)
    return final


def start_sharded_checkpoint_async(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, replicated_state: dict | None,
    is_main: bool, process_group: dist.ProcessGroup,
) -> Callable[[], Path | None]:
    """Collective: stage every rank's shards to host memory through DCP's ``async_save`` and start writing.

    Returns the rest of the save, to run off the main thread: wait for DCP's write (whose last phase
    gathers every rank's result and writes ``.metadata`` on rank 0, so on rank 0 its completion means every
    rank's shards are on disk), then on rank 0 write ``state.pt`` from ``replicated_state`` (which must
    already be a host copy) and seal the directory. ``process_group`` is a group of its own (gloo), so
    DCP's background collectives never interleave with the training step's.
    """
    tmp = root / f".tmp-{ckpt_io.step_dir_name(step)}"
    if is_main:
        ckpt_io.start_checkpoint(root, step)
    dist.barrier()  # the empty temporary directory exists before anyone writes into it
    model_state, optim_state = get_state_dict(model, optimizer)
    written = dcp.async_save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / SHARDED_DIR,
                             process_group=process_group)

    def finish() -> Path | None:
        written.result()
        if not is_main:
            return None
        ckpt_io.save_state_file(replicated_state, tmp / ckpt_io.STATE_FILE)
        return ckpt_io.commit_checkpoint(root, step, tmp)

    return finish


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective when distributed: fill ``model`` and ``optimizer`` (sharded or not) from ``path/sharded``.

    The templates come from the live model and optimizer, so DCP reads exactly the slices each rank
    owns under the current sharding, whatever sharding wrote them.
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    check_metadata(path / SHARDED_DIR)  # a clear error here; DCP would wrap it in its own exception
    dcp.load(state, storage_reader=SafeFileSystemReader(str(path / SHARDED_DIR)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_state_into_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
) -> None:
    """Fill a sharded model and optimizer from a DDP checkpoint's full state dicts (every rank holds them).

    A plain optimizer state dict numbers parameters in param-group order; ``set_state_dict`` wants them by
    name. Both optimizers were built by the same ``build_optimizer``, so their groups list the same
    parameters in the same order, which gives the index -> name map.
    """
    name_of = {id(p): name for name, p in model.named_parameters()}
    live_names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_indices = [i for group in optim_state["param_groups"] for i in group["params"]]
    if len(live_names) != len(saved_indices):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_indices)} parameters, this run's {len(live_names)}: "
            "were towers locked differently?"
        )
    name_at = dict(zip(saved_indices, live_names))
    named_state = {name_at[i]: value for i, value in optim_state["state"].items()}
    named_groups = [{**group, "params": [name_at[i] for i in group["params"]]} for group in optim_state["param_groups"]]
    set_state_dict(
        model, optimizer, model_state_dict=model_state,
        optim_state_dict={"state": named_state, "param_groups": named_groups},
        options=StateDictOptions(full_state_dict=True),
    )


def read_sharded_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, read in one process without a process group.

    The tensors' shapes and dtypes come from DCP's own ``.metadata``, so no model has to be built first.
    """
    check_metadata(path / SHARDED_DIR)
    reader = SafeFileSystemReader(str(path / SHARDED_DIR))
    metadata = reader.read_metadata()
    state: dict[str, torch.Tensor] = {}
    for key, entry in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(entry, "size"):
            state[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
    load_in_this_process(state, reader)
    return {key.removeprefix("model."): value for key, value in state.items()}
