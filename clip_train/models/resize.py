"""Positional embeddings of pretrained weights, resized to a model of another image size or context length.

Fine-tuning at a higher resolution (ViT-B-16 trained at 224 pixels, tuned at 384) or with a shorter context
keeps every weight but the positional embeddings, whose length follows the patch grid or the context. These
are interpolated as OpenCLIP's ``load_checkpoint`` does, so the same file gives the same model in both:
the ViT's patch grid bicubically (antialiased, corners not aligned) with the class token's row kept as it is,
the text tower's positions linearly. A ResNet's attention pool has the same layout (its first row is the
mean token's, then the final feature map's grid) and is resized the same way, which OpenCLIP does not do
(it refuses the file). A timm trunk's own table (``visual.trunk.pos_embed``) follows timm's rule, in the
tower (``TimmImageTower.resize_pretrained_positions``); any other shape difference is still refused by the
strict load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The image-grid embeddings, each with what its grid is (named in the log line): a ViT's, a ResNet pool's.
GRID_KEYS = {"visual.positional_embedding": "patch grid", "visual.attnpool.positional_embedding": "feature-map grid"}
TEXT_KEYS = ("positional_embedding", "text.positional_embedding")  # CLIP's layout, and custom-text towers'
GRID_EXTRA_TOKENS = 1  # the class token's row (a ResNet pool's mean token), in front of the grid


def _square_side(rows: int) -> int | None:
    side = math.isqrt(rows)
    return side if side * side == rows else None


def _resize_grid(embedding: torch.Tensor, old_side: int, new_side: int) -> torch.Tensor:
    extra, grid = embedding[:GRID_EXTRA_TOKENS], embedding[GRID_EXTRA_TOKENS:]
    grid = grid.float().reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1).to(embedding.dtype)
    return torch.cat([extra, grid], dim=0)


def _resize_sequence(embedding: torch.Tensor, new_rows: int) -> torch.Tensor:
    sequence = embedding.float().T.unsqueeze(0)  # (1, width, positions)
    sequence = F.interpolate(sequence, size=new_rows, mode="linear", antialias=False, align_corners=False)
    return sequence[0].T.to(embedding.dtype)


def resize_position_embeddings(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> list[str]:
    """Resize, in place, the positional embeddings of ``state_dict`` whose length differs from the model's
    (``expected``: its state dict) at the same width; returns a line per embedding resized."""
    resized = []
    for key in (*GRID_KEYS, *TEXT_KEYS):
        if key not in state_dict or key not in expected:
            continue
        old, new = state_dict[key], expected[key]
        if old.ndim != 2 or new.ndim != 2 or old.shape[1] != new.shape[1] or old.shape[0] == new.shape[0]:
            continue
        if key in GRID_KEYS:
            old_side, new_side = (_square_side(rows - GRID_EXTRA_TOKENS) for rows in (old.shape[0], new.shape[0]))
            if old_side is None or new_side is None:
                continue
            state_dict[key] = _resize_grid(old, old_side, new_side)
            resized.append(f"{key} resized from a {old_side}x{old_side} to a {new_side}x{new_side} "
                           f"{GRID_KEYS[key]} (bicubic)")
        else:
            state_dict[key] = _resize_sequence(old, new.shape[0])
            resized.append(f"{key} resized from {old.shape[0]} to {new.shape[0]} text positions (linear)")
    return resized
