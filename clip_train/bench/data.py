"""Benchmark of the data pipeline: training samples per second, ours against OpenCLIP's, on the same shards.

    python -m clip_train.bench.data PATTERN --image-size 224 --workers N [--batches K] [--batch-size 64]
        [--world-size W]
        [--baseline open_clip] [--synthetic DIR [--synthetic-samples 512]]
    python -m clip_train.bench.data --shuffle-quality [...]   (no images: see clip_train/bench/shuffle.py)

``--synthetic DIR`` first writes shards of LAION-sized JPEGs (400-800 px a side, smooth gradients, shapes
and noise, quality 90, random captions) into DIR unless it already holds some, and benchmarks those.

Ours: ``build_train_loader`` (resampled mode): reduced-size JPEG decoding, one crop+resize pass, uint8
batches, tokenised in the workers (normalisation happens later on the device, so it is not timed).
``--baseline open_clip``: OpenCLIP's training pipeline built from webdataset primitives as OpenCLIP's
``get_wds_dataset`` does (resampled shards, tar samples, shuffle, PIL RGB decode, OpenCLIP's training
transform, OpenCLIP's tokenizer, batching in the workers) in a ``wds.WebLoader``.

Both run ``--warmup`` batches (worker start-up, shuffle-buffer fill) before ``--batches`` timed ones. A
progress bar goes to stderr; the last line on stdout is JSON with ``samples_per_s``, ``read_mb_per_sample``
(bytes read by the process and its workers over the run, per sample delivered: the cost of the read
pattern), the machine, the date and the command. ``--world-size W`` reads as rank 0 of W ranks, where every
worker of every rank passes over the blocks it shares with the others (docs/data.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import io
import json
import multiprocessing
import os
import platform
import random
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from clip_train.bench import command_line
from clip_train.cli_help import DefaultsHelpFormatter

WORDS = (
    "a", "photo", "of", "the", "dog", "cat", "red", "blue", "small", "large", "old", "new", "city",
    "beach", "mountain", "person", "car", "tree", "house", "sunset", "street", "food", "table", "window",
    "with", "in", "on", "at", "near", "under", "sky", "green", "yellow", "white", "black", "bird",
    "flower", "river", "bridge", "night", "morning", "snow", "road", "garden", "boat",
)


class CliError(Exception):
    """A one-line error for the user."""


# ------------------------------------------------------------------------------------------ synthetic data


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
    """A 400-800 px JPEG (quality 90) with gradients, waves, flat shapes and mild noise: photo-like sizes."""
    width, height = (int(v) for v in rng.integers(400, 801, 2))
    x = np.arange(width, dtype=np.float32)[None, :, None]
    y = np.arange(height, dtype=np.float32)[:, None, None]
    slope_x, slope_y = rng.uniform(-0.3, 0.3, (2, 1, 1, 3)).astype(np.float32)
    wave = 40 * np.sin(x / rng.uniform(15, 120) + rng.uniform(0, 6, 3).astype(np.float32))
    image = 128 + slope_x * x + slope_y * y + wave
    for _ in range(int(rng.integers(3, 8))):  # flat rectangles: edges JPEG must spend bits on
        x0, y0 = int(rng.integers(0, width - 50)), int(rng.integers(0, height - 50))
        image[y0:y0 + int(rng.integers(30, 200)), x0:x0 + int(rng.integers(30, 200))] = rng.uniform(0, 255, 3)
    image += rng.integers(-10, 11, image.shape, dtype=np.int8)
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_synthetic_shards(out_dir: str, samples: int, per_shard: int = 128, seed: int = 0) -> str:
    """Shards of synthetic samples in ``out_dir`` (reused when its manifest exists); returns their pattern."""
    from clip_train.data.manifest import MANIFEST_NAME
    from clip_train.data.writer import ManifestShardWriter

    shards = -(-samples // per_shard)
    pattern = os.path.join(out_dir, f"{{00000..{shards - 1:05d}}}.tar") if shards > 1 else \
        os.path.join(out_dir, "00000.tar")
    if os.path.isfile(os.path.join(out_dir, MANIFEST_NAME)):
        return pattern
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    with ManifestShardWriter(out_dir, samples_per_shard=per_shard) as writer:
        for i in tqdm(range(samples), desc="synthetic shards", unit="img", file=sys.stderr):
            caption = " ".join(words.choice(WORDS) for _ in range(words.randint(6, 20)))
            writer.write({"__key__": f"{i:09d}", "jpg": synthetic_jpeg(rng), "txt": caption})
    return pattern


# ------------------------------------------------------------------------------------------ pipelines


def ours(pattern: str, image_size: int, workers: int, batch_size: int, shuffle: int, world_size: int = 1
         ) -> Iterable:
    """clip_train's training loader in resampled mode, with CLIP's 77-token tokenizer (rank 0 of ``world_size``)."""
    from clip_train.data import DataConfig, build_train_loader
    from clip_train.tokenizer import get_tokenizer

    cfg = DataConfig(train_shards=pattern, batch_size=batch_size, num_workers=workers, resampled=True,
                     shuffle_buffer=shuffle)
    return build_train_loader(cfg, image_size, get_tokenizer(), rank=0, world_size=world_size)


def bytes_read() -> int | None:
    """Bytes this process and its reaped children (DataLoader workers) have read (``rchar``), or None."""
    try:
        with open("/proc/self/io") as f:
            return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])
    except (OSError, KeyError, ValueError):
        return None


def open_clip_baseline(pattern: str, image_size: int, workers: int, batch_size: int, shuffle: int,
                       world_size: int = 1) -> Iterable:
    """OpenCLIP's training data path, assembled from webdataset stages in the order OpenCLIP uses."""
    import open_clip
    import webdataset as wds

    from clip_train.data.sources import resolve_sources

    urls = [u for s in resolve_sources(pattern) for u in s.urls]
    preprocess = open_clip.image_transform(image_size, is_train=True)  # RandomResizedCrop(0.9-1), normalise
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=shuffle, initial=shuffle),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                         persistent_workers=workers > 0)


PIPELINES = {"clip_train": ours, "open_clip": open_clip_baseline}


def measure(loader: Iterable, batches: int, warmup: int, batch_size: int, label: str) -> dict:
    """Time ``batches`` batches after ``warmup`` ones; throughput counts only the timed part.

    Also the bytes read per sample delivered over the whole run (warm-up, prefetch and the workers included:
    they are counted once the workers have exited), the cost of the reading pattern.
    """
    read_before = bytes_read()
    start = time.perf_counter()
    it: Iterator = iter(loader)
    first = None
    progress = tqdm(total=warmup + batches, desc=label, unit="batch", file=sys.stderr)
    for _ in range(warmup):
        next(it)
        first = first or time.perf_counter() - start
        progress.update()
    timed_start = time.perf_counter()
    for _ in range(batches):
        images, _tokens = next(it)[:2]
        if images.shape[0] != batch_size:
            raise RuntimeError(f"{label}: got a batch of {images.shape[0]}, expected {batch_size}")
        progress.update()
    elapsed = time.perf_counter() - timed_start
    progress.close()
    del it
    if hasattr(loader, "close"):
        loader.close()
    gc.collect()
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:  # reaped: their reads count
        time.sleep(0.05)
    read_after = bytes_read()
    read = None if read_before is None or read_after is None else read_after - read_before
    return {"samples_per_s": round(batches * batch_size / elapsed, 2), "timed_s": round(elapsed, 3),
            "first_batch_s": round(first, 3) if first is not None else None,
            "read_mb_per_sample": round(read / 2**20 / ((warmup + batches) * batch_size), 4) if read else None}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the result JSON as the last stdout line and returns the exit status."""
    if "--shuffle-quality" in (sys.argv[1:] if argv is None else argv):  # how well the order mixes shards
        from clip_train.bench import shuffle

        return shuffle.main(argv)
    parser = argparse.ArgumentParser(prog="python -m clip_train.bench.data", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("pattern", nargs="?", help="shard pattern, e.g. '/data/laion/{00000..00099}.tar'")
    parser.add_argument("--image-size", type=int, default=224, help="output resolution")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="sample shuffle buffer (both pipelines)")
    parser.add_argument("--world-size", type=int, default=1,
                        help="ours: read as rank 0 of this many ranks (--batch-size per rank), to see the reads")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads of this process (DataLoader workers always use 1)")
    parser.add_argument("--baseline", choices=["open_clip"], default=None,
                        help="time OpenCLIP's training transform + tokenizer instead of ours")
    parser.add_argument("--synthetic", metavar="DIR", default=None,
                        help="write (or reuse) synthetic 400-800 px JPEG shards in DIR and benchmark them")
    parser.add_argument("--synthetic-samples", type=int, default=512, help="samples to write with --synthetic")
    parser.add_argument("--shuffle-quality", action="store_true",
                        help="instead: how many shards a global batch mixes, global order vs per-worker streams "
                             "(no images; --shuffle-quality --help for its options)")
    args = parser.parse_args(argv)
    try:
        if args.batches < 1 or args.batch_size < 1 or args.warmup < 0 or args.workers < 0 or args.world_size < 1:
            raise CliError("--batches, --batch-size and --world-size must be >= 1, --warmup and --workers >= 0")
        import torch

        # With --workers 0 the transforms run here; one thread is what they get inside a DataLoader worker,
        # and on a busy machine a larger pool mostly waits at its barriers.
        torch.set_num_threads(max(1, args.torch_threads))
        pattern = args.pattern
        if args.synthetic:
            pattern = write_synthetic_shards(args.synthetic, args.synthetic_samples)
        if not pattern:
            raise CliError("give a shard PATTERN or --synthetic DIR")
        name = args.baseline or "clip_train"
        if args.baseline and args.world_size > 1:
            raise CliError("--world-size applies to clip_train's loader only (the baseline does not split ranks)")
        try:
            loader = PIPELINES[name](pattern, args.image_size, args.workers, args.batch_size, args.shuffle_buffer,
                                     args.world_size)
        except ValueError as exn:
            raise CliError(str(exn)) from None
        except ImportError as exn:
            raise CliError(f"--baseline {name} needs {exn.name}: pip install open-clip-torch") from None
        result = measure(loader, args.batches, args.warmup, args.batch_size, f"{name} ({args.workers} workers)")
    except CliError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    result = {
        "pipeline": name, **result, "image_size": args.image_size, "workers": args.workers,
        "world_size": args.world_size,
        "batch_size": args.batch_size, "batches": args.batches, "torch_threads": args.torch_threads,
        "pattern": pattern,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line("clip_train.bench.data", argv),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
