"""Images to model input from Python: ``clip_train.get_preprocess(model)`` and ``create_model_and_transforms``.

The counterparts of OpenCLIP's two transforms. Evaluation (``preprocess_val``): each model's own resize
(shorter side and centre crop, or squash), interpolation, mean and std, giving the pixels OpenCLIP's
transform gives up to a rare one-level rounding difference. Training (``train=True``): the random resized
crop the training loader makes (area 90-100%, aspect 3:4 to 4:3, bicubic, as OpenCLIP's default), then the
same normalisation. The loaders do this work in their workers (uint8) and normalise on the device; this is
for a few images at a time, in scripts ported from OpenCLIP.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clip_train.data.config import DataConfig
from clip_train.data.transforms import (
    crop_range,
    crop_resize,
    eval_box,
    normalize_on_device,
    random_resized_crop_box,
)
from clip_train.models.clip import CLIP
from clip_train.models.coca import CoCa
from clip_train.models.config import ImagePreprocessing, ModelConfig
from clip_train.models.factory import create_model
from clip_train.models.registry import get_model_config

ImageInput = Image.Image | str | os.PathLike
# The training loader's defaults (data.train_crop_scale, data.train_crop_ratio), OpenCLIP's too.
TRAIN_CROP_SCALE = tuple(DataConfig().train_crop_scale)
TRAIN_CROP_RATIO = tuple(DataConfig().train_crop_ratio)


@dataclass(frozen=True)
class ImageTransform:
    """One model's evaluation (or, with ``train_crop_scale`` set, training) preprocessing.

    ``transform(image)`` gives a float ``[3, S, S]`` tensor and ``transform([image, ...])`` an ``[N, 3, S, S]``
    batch; an image is a PIL image or a path to one. ``pixels`` gives the uint8 image before normalisation.
    """

    image_size: int
    preprocessing: ImagePreprocessing
    train_crop_scale: tuple[float, float] | None = None
    """Set: a random resized crop over this fraction of the image's area (training), else the model's resize."""
    train_crop_ratio: tuple[float, float] = TRAIN_CROP_RATIO
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @property
    def is_train(self) -> bool:
        return self.train_crop_scale is not None

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """uint8 ``[3, S, S]``: cropped and resized as the model's training or evaluation does, not normalised."""
        if not isinstance(image, Image.Image):
            return self._pixels_of_file(Path(image))
        if self.train_crop_scale is not None:  # training crops are always bicubic, as the loader's
            box = random_resized_crop_box(*image.size, self.train_crop_scale, self.train_crop_ratio, self.rng)
            array = crop_resize(image, box, self.image_size)
        else:
            box = eval_box(*image.size, self.image_size, self.preprocessing.resize_mode)
            array = crop_resize(image, box, self.image_size, self.preprocessing.interpolation)
        return torch.from_numpy(np.array(array)).permute(2, 0, 1).contiguous()  # a writable copy of PIL's buffer

    def _pixels_of_file(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                return self.pixels(image)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read {path} as an image ({type(err).__name__})") from None

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, S, S]`` (on any device) -> float32 normalised with the model's mean and std."""
        return normalize_on_device(pixels, mean=self.preprocessing.mean, std=self.preprocessing.std)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        if isinstance(images, (Image.Image, str, os.PathLike)):
            return self.normalize(self.pixels(images)[None])[0]
        if not images:
            raise ValueError("no images given: pass a PIL image, a path, or a non-empty list of them")
        return self.normalize(torch.stack([self.pixels(image) for image in images]))


def get_preprocess(
    model: CLIP | CoCa | ModelConfig | str,
    train: bool = False,
    crop_scale: Sequence[float] = TRAIN_CROP_SCALE,
    crop_ratio: Sequence[float] = TRAIN_CROP_RATIO,
    seed: int | None = None,
) -> ImageTransform:
    """The preprocessing of ``model`` (a CLIP or CoCa model, its config, or an architecture name).

    ``train=False``: evaluation's deterministic resize. ``train=True``: the training loader's random resized
    crop (``crop_scale`` of the area, aspect in ``crop_ratio``, as ``data.train_crop_scale``/``_ratio``), drawn
    from a generator seeded with ``seed`` (None: a fresh one).
    """
    if isinstance(model, str):
        model = get_model_config(model)
    if isinstance(model, ModelConfig):
        size, preprocessing = model.vision.image_size, model.preprocessing
    elif isinstance(model, (CLIP, CoCa)):
        size, preprocessing = model.image_size, model.config.preprocessing
    else:
        raise TypeError(f"get_preprocess takes a model, a ModelConfig or a model name, not {type(model).__name__}")
    if not train:
        return ImageTransform(size, preprocessing)
    scale, ratio = crop_range("crop_scale", crop_scale, at_most_one=True), crop_range("crop_ratio", crop_ratio)
    return ImageTransform(size, preprocessing, train_crop_scale=scale, train_crop_ratio=ratio,
                          rng=random.Random(seed))


def create_model_and_transforms(
    name: str | None = None, pretrained: str | os.PathLike | None = None, **kwargs: object
) -> tuple[CLIP, ImageTransform, ImageTransform]:
    """``(model, preprocess_train, preprocess_val)``, as OpenCLIP's function of the same name returns them:
    ``create_model(name, pretrained, **kwargs)`` and its two :func:`get_preprocess` transforms."""
    model = create_model(name, pretrained, **kwargs)  # type: ignore[arg-type]
    return model, get_preprocess(model, train=True), get_preprocess(model)

