"""Capturing and restoring every random number generator a rank uses, as weights_only-loadable state."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_streams(per_rank: list[dict[str, Any]], rank: int, seed: int, step: int) -> None:
    """Give this rank the random streams it had when the checkpoint was written, when it existed then.

    Data augmentation does not use these streams (each sample's crop is seeded by its global position), so
    they matter only for model-side randomness such as ``model.vision.patch_dropout``, which is per rank by
    nature. A rank beyond the saved world size starts fresh streams from ``(seed, rank, step)``, so a resume
    at another shape is still reproducible.
    """
    if rank < len(per_rank) and "rng" in per_rank[rank]:
        set_rng_state(per_rank[rank]["rng"])
        return
    seed_everything(seed + rank + 1_000_003 * (step + 1))
