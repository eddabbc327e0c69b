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

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

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
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointCorrupt(f"{path.name}: {STATE_FILE} cannot be read safely ({first_line[:200]})") from None


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps everything), and stale temporaries."""
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)
