"""Labelled images from an ImageFolder tree (``root/<class>/<image>``), as uint8 batches like the shard loader's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip_train.data.transforms import center_crop_box, crop_resize

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def imagefolder_samples(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``(path, class index)`` for every image, classes in sorted folder order, and the folder names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"ImageFolder root not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return samples, classes


def imagefolder_batches(
    root: str | Path, image_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
    max_samples: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Resize-shorter-side + center-crop batches of this rank's share (every world_size-th image)."""
    samples, _ = imagefolder_samples(root)
    if max_samples is not None:
        samples = samples[:max_samples]
    mine = samples[rank::world_size]
    for start in range(0, len(mine), batch_size):
        images, labels = [], []
        for path, label in mine[start : start + batch_size]:
            with Image.open(path) as image:
                pixels = crop_resize(image, center_crop_box(*image.size), image_size)
            images.append(torch.from_numpy(np.array(pixels)).permute(2, 0, 1))  # writable copy of PIL's buffer
            labels.append(label)
        yield torch.stack(images), torch.tensor(labels)
