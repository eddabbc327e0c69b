"""Loading a model for evaluation or export from whatever a user points at.

``load_model(SOURCE)`` accepts a clip_train run directory, its ``checkpoints/`` folder, one step directory or
its ``state.pt`` (the newest intact checkpoint is picked and its manifest checked), any weights file
``create_model`` reads (OpenAI release, OpenCLIP state dict, safetensors), and directories written by
``CLIPModel.save_pretrained`` or ``python -m clip_train.export --format open_clip``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clip_train.models import CLIP, CheckpointError, create_model
from clip_train.train import checkpoint as ckpt_io


def resolve_source(source: str | Path) -> Path:
    """The weights file or exported directory that ``source`` names (``CheckpointError`` if none)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (give a run dir, a checkpoint dir or a weights file)")
    if path.is_file():
        if path.name == ckpt_io.STATE_FILE and (path.parent / ckpt_io.MANIFEST_FILE).is_file():
            _verify(path.parent)
        return path
    if (path / "config.json").is_file() or (path / "open_clip_config.json").is_file():
        return path  # a Hugging Face or OpenCLIP export: read_weights knows both
    try:
        step_dir = ckpt_io.resolve_checkpoint_path(path)
    except ckpt_io.CheckpointCorrupt as err:
        raise CheckpointError(str(err)) from None
    if not (step_dir / ckpt_io.STATE_FILE).is_file():
        raise CheckpointError(
            f"{path} holds no checkpoint: expected a run dir with checkpoints/, a step_* directory with "
            f"{ckpt_io.STATE_FILE}, a weights file, or a Hugging Face / OpenCLIP export directory"
        )
    _verify(step_dir)
    return step_dir / ckpt_io.STATE_FILE


def _verify(step_dir: Path) -> None:
    try:
        ckpt_io.verify_checkpoint(step_dir)
    except ckpt_io.CheckpointCorrupt as err:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {err}") from None


def load_model(source: str | Path, name: str | None = None, device: str | torch.device = "cpu") -> CLIP:
    """The model in ``source``, in eval mode on ``device``.

    ``name`` is needed only for files that do not say their architecture themselves and whose shapes are
    ambiguous (e.g. a QuickGELU OpenCLIP state dict: ``ViT-B-16-quickgelu``).
    """
    path = resolve_source(source)
    if path.name == ckpt_io.STATE_FILE and (path.parent / "sharded").is_dir():
        return _load_sharded(path.parent, name).to(device).eval()
    model = create_model(name, pretrained=path, device=device)
    return model.eval()


def _load_sharded(step_dir: Path, name: str | None) -> CLIP:
    """An FSDP run's checkpoint: weights from the DCP shards, architecture from the replicated ``state.pt``."""
    from clip_train.models.factory import _as_model_config, build_model
    from clip_train.models.pretrained import LoadedWeights, load_weights_into
    from clip_train.models.registry import get_model_config
    from clip_train.train.sharded_checkpoint import read_sharded_model_state

    state = ckpt_io.load_checkpoint(step_dir)
    if name is not None:
        cfg = get_model_config(name)
    elif state.get("model_config"):
        cfg = _as_model_config(state["model_config"])
    else:
        raise CheckpointError(f"{step_dir} does not record its architecture; pass the model name (--model)")
    model = build_model(cfg)
    state_dict = {}
    for key, value in read_sharded_model_state(step_dir).items():
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers, if any made it into the names
            key = key.removeprefix(prefix)
        state_dict[key] = value
    weights = LoadedWeights(state_dict=state_dict, openai_layout=False)
    load_weights_into(model, weights, source=str(step_dir))
    return model
