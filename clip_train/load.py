"""Loading a model for evaluation or export from whatever a user points at.

``load_model(SOURCE)`` accepts a clip_train run directory, its ``checkpoints/`` folder, one step directory or
its ``state.pt`` (the newest intact checkpoint is picked and its manifest checked), any weights file
``create_model`` reads (OpenAI release, OpenCLIP state dict, safetensors), and directories written by
``CLIPModel.save_pretrained`` or ``python -m clip_train.export --format open_clip``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clip_train.checkpoint_paths import resolve_weights
from clip_train.models import CLIP, CheckpointError, create_model
from clip_train.train import checkpoint as ckpt_io


def resolve_source(source: str | Path) -> Path:
    """The weights file or exported directory that ``source`` names (``CheckpointError`` if none)."""
    return resolve_weights(source)


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
    from clip_train.models.factory import _as_model_config
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
    model = CLIP(cfg)
    state_dict = {}
    for key, value in read_sharded_model_state(step_dir).items():
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers, if any made it into the names
            key = key.removeprefix(prefix)
        state_dict[key] = value
    weights = LoadedWeights(state_dict=state_dict, openai_layout=False)
    load_weights_into(model, weights, source=str(step_dir))
    return model
