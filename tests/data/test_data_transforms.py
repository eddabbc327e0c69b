"""Crops, reduced-size JPEG decoding and on-device normalisation."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from clip_train.data import OPENAI_MEAN, OPENAI_STD, normalize_on_device
from clip_train.data.transforms import center_crop_box, crop_resize, random_resized_crop_box


def test_normalize_on_device_matches_clip_mean_and_std():
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    assert torch.allclose(normalize_on_device(images), expected, atol=1e-5)
    half = normalize_on_device(images, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), expected, atol=3e-2)
    with pytest.raises(TypeError):
        normalize_on_device(images.float())


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (50, 50)])
def test_random_resized_crop_covers_the_configured_area_and_ratio(size):
    rng = random.Random(0)
    width, height = size
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(width, height, (0.9, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        # either a sampled crop within the ranges, or the centred fallback clamped to the ratio range
        sampled = 0.88 <= w * h / (width * height) <= 1.0 and 0.74 <= w / h <= 1.34
        fallback = (w == width or h == height) and 0.74 <= w / h <= 1.34
        assert sampled or fallback


def test_eval_crop_is_the_centred_square():
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, :50] = (255, 0, 0)  # red margins left and right, blue centre square
    pixels[:, 150:] = (255, 0, 0)
    pixels[:, 50:150] = (0, 0, 255)
    image = Image.fromarray(pixels)
    out = crop_resize(image, center_crop_box(*image.size), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[..., 2].min() > 200 and out[..., 0].max() < 40


def test_large_jpegs_decode_at_reduced_size_with_nearly_the_same_result():
    yy, xx = np.mgrid[0:1200, 0:1600]
    pixels = np.stack([xx % 256, yy % 256, (xx + yy) // 12 % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    box = (100, 50, 1500, 1150)
    reduced = Image.open(io.BytesIO(buf.getvalue()))
    fast = crop_resize(reduced, box, 64)
    assert reduced.size[0] < 1600  # decoded at 1/2, 1/4 or 1/8 scale
    full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # converting first disables draft
    exact = crop_resize(full, box, 64)
    assert fast.shape == exact.shape == (64, 64, 3)
    assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 4


def test_grayscale_and_alpha_images_come_out_rgb():
    for mode in ("L", "RGBA", "P"):
        image = Image.new(mode, (40, 30))
        assert crop_resize(image, center_crop_box(40, 30), 16).shape == (16, 16, 3)
