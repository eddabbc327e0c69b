"""The typed schema of the ``data`` config group (a dataclass, so Hydra/OmegaConf can validate overrides)."""

# OmegaConf 2.3 reads these annotations at runtime and does not understand `X | None` or `list[X]`.
# ruff: noqa: UP006, UP035, UP045

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

# PIL's own default; an image with more pixels than this is treated as a decompression bomb and skipped.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Options that were renamed: old name -> (new name, why). The old name is refused in one line naming the new
# one (``renamed_option_message``), by the CLI's config check and by ``as_data_config``.
RENAMED_OPTIONS = {
    "shards_per_block": ("shuffle_shards",
                         "it sets the global order's mixing, which is the same at every world size and worker count"),
}


def renamed_option_message(option: str, prefix: str = "data.") -> str | None:
    """``"data.OLD was renamed data.NEW: why"`` when ``option`` is a renamed data option, else None."""
    if option not in RENAMED_OPTIONS:
        return None
    new, why = RENAMED_OPTIONS[option]
    return f"{prefix}{option} was renamed {prefix}{new}: {why}"


@dataclass
class DataConfig:
    """Where the training and evaluation samples come from and how they are read.

    OmegaConf 2.3 reads these annotations, so they use ``Optional``/``List`` from ``typing``.
    """

    train_shards: Any = None
    """WebDataset shards to train on: a brace pattern (``/data/laion/{00000..41407}.tar``), a glob, a list of
    patterns, a ``.txt`` file listing one shard per line, ``s3://``/``gs://`` patterns, globs or folder
    prefixes (credentials and ``AWS_ENDPOINT_URL`` from the environment), ``pipe:``/http(s) URLs, or a list of
    ``{shards: ..., weight: w}`` sources mixed by weight (resampled mode). ``demo`` = the built-in digits."""

    val_shards: Optional[str] = None
    """Shards for evaluation (same forms as ``train_shards``; ``demo`` = the built-in digits' validation split)."""

    batch_size: int = 256
    """Samples per batch on each rank (the global batch is this times the world size)."""

    num_workers: int = 4
    """DataLoader worker processes per rank; 0 reads in the training process."""

    image_key: str = "jpg;png;jpeg;webp"
    """Tar member extensions that hold the image, tried in order (``;``-separated)."""

    text_key: str = "txt"
    """Tar member extension that holds the caption (UTF-8)."""

    label_key: str = "cls"
    """Tar member extension holding an integer class label, read by the eval loader only (-1 when absent)."""

    resampled: bool = True
    """True: blocks of shards drawn with replacement, endlessly (the usual choice at scale).
    False: epoch mode, every shard read once per epoch and every rank given the same number of batches."""

    shuffle_buffer: int = 1000
    """Samples of a block's shuffle buffer (0 disables sample shuffling). Part of the global order, like the
    seeds: the same at every world size and worker count, recorded in checkpoints (a resume with another
    value re-plans the epoch, with one warning). Every worker holds one buffer of raw samples while it reads
    a block."""

    shuffle_shards: int = 4
    """Shards interleaved into one block of the global order, read interleaved through the shuffle buffer.
    Part of the order, like the seeds: the same at every world size and worker count, recorded in
    checkpoints (a resume with another value re-plans the epoch, with one warning). More mixes better;
    resuming re-reads up to this many shards' bytes (without decoding) to reach the saved position.
    (Formerly ``data.shards_per_block``.)"""

    order_streams: int = 1
    """Parallel streams of the global order: each global batch takes an equal share of consecutive positions
    from each stream (epoch mode: the epoch's order cut into this many segments; resampled: streams with their
    own seeds). A batch then mixes ``order_streams x shuffle_shards`` shards, and with ``order_streams`` a
    multiple of the world size each rank reads only its own streams' shards. Part of the order, like the
    seeds (recorded in checkpoints), so set it once per dataset: e.g. the GPU count of the largest job that
    will train on it. Must divide the global batch."""

    train_crop_scale: List[float] = field(default_factory=lambda: [0.9, 1.0])
    """Random resized crop: range of the crop's area as a fraction of the image's."""

    train_crop_ratio: List[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    """Random resized crop: range of the crop's aspect ratio (width / height)."""

    epoch_samples: Optional[int] = None
    """Samples per epoch in epoch mode when the shards have no ``shards.json`` manifest (or OpenCLIP
    ``sizes.json``); it wins over an OpenCLIP ``__len__`` file."""

    manifest: Optional[str] = None
    """Path or URL of a ``shards.json`` manifest (or of OpenCLIP's ``sizes.json``), when it does not sit next to
    the shards (e.g. ``pipe:`` URLs)."""

    seed: int = 0
    """Data-order seed, combined with the training seed: changing either changes shard and sample order."""

    prefetch_factor: int = 2
    """Batches each worker prepares ahead (uint8 batches are a quarter of float ones, so this is cheap)."""

    pin_memory: Optional[bool] = None
    """Pin batches in page-locked memory for fast non-blocking copies; None = when CUDA is available."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images with more pixels (width x height) are skipped as decompression bombs."""

    eval_batch_size: Optional[int] = None
    """Batch size of the eval loader; None = ``batch_size``."""

    connect_timeout_s: float = 10.0
    """Remote shards (s3://, gs://, http(s)://): seconds to wait for a connection before the try fails."""

    read_timeout_s: float = 60.0
    """Remote shards (also ``pipe:`` commands): seconds without a byte after which the try fails."""

    read_retries: int = 3
    """Tries after a failed one (a timeout, a dropped connection) before the shard is abandoned and counted in
    ``skipped_shards``; each retry resumes at the byte reached. Any progress resets the count."""

    retry_backoff_s: float = 1.0
    """Wait before the first retry; it doubles with each further one."""

    max_failed_shards_in_row: int = 16
    """Shards in a row that cannot be read (abandoned after their retries, with no usable sample between
    them) after which a worker stops the run with one line: the store is unreachable, not flaky."""

    stall_timeout_s: float = 300.0
    """When the loader has delivered no batch for this long, it warns naming the shards it is waiting on
    (and again each period); 0 disables the warning."""
