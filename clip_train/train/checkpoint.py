"""Atomic, verifiable checkpoints of Stateful parts, and finding the newest good one on resume.

Layout in the run dir::

    checkpoints/
      step_000001000/        one directory per saved step
        state.pt             every part's state dict (tensors and plain containers only: weights_only loads it)
        sharded/             train.strategy=fsdp only: model and optimizer as torch.distributed.checkpoint
                             shards (one file per rank plus .metadata); state.pt then holds the rest
        manifest.json        step, sizes and SHA-256 of every file: written last, so its presence marks a complete save
      latest -> step_000001000

A save writes into ``.tmp-step_…``, fsyncs, then renames: a crash or a second signal mid-save leaves either
the old set of checkpoints or the new one, never a torn directory that looks complete.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clip_train.errors import reason

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointCorrupt(RuntimeError):
    """A checkpoint directory that is incomplete, truncated or altered."""


class DiskFull(RuntimeError):
    """A write ran out of space (ENOSPC or quota); what was being written is named, the partial file removed."""

    @staticmethod
    def describe(err: OSError, path: Path | None = None) -> str:
        where = path or (Path(err.filename) if err.filename else None)
        return (f"no space left on the device while writing {where or 'the run directory'}; free space "
                "(or point hydra.run.dir elsewhere) and rerun the same command: it resumes from the newest "
                "complete checkpoint")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class _RecordingWriter:
    """A file wrapper for ``torch.save`` that keeps the OSError of a failed write.

    torch's zip writer turns a failed write into a RuntimeError that says nothing of the cause
    ("unexpected pos ..." or "basic_ios::clear"); the recorded OSError says "No space left on device".
    """

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._file.flush()


def save_state_file(state: Any, path: Path) -> None:
    """``torch.save`` to ``path``, raising the underlying OSError (with its errno) when a write fails."""
    with open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(state, writer)
            f.flush()
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def write_checkpoint(root: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint of ``step`` under ``root`` atomically; point ``latest`` at it.

    A write that runs out of space raises :class:`DiskFull` (one line naming the path) after removing the
    partial temporary directory, so the space it took is free again and ``latest`` still names the
    previous complete checkpoint.
    """
    tmp = root / f".tmp-{step_dir_name(step)}"
    try:
        tmp = start_checkpoint(root, step)
        save_state_file(state, tmp / STATE_FILE)
        return commit_checkpoint(root, step, tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno not in _OUT_OF_SPACE:
            raise
        raise DiskFull(disk_full_message(root, tmp / STATE_FILE)) from None


def disk_full_message(root: Path, path: Path) -> str:
    """The one line for a checkpoint save that ran out of space."""
    latest = root / LATEST
    kept = f"{root.name}/{LATEST} still points at {os.readlink(latest)}" if latest.is_symlink() else "no earlier checkpoint"
    return (f"no space left on the device while writing checkpoint {path}; the partial checkpoint was removed and "
            f"{kept}. Free space (or lower ckpt.keep_last) and rerun the same command: it resumes from there")


def start_checkpoint(root: Path, step: int) -> Path:
    """An empty temporary directory for the checkpoint of ``step``; fill it, then :func:`commit_checkpoint`."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(root: Path, step: int, tmp: Path) -> Path:
    """Seal a filled temporary directory: a manifest over every file in it (sharded ones in subdirectories
    too), fsync, rename to the step directory, point ``latest`` at it."""
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_file(file)
        files[file.relative_to(tmp).as_posix()] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    for directory in sorted({p.parent for p in tmp.rglob("*")}, reverse=True):
        _fsync_dir(directory)
    manifest = {"step": step, "files": files}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / MANIFEST_FILE)
    _fsync_dir(tmp)
    final = root / step_dir_name(step)
    if final.exists():  # re-saving a step after resuming from an earlier one
        shutil.rmtree(final)
    os.replace(tmp, final)
    point_latest(root, final.name)
    _fsync_dir(root)
    return final


def point_latest(root: Path, name: str) -> None:
    """Atomically repoint ``root/latest`` at the step directory ``name``."""
    link = root / LATEST
    tmp_link = root / f".{LATEST}.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(name, tmp_link)
    os.replace(tmp_link, link)


def verify_checkpoint(path: Path) -> int:
    """The step of a complete, intact checkpoint directory; ``CheckpointCorrupt`` says what is wrong otherwise."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointCorrupt(f"{path.name}: no {MANIFEST_FILE} (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointCorrupt(f"{path.name}: unreadable {MANIFEST_FILE} ({err})") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointCorrupt(f"{path.name}: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointCorrupt(f"{path.name}: {name} has {size} bytes, the manifest says {expected['bytes']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointCorrupt(f"{path.name}: {name} does not match its SHA-256 in the manifest")
    return step


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Saved step directories under ``root``, newest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def find_resumable(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; each bad newer one is reported in one line."""
    for _, path in list_checkpoints(root):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointCorrupt as err:
            log.warning("skipping checkpoint %s; falling back to the previous one", err)
    return None


def resolve_checkpoint_path(path: Path) -> Path:
    """A user-given checkpoint: a step directory, its ``state.pt``, ``latest``, or a run dir / checkpoints dir."""
    path = path.expanduser()
    if path.is_file() and path.name == STATE_FILE:
        path = path.parent
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / LATEST).exists() or list_checkpoints(path):
        newest = find_resumable(path)
        if newest is None:
            raise CheckpointCorrupt(f"no complete checkpoint under {path}")
        return newest
    return path.resolve()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Verify and read a checkpoint directory with ``weights_only=True`` (no code can run from the file)."""
    verify_checkpoint(path)
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointCorrupt(f"{path.name}: {STATE_FILE} cannot be read safely ({reason(err)})") from None


def prune_checkpoints(root: Path, keep_last: int, keep_every_n_steps: int = 0) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps everything) and those whose step is
    a multiple of ``keep_every_n_steps`` (when > 0), and stale temporaries."""
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    for step, path in list_checkpoints(root)[keep_last:]:
        if keep_every_n_steps > 0 and step % keep_every_n_steps == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------- async saves
#
# ckpt.async_save: the training step pays only for a copy of the state into host memory; a background
# thread then does everything write_checkpoint does (torch.save, fsync, SHA-256 manifest, rename, latest,
# pruning). A thread rather than a process: torch.save's file writes, hashlib over large blocks and
# fsync all release the GIL, so the thread overlaps the step's kernels, and it reads the host copy in
# place, where a process would need that copy moved into shared memory first (torchtitan's "async" mode
# is a thread for the same reason). A SIGKILL kills the thread with the process: its save is then only
# a .tmp-step_* directory and ``latest`` still names the previous checkpoint.


class HostSnapshot:
    """Copies a state tree into host memory that the live training state no longer touches.

    Tensors are copied storage by storage, keeping their offsets, strides and any storage they share,
    so ``torch.save`` of the copy writes the same bytes as of the original. The host buffers are kept
    and reused by the next snapshot (pinned when the source is on an accelerator, so the device-to-host
    copy is one DMA per storage); the caller makes sure the previous write has finished reading them.

    CPU storages named in ``take``'s ``deferred`` (the parameters and optimizer moments: only the optimizer
    step changes them) are not copied by ``take`` but by :meth:`complete`, which the background writer
    runs first, while the next step's forward and backward run; that step calls :meth:`wait_copied`
    before its optimizer step. On CPU the copy is a memcpy as slow as a good part of the write itself,
    so this hides it behind compute; a GPU's pinned device-to-host copy is fast enough to stay in ``take``.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] = []  # (host buffer, source bytes)
        self._copied = threading.Event()
        self._copied.set()

    def take(self, state: Any, deferred: frozenset[int] | set[int] = frozenset()) -> Any:
        """A copy of ``state`` whose tensors live in this snapshot's host buffers (a host sync on CUDA).

        ``deferred``: addresses (``untyped_storage().data_ptr()``) of CPU storages left to :meth:`complete`.
        """
        self._copied.wait()  # a previous copy still running would race with this one for the buffers
        copied: dict[tuple[str, int], torch.Tensor] = {}  # (device, storage address) -> host bytes
        used = [0]
        self._deferred = []
        out = self._copy(state, copied, used, deferred)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non_blocking copies have landed before anyone reads them
        del self._buffers[used[0]:]  # a smaller state than last time: free what is no longer used
        if self._deferred:
            self._copied.clear()
        return out

    def complete(self) -> None:
        """Copy the deferred storages (off the main thread); :meth:`wait_copied` returns once done."""
        try:
            for host, source in self._deferred:
                host.copy_(source)
        finally:
            self._deferred = []
            self._copied.set()

    def wait_copied(self) -> float:
        """Block until the deferred copy is done (call before the live state changes); seconds waited."""
        if self._copied.is_set():
            return 0.0
        start = time.perf_counter()
        self._copied.wait()
        return time.perf_counter() - start

    def _buffer(self, index: int, nbytes: int, pin: bool) -> torch.Tensor:
        if index < len(self._buffers) and self._buffers[index].numel() == nbytes and self._buffers[index].is_pinned() == pin:
            return self._buffers[index]
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        if index < len(self._buffers):
            self._buffers[index] = buffer
        else:
            self._buffers.append(buffer)
        return buffer

    def _copy_tensor(self, tensor: torch.Tensor, copied: dict, used: list[int], deferred) -> torch.Tensor:
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        host = copied.get(key)
        if host is None:
            source = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            host = self._buffer(used[0], storage.nbytes(), pin=tensor.device.type != "cpu")
            used[0] += 1
            if tensor.device.type == "cpu" and storage.data_ptr() in deferred:
                self._deferred.append((host, source))
            else:
                host.copy_(source, non_blocking=tensor.device.type != "cpu")
            copied[key] = host
        return torch.empty(0, dtype=tensor.dtype).set_(
            host.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
        )

    def _copy(self, value: Any, copied: dict, used: list[int], deferred) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, copied, used, deferred)
        if isinstance(value, dict):
            out = type(value)((key, self._copy(item, copied, used, deferred)) for key, item in value.items())
            if getattr(value, "__dict__", None):  # a module state dict's _metadata (versions for loading)
                out.__dict__.update(copy.deepcopy(value.__dict__))
            return out
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self._copy(item, copied, used, deferred) for item in value)
        return copy.deepcopy(value)


@dataclass
class SaveTiming:
    """How long one save stopped training (``block_s``) and how long its write took (``write_s``)."""

    step: int
    block_s: float
    write_s: float | None = None  # None while an async write is still running
    path: Path | None = None


class BackgroundWriter:
    """Runs one checkpoint write at a time in a thread; its error comes back on the main thread.

    ``submit`` expects the previous write to have been waited for (``wait``); ``wait`` re-raises, on the
    caller's thread, whatever the write raised (``DiskFull`` included), once.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._timing: SaveTiming | None = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> bool:
        """Whether a submitted write has not been waited for yet (finished or not)."""
        return self._thread is not None

    def done(self) -> bool:
        """Whether the submitted write (if any) has finished; never blocks."""
        return self._thread is None or not self._thread.is_alive()

    def submit(self, timing: SaveTiming, write: Callable[[], Path | None]) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is already in flight; wait() for it first")

        def run() -> None:
            start = time.perf_counter()
            try:
                timing.path = write()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread by wait()
                self._error = err
            finally:
                timing.write_s = time.perf_counter() - start

        self._timing, self._error = timing, None
        # Not a daemon: a run that ends by an exception still finishes (or is killed during) the write,
        # instead of the interpreter abandoning it half-way at shutdown.
        self._thread = threading.Thread(target=run, name=f"checkpoint-step-{timing.step}", daemon=False)
        self._thread.start()

    def wait(self) -> SaveTiming | None:
        """Block until the write in flight (if any) is finished; its timing, or its error raised here."""
        if self._thread is None:
            return None
        self._thread.join()
        timing, error = self._timing, self._error
        self._thread = self._timing = self._error = None
        if error is not None:
            raise error
        return timing
