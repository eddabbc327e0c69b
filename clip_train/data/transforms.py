"""Image geometry on the CPU (crop boxes, reduced-size JPEG decoding, one resampling pass to uint8) and
the model's normalisation on the accelerator (OpenAI's mean/std unless the model says otherwise).

Workers never make float images: a uint8 batch is a quarter of the bytes to pin and copy, and
normalising on the device is nearly free.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from clip_train.models.config import OPENAI_IMAGE_MEAN as OPENAI_MEAN  # one source for OpenAI's statistics
from clip_train.models.config import OPENAI_IMAGE_STD as OPENAI_STD

RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
"""Interpolation names (a model's ``image_interpolation``) -> PIL filters."""

Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels


def crop_range(name: str, values: Sequence[float], at_most_one: bool = False) -> tuple[float, float]:
    """``[min, max]`` of a random resized crop's area fraction (``at_most_one``) or aspect ratio, as floats;
    ``ValueError`` naming ``name`` otherwise."""
    bound = " <= 1" if at_most_one else ""
    if len(values) == 2:
        low, high = float(values[0]), float(values[1])
        if 0 < low <= high and (high <= 1 or not at_most_one):
            return low, high
    raise ValueError(f"{name}={list(values)}: give [min, max] with 0 < min <= max{bound}")


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                            rng: random.Random) -> Box:
    """A random crop covering ``scale`` of the image's area with aspect ratio in ``ratio`` (log-uniform).

    Same distribution as torchvision's RandomResizedCrop: up to ten tries, then the largest centred crop
    whose ratio is clamped into range.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return (left, top, left + w, top + h)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int) -> Box:
    """The centred square of side min(width, height): resizing it to S equals "resize shorter side to S,
    then center-crop S" without resampling the discarded margins."""
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return (left, top, left + side, top + side)


def eval_box(width: int, height: int, size: int, resize_mode: str = "shortest") -> Box:
    """The source region an evaluation resize to ``size`` x ``size`` keeps.

    ``squash``: the whole image (aspect ratio not kept, nothing cut). ``shortest``: what "resize the shorter
    side to ``size``, then center-crop" keeps, with torchvision's rounding as OpenCLIP and OpenAI's CLIP use it
    (longer side truncated to ``int(size * long / short)``, crop offset rounded to whole resized pixels), so
    one resampling of this box gives their pixels without resampling the discarded margins.
    """
    if resize_mode == "squash":
        return (0.0, 0.0, float(width), float(height))
    if resize_mode != "shortest":
        raise ValueError(f"resize mode {resize_mode!r}: use shortest or squash")
    short, long = min(width, height), max(width, height)
    resized_long = int(size * long / short)
    offset = round((resized_long - size) / 2.0)
    scale = long / resized_long  # source pixels per resized pixel along the longer side
    start, end = offset * scale, (offset + size) * scale
    return (start, 0.0, end, float(height)) if width >= height else (0.0, start, float(width), end)


def crop_resize(image: Image.Image, box: Box, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Crop ``box`` (in the image's original pixels) and resize it to ``size``x``size`` RGB with
    ``interpolation`` (``bicubic`` | ``bilinear``), as uint8 HWC.

    A JPEG is first decoded at 1/2, 1/4 or 1/8 scale (PIL ``draft``, done inside libjpeg) when the crop
    stays at least ``size`` pixels on each side, which skips most of the decoding work for large photos.
    """
    width, height = image.size
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    if image.format == "JPEG":
        # draft picks the largest reduction keeping the image at least this big, so the crop keeps >= size px.
        need = (math.ceil(width * size / box_w), math.ceil(height * size / box_h))
        image.draft("RGB", need)
        if image.size != (width, height):
            sx, sy = image.size[0] / width, image.size[1] / height
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if image.mode != "RGB":
        image = image.convert("RGB")
    out = image.resize((size, size), RESAMPLING[interpolation], box=box)
    return np.asarray(out)


_STATS: dict[tuple[torch.device, tuple[float, ...], tuple[float, ...]], tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_on_device(images: torch.Tensor, dtype: torch.dtype = torch.float32,
                        mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` (already on its device) -> ``dtype`` normalised with ``mean`` and ``std`` (RGB,
    0-1 scale; OpenAI's by default, a model's from ``model.config.preprocessing``).

    The arithmetic runs in float32 and is cast once at the end, so bf16/fp16 inputs lose nothing extra.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_on_device expects uint8 images, got {images.dtype}")
    key = (images.device, tuple(float(v) for v in mean), tuple(float(v) for v in std))
    if key not in _STATS:
        mean_t = torch.tensor(key[1], device=images.device).view(1, 3, 1, 1) * 255.0
        std_t = torch.tensor(key[2], device=images.device).view(1, 3, 1, 1) * 255.0
        _STATS[key] = (mean_t, std_t)
    mean_t, std_t = _STATS[key]
    out = (images.float() - mean_t) / std_t
    return out if dtype == torch.float32 else out.to(dtype)
