"""Safe decoding of one raw WebDataset sample, and the counter of samples skipped as bad.

A bad sample (unreadable or truncated image, decompression bomb, missing or non-UTF-8 caption, broken tar)
raises ``BadSample``; the stream counts it, warns at most once a minute, and moves on.
"""

from __future__ import annotations

import io
import logging
import random
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from clip_train.data.config import DEFAULT_MAX_IMAGE_PIXELS
from clip_train.data.remote import ShardUnavailable
from clip_train.data.transforms import Box, crop_range, crop_resize, eval_box, random_resized_crop_box

log = logging.getLogger(__name__)


class BadSample(Exception):
    """A sample that cannot be used; the message says why."""


class SkipCounter:
    """Cumulative count of skipped samples in one worker, with a rate-limited warning.

    While ``muted`` (a resumed worker re-reading samples it had already passed), errors are not counted
    again: the count restored from the checkpoint already includes them.
    """

    def __init__(self, count: int = 0, interval_s: float = 60.0, where: str = "data", shards: int = 0) -> None:
        self.count = count
        self.shards = shards  # shards abandoned as unavailable (open failed, or reads failed past the retries)
        self.last_shard_error = ""
        self.muted = False
        self.interval_s = interval_s
        self.where = where
        self._since_warning = 0
        self._last_warning = -float("inf")

    def skip(self, reason: str) -> None:
        """Count one skipped sample and warn if the last warning is older than the interval."""
        if self.muted:
            return
        self.count += 1
        self._since_warning += 1
        now = time.monotonic()
        if now - self._last_warning >= self.interval_s:
            log.warning("%s: skipped %d bad sample(s) since the last warning, %d in all; latest: %s",
                        self.where, self._since_warning, self.count, reason)
            self._since_warning = 0
            self._last_warning = now

    def skip_shard(self, url: str, reason: str) -> None:
        """Count a shard abandoned as unavailable, and name it in a warning (every time: each is news)."""
        if self.muted:
            return
        self.shards += 1
        self.last_shard_error = reason
        reason = reason[len(url) + 2:] if reason.startswith(url + ": ") else reason
        log.warning("%s: abandoned shard %s (%s); %d shard(s) skipped so far. Shards that stall or drop are "
                    "retried data.read_retries times with data.read_timeout_s per read", self.where, url,
                    reason, self.shards)

    def tar_error_handler(self, url: str) -> Callable[[Exception], bool]:
        """A webdataset exception handler for one shard: the first error counts as one skipped sample
        (a broken tar usually raises twice, for the member and for the next header), or, for a shard that
        could not be opened or read (``ShardUnavailable``), as one skipped shard; reading goes on."""
        seen = []

        def handler(exn: Exception) -> bool:
            if not seen:
                seen.append(exn)
                if isinstance(exn, ShardUnavailable):
                    self.skip_shard(url, str(exn.args[0]).split(" @ ")[0] if exn.args else str(exn))
                else:
                    self.skip(f"{url}: {type(exn).__name__}: {str(exn.args[0]) if exn.args else exn}"[:300])
            return True

        return handler


class SampleDecoder:
    """Raw sample (dict of bytes by extension) -> ``(uint8 image [S, S, 3], caption, label)``, or ``BadSample``.

    ``train=True`` uses a random resized crop (randomness from the ``rng`` passed per sample, so a resumed
    stream crops identically, always bicubic as OpenCLIP's training transform); ``train=False`` resizes as the
    model's preprocessing says: ``resize_mode`` ``shortest`` (shorter side, then center crop) or ``squash``
    (whole image to S x S), with ``interpolation`` ``bicubic`` or ``bilinear``.
    """

    def __init__(self, image_size: int, image_key: str = "jpg;png;jpeg;webp", text_key: str = "txt",
                 *, train: bool = True, crop_scale: Sequence[float] = (0.9, 1.0),
                 crop_ratio: Sequence[float] = (3 / 4, 4 / 3), max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 label_key: str | None = None, resize_mode: str = "shortest",
                 interpolation: str = "bicubic") -> None:
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.interpolation = interpolation
        self.image_keys = [k.strip().lower() for k in image_key.split(";") if k.strip()]
        self.text_key = text_key.lower()
        self.train = train
        self.crop_scale = crop_range("data.train_crop_scale", crop_scale, at_most_one=True)
        self.crop_ratio = crop_range("data.train_crop_ratio", crop_ratio)
        self.max_pixels = int(max_pixels)
        self.label_key = label_key.lower() if label_key else None

    def caption(self, sample: dict[str, object]) -> str:
        """The stripped UTF-8 caption, or ``BadSample`` when it is missing, empty or not UTF-8."""
        raw = sample.get(self.text_key)
        if raw is None:
            raise BadSample(f"no caption (.{self.text_key})")
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exn:
            raise BadSample(f"caption is not UTF-8 ({exn.reason} at byte {exn.start})") from None
        text = text.strip()
        if not text:
            raise BadSample("empty caption")
        return text

    def label(self, sample: dict[str, object]) -> int:
        """The integer class label, or -1 when the sample has none (labels are optional)."""
        raw = sample.get(self.label_key) if self.label_key else None
        try:
            return int(raw.decode("ascii").strip()) if isinstance(raw, bytes) else -1
        except (UnicodeDecodeError, ValueError):
            return -1

    def image(self, sample: dict[str, object], rng: random.Random | None) -> np.ndarray:
        """The cropped, resized uint8 ``[S, S, 3]`` image, or ``BadSample`` for anything unusable."""
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            raise BadSample(f"no image (looked for .{', .'.join(self.image_keys)})")
        with warnings.catch_warnings():
            # PIL warns, rather than fails, between its pixel limit and twice that: treat both as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))  # reads the header only
                width, height = image.size
                if width * height > self.max_pixels:
                    raise BadSample(f"image of {width}x{height} px exceeds data.max_image_pixels="
                                    f"{self.max_pixels} (decompression bomb?)")
                if width < 1 or height < 1:
                    raise BadSample(f"image of {width}x{height} px")
                box: Box
                if self.train:
                    box = random_resized_crop_box(width, height, self.crop_scale, self.crop_ratio,
                                                  rng or random.Random())
                    return crop_resize(image, box, self.image_size)
                box = eval_box(width, height, self.image_size, self.resize_mode)
                return crop_resize(image, box, self.image_size, self.interpolation)
            except BadSample:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
                raise BadSample(f"decompression bomb: {exn}") from None
            except Exception as exn:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "unusable"
                raise BadSample(f"unreadable image: {type(exn).__name__}: {exn}") from None

    def __call__(self, sample: dict[str, object], rng: random.Random | None = None
                 ) -> tuple[np.ndarray, str, int]:
        label = self.label(sample)
        # Cheap checks first: no image decode for a sample that will be dropped. A labelled sample
        # (classification shards such as ImageNet's, which often have no caption) needs no caption.
        text = "" if label >= 0 and self.text_key not in sample else self.caption(sample)
        return self.image(sample, rng), text, label
