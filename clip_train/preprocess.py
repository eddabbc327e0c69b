"""Images to model input from Python, as evaluation prepares them: ``clip_train.get_preprocess(model)``.

The counterpart of OpenCLIP's ``preprocess`` (the third value of ``create_model_and_transforms``): each
model's own resize (shorter side and centre crop, or squash), interpolation, mean and std, giving the pixels
OpenCLIP's transform gives up to a rare one-level rounding difference. Training and evaluation loaders do
the same work in their workers (uint8) and normalise on the device; this is for a few images at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clip_train.data.transforms import crop_resize, eval_box, normalize_on_device
from clip_train.models.clip import CLIP
from clip_train.models.coca import CoCa
from clip_train.models.config import ImagePreprocessing, ModelConfig
from clip_train.models.registry import get_model_config

ImageInput = Image.Image | str | os.PathLike


@dataclass(frozen=True)
class ImageTransform:
    """One model's evaluation preprocessing.

    ``transform(image)`` gives a float ``[3, S, S]`` tensor and ``transform([image, ...])`` an ``[N, 3, S, S]``
    batch; an image is a PIL image or a path to one. ``pixels`` gives the uint8 image before normalisation.
    """

    image_size: int
    preprocessing: ImagePreprocessing

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """uint8 ``[3, S, S]``: resized and cropped as the model's evaluation does, not yet normalised."""
        if not isinstance(image, Image.Image):
            return self._pixels_of_file(Path(image))
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


def get_preprocess(model: CLIP | CoCa | ModelConfig | str) -> ImageTransform:
    """The evaluation preprocessing of ``model`` (a CLIP or CoCa model, its config, or an architecture name)."""
    if isinstance(model, str):
        model = get_model_config(model)
    if isinstance(model, ModelConfig):
        return ImageTransform(model.vision.image_size, model.preprocessing)
    if isinstance(model, (CLIP, CoCa)):
        return ImageTransform(model.image_size, model.config.preprocessing)
    raise TypeError(f"get_preprocess takes a model, a ModelConfig or a model name, not {type(model).__name__}")
