"""What a user may point at wherever a checkpoint is asked for, resolved in one place.

``create_model(pretrained=...)``, the training config's ``model.pretrained``, ``python -m clip_train.export``,
``python -m clip_train.eval --checkpoint`` and ``ckpt.resume=PATH`` all accept the same things:

- a run directory (its newest intact checkpoint under ``checkpoints/``),
- its ``checkpoints/`` folder, or ``checkpoints/latest``,
- one step directory (``checkpoints/step_000001000``) or its ``state.pt``,
- and, where weights are wanted rather than a training state, any weights file (OpenAI release, OpenCLIP
  state dict or training checkpoint, safetensors) or a Hugging Face / OpenCLIP export directory.

A step directory is used only after its manifest verifies (sizes and SHA-256 of every file).
"""

from __future__ import annotations

import os
from pathlib import Path

from clip_train.models.pretrained import CheckpointError
from clip_train.models.registry import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, hub_name_message
from clip_train.train import checkpoint as ckpt_io

EXPORT_CONFIG_FILES = ("config.json", "open_clip_config.json")  # Hugging Face / OpenCLIP export directories

_EXPECTED = (
    "a run dir, its checkpoints/ (or checkpoints/latest), a step_* directory or its state.pt"
)


def resolve_training_checkpoint(source: str | os.PathLike) -> Path:
    """The verified step directory of the clip_train training checkpoint that ``source`` names.

    Raises ``CheckpointError`` (one line) when there is none, or when the newest candidate is damaged and no
    older one verifies.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (give {_EXPECTED})")
    try:
        step_dir = ckpt_io.resolve_checkpoint_path(path)
    except ckpt_io.CheckpointCorrupt as err:
        raise CheckpointError(str(err)) from None
    if not (step_dir / ckpt_io.STATE_FILE).is_file():
        from clip_train.from_openclip import newest_openclip_checkpoint

        openclip = newest_openclip_checkpoint(path)
        hint = (f"; it holds OpenCLIP checkpoints: name one file, e.g. {openclip}" if openclip else
                " (to start from a weights file, set model.pretrained=PATH instead)")
        raise CheckpointError(f"{path} holds no clip_train training checkpoint: expected {_EXPECTED}{hint}")
    _verify(step_dir)
    return step_dir


def resolve_weights(source: str | os.PathLike) -> Path:
    """The weights file or export directory that ``source`` names, for ``read_weights``.

    A file is itself (a step's ``state.pt`` verified against its manifest); an export directory is itself
    (also spelt ``local-dir:DIR``, as OpenCLIP and CLIP_benchmark users write it); anything else is resolved
    as a training checkpoint, giving that step's ``state.pt``.
    """
    path = weights_path(source)
    if not path.exists():
        raise CheckpointError(weights_not_found(str(source)))
    if path.is_file():
        if path.name == ckpt_io.STATE_FILE and (path.parent / ckpt_io.MANIFEST_FILE).is_file():
            _verify(path.parent)
        return path
    if any((path / name).is_file() for name in EXPORT_CONFIG_FILES):
        return path
    if _holds_training_checkpoints(path):
        return resolve_training_checkpoint(path) / ckpt_io.STATE_FILE
    raise CheckpointError(
        f"{path} holds no checkpoint: expected {_EXPECTED}, a weights file, or a Hugging Face / OpenCLIP "
        f"export directory ({' or '.join(EXPORT_CONFIG_FILES)})"
    )


def weights_path(source: str | os.PathLike) -> Path:
    """The path a weights setting names: ``~`` expanded, OpenCLIP's ``local-dir:`` prefix dropped."""
    return Path(str(source).removeprefix(LOCAL_DIR_PREFIX)).expanduser()


def weights_not_found(source: str) -> str:
    """Why ``source`` names no weights here, and what to give instead (OpenCLIP tags and hub names included)."""
    if source.startswith(HF_HUB_PREFIX):
        return f"checkpoint not found: {source}: {hub_name_message(source.removeprefix(HF_HUB_PREFIX))}"
    if _looks_like_a_pretrained_tag(source):  # OpenCLIP's pretrained="openai" / "laion2b_s34b_b79k"
        return (f"checkpoint not found: {source} is no file here, and clip_train reads local files only (it "
                "downloads nothing); for an OpenCLIP pretrained tag, download its weights once (e.g. `hf download "
                "timm/vit_base_patch16_clip_224.openai --local-dir DIR`) and give DIR instead")
    return (f"checkpoint not found: {Path(source).expanduser()} (give {_EXPECTED}, a weights file, or an "
            "exported Hugging Face / OpenCLIP directory)")


def _looks_like_a_pretrained_tag(source: str) -> bool:
    """A bare word such as ``openai`` or ``laion2b_s34b_b79k``: no folder, no file suffix, no home dir."""
    return bool(source) and not any(char in source for char in ("/", os.sep, ".", "~", ":"))


def _holds_training_checkpoints(path: Path) -> bool:
    """A step directory, a checkpoints/ folder (or ``latest``), or a run dir with checkpoints/."""
    return ((path / ckpt_io.STATE_FILE).exists() or (path / "checkpoints").is_dir()
            or (path / ckpt_io.LATEST).exists() or bool(ckpt_io.list_checkpoints(path)))


def _verify(step_dir: Path) -> None:
    try:
        ckpt_io.verify_checkpoint(step_dir)
    except ckpt_io.CheckpointCorrupt as err:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {err}") from None
