"""Labelled images from an ImageFolder tree (``root/<class>/<image>``), as uint8 batches like the shard loader's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip_train.data.transforms import crop_resize, eval_box
from clip_train.models.config import ImagePreprocessing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def is_imagefolder(data: str | Path) -> bool:
    """A directory of class folders. A directory that holds ``.tar`` files itself is a folder of shards,
    read like shards everywhere else (training, retrieval)."""
    path = Path(data).expanduser()
    return path.is_dir() and not any(p.suffix == ".tar" and p.is_file() for p in path.iterdir())


def imagefolder_classes(root: str | Path) -> list[str]:
    """The class folder names of an ImageFolder, in sorted order."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"ImageFolder root not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>) and no .tar shards")
    return classes


def _comparable(name: str) -> str:
    """Folder and class names compare with ``_`` read as a space, case-insensitively ("Golden_retriever")."""
    return " ".join(name.replace("_", " ").split()).casefold()


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def folder_class_indices(root: str | Path, folders: list[str], classnames: list[str],
                         classnames_source: str = "--classnames", may_omit_classes: bool = False) -> list[int]:
    """For each class folder (sorted order), the index of its class in ``classnames``.

    When every folder is one of the class names, they are matched by name, whatever the file's order (so
    folders ``zero/ ... nine/`` pair with a file listing zero, one, ... in counting order). When no folder is
    a class name (ImageNet's WordNet-id folders with a file of readable names), line i names the i-th folder
    in sorted order, the torchvision/CLIP_benchmark convention, except that folders named ``0`` to ``N-1``
    (ImageNet-V2's) are classes 0 to N-1, not sorted as text ("10" before "2"). Anything else (a different
    count, or some names matching and some not) cannot be paired safely and is refused in one line that
    shows both.
    ``may_omit_classes``: a set whose folders are some of the classes, each named (a linear probe's test
    set, labelled by its training set's classes), is matched by name too.
    """
    wanted = [_comparable(n) for n in classnames]
    have = [_comparable(f) for f in folders]
    unique = len(set(wanted)) == len(wanted)
    if may_omit_classes and unique and set(have) <= set(wanted):
        return [wanted.index(name) for name in have]
    if may_omit_classes and len(folders) != len(classnames):
        unmatched = [f for f, name in zip(folders, have) if name not in wanted]
        raise ValueError(f"{root}: class folders {_preview(unmatched)} are not among the {len(classnames)} classes "
                         f"of {classnames_source} ({_preview(classnames)}); name each folder as one of them")
    if len(folders) != len(classnames):
        raise ValueError(
            f"{root} has {len(folders)} class folders ({_preview(folders)}) but {classnames_source} lists "
            f"{len(classnames)} names ({_preview(classnames)}); give one class name per folder"
        )
    if set(have) == set(wanted) and unique:
        return [wanted.index(name) for name in have]
    if sorted(int(f) if f.isdecimal() else -1 for f in folders) == list(range(len(classnames))):
        return [int(f) for f in folders]  # folders 0..N-1 (ImageNet-V2's layout): folder "10" is class 10
    if not set(have) & set(wanted):
        return list(range(len(folders)))
    unmatched = [f for f, name in zip(folders, have) if name not in wanted] or ["(none)"]
    unused = [n for n, name in zip(classnames, wanted) if name not in have or wanted.count(name) > 1]
    raise ValueError(
        f"{root}: class folders {_preview(unmatched)} are not among the names in {classnames_source}, whose "
        f"names {_preview(unused)} match no folder (or repeat); name every folder as its class (matched by "
        "name) or none (paired in sorted folder order)"
    )


def imagefolder_samples(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``(path, class index)`` for every image, classes in sorted folder order, and the folder names."""
    root = Path(root).expanduser()
    classes = imagefolder_classes(root)
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return samples, classes


def imagefolder_batches(
    root: str | Path, image_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
    max_samples: int | None = None, preprocessing: ImagePreprocessing | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of this rank's share (every world_size-th image), resized as ``preprocessing`` says (the
    model's; default: shorter side + center crop, bicubic)."""
    preprocessing = preprocessing or ImagePreprocessing()
    samples, _ = imagefolder_samples(root)
    if max_samples is not None:
        samples = samples[:max_samples]
    mine = samples[rank::world_size]
    for start in range(0, len(mine), batch_size):
        images, labels = [], []
        for path, label in mine[start : start + batch_size]:
            with Image.open(path) as image:
                pixels = crop_resize(image, eval_box(*image.size, image_size, preprocessing.resize_mode), image_size,
                                     preprocessing.interpolation)
            images.append(torch.from_numpy(np.array(pixels)).permute(2, 0, 1))  # writable copy of PIL's buffer
            labels.append(label)
        yield torch.stack(images), torch.tensor(labels)
