"""Shuffle quality of the training order: how many shards a global batch mixes, before and after the global order.

    python -m clip_train.bench.data --shuffle-quality [--shards 512] [--samples-per-shard 4000]
        [--positions 16384] [--world-sizes 1,8,64] [--workers-list 1,4] [--global-batches 256,4096]
        [--shuffle-shards-list 4,16,64] [--shuffle-buffer 1000] [--order-streams-list 8,64]

No images: tiny tars (one few-byte member per sample, uneven sample counts around ``--samples-per-shard``)
are written to a temporary directory, and the sample at each training position is listed by the real code.

- **Global order** (today): ``order.GlobalOrder`` + ``reader.block_samples``; global batch ``b`` is positions
  ``[b·G, (b+1)·G)``. Ranks and workers only split a batch (tests/test_bench_shuffle.py checks the batches
  against ``stream.GlobalBatchStream`` at several shapes), so its figures hold at any W and K.
- **Global order with parallel streams** (``data.order_streams``, ``--order-streams-list``): read by
  ``stream.GlobalBatchStream`` itself at one rank and one worker (tests/test_order_streams.py checks that other
  shapes give the same batches); open shards and buffer samples are given per reader at W = 1 (a reader of a
  rank that owns S / W streams holds S / W of them).
- **Per-worker streams** (the loader before the global order): ``plan.StreamPlan(rank=r, world_size=W,
  num_workers=K, shards_per_block=4)`` + ``reader.block_samples`` per worker; rank ``r``'s local batch ``n``
  is the next ``G/W`` samples of its worker ``n % K`` (DataLoader's round robin), the global batch is the
  ranks' local batches side by side (what the all-gathered loss sees). Epoch mode here uses today's epoch
  assignment (shuffled shards dealt round robin to the W·K workers); the old loader cut the same shuffled list
  into one contiguous run of samples per worker, which differs only at the seams between workers.

Figures over the first ``--positions`` training positions of epoch 0 (``positions // G`` global batches):
distinct shards per global batch (mean, min); the largest share of one global batch taken by a single shard
(mean, max); and, for position mixing, **tar neighbours in one batch**: the share of pairs of samples
stored next to each other in a tar (indices ``i``, ``i + 1``) that land in the same global batch. A full
shuffle of an epoch of N samples gives about G / N; reading tars sequentially keeps neighbours close, and
the shuffle buffer is what pulls them apart (it matters when tars are written in a meaningful order, e.g.
by source or by time). The cost side per reader (one DataLoader worker): shards open at once and
shuffle-buffer samples held.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import islice

import numpy as np

from clip_train.bench import command_line
from clip_train.cli_help import DefaultsHelpFormatter
from clip_train.data.decode import SkipCounter
from clip_train.data.order import GlobalOrder
from clip_train.data.plan import StreamPlan, mix_seed
from clip_train.data.reader import block_samples
from clip_train.data.sources import ShardSource
from clip_train.data.stream import GlobalBatchStream

SampleId = tuple[int, int]  # (shard index in the listed order, sample index inside its tar)
MODES = ("epoch", "resampled")
OLD_SHARDS_PER_BLOCK = 4  # the per-worker block width of the loader before the global order


class CliError(Exception):
    """A one-line error for the user."""


@dataclass(frozen=True)
class KeyShards:
    """Tiny shards written for the benchmark: their paths and sample counts."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def source(self) -> ShardSource:
        return ShardSource("bench", self.urls)


def write_key_shards(out_dir: str, shards: int, samples_per_shard: int, seed: int = 0) -> KeyShards:
    """``shards`` tars of one 2-byte member per sample, uneven counts: one of 8 sizes spread over
    ``samples_per_shard`` ± 25%, drawn per shard.

    Shards of the same size are hard links of one written tar (keys ``000000``...): a sample is told apart by
    its shard's path, so this changes nothing in what is measured and keeps writing fast.
    """
    rng = random.Random(seed)
    sizes = sorted({max(1, round(samples_per_shard * (0.75 + 0.5 * i / 7))) for i in range(8)})
    written: dict[int, str] = {}
    urls, counts = [], []
    for s in range(shards):
        count = rng.choice(sizes)
        path = os.path.join(out_dir, f"{s:05d}.tar")
        if count in written:
            try:
                os.link(written[count], path)
            except OSError:  # a file system without hard links
                shutil.copyfile(written[count], path)
        else:
            with tarfile.open(path, "w") as tar:
                for i in range(count):
                    info = tarfile.TarInfo(f"{i:06d}.txt")
                    info.size = 2
                    tar.addfile(info, io.BytesIO(b"ok"))
            written[count] = path
        urls.append(path)
        counts.append(count)
    return KeyShards(tuple(urls), tuple(counts))


def _keep_going(_url: str) -> Callable[[Exception], bool]:
    """The reader's error handler for every shard (the tars written here are clean)."""
    return lambda exn: True


class SampleIds:
    """Turns reader samples into ``(shard, index)`` pairs."""

    def __init__(self, data: KeyShards) -> None:
        self._shard = {url: i for i, url in enumerate(data.urls)}

    def __call__(self, sample: dict) -> SampleId:
        return self._shard[str(sample["__url__"])], int(str(sample["__key__"]))


# ------------------------------------------------------------------------------------------ the two orders


def global_order_ids(data: KeyShards, mode: str, shuffle_shards: int, shuffle_buffer: int, positions: int,
                     seed: int) -> list[SampleId]:
    """The sample at each of the first ``positions`` global positions of epoch 0 of the global order."""
    order = GlobalOrder([data.source], mode, seed=seed, shuffle_shards=shuffle_shards,
                        counts=list(data.counts), fallback_count=data.counts[0])
    ids, to_id, index = [], SampleIds(data), 0
    while len(ids) < positions:
        size = order.block_size(0, index)
        block = [to_id(s) for s in islice(block_samples(order.block(0, index), _keep_going, shuffle_buffer,
                                                        lazy=True), min(size, positions - len(ids)))]
        if len(block) < min(size, positions - len(ids)):
            raise RuntimeError(f"block {index} gave {len(block)} samples, its counts say {size}")
        ids.extend(block)
        index += 1
    return ids


class _IdDecoder:
    """Stands in for the image decoder in ``GlobalBatchStream``: the sample's id as its text."""

    image_size = 1

    def __init__(self, data: KeyShards) -> None:
        self.to_id = SampleIds(data)

    def __call__(self, sample: dict, rng: object) -> tuple[np.ndarray, SampleId, int]:
        return np.zeros((1, 1, 3), np.uint8), self.to_id(sample), 0


def streamed_batches(data: KeyShards, mode: str, streams: int, shuffle_shards: int, shuffle_buffer: int,
                     global_batch: int, batches: int, seed: int) -> list[list[SampleId]]:
    """The first ``batches`` global batches of the global order with ``streams`` parallel streams, read by the
    training stream itself (one rank, one worker: any other shape gives the same batches)."""
    order = GlobalOrder([data.source], mode, seed=seed, shuffle_shards=shuffle_shards,
                        counts=list(data.counts), fallback_count=data.counts[0])
    per_epoch = sum(data.counts) // global_batch if mode == "epoch" else None
    stream = GlobalBatchStream(order, _IdDecoder(data), list, global_batch, 0, 1, shuffle_buffer,
                               streams=streams, batches_per_epoch=per_epoch)
    stream.end_batch = batches
    return [list(ids) for _, ids, _ in stream._batches(0, 1, SkipCounter(0, where="bench"))]


class WorkerStreams:
    """Per-worker sample streams of the old loader, each read once and shared by the configurations that
    contain the same worker (in resampled mode a global worker's stream depends on its index only)."""

    def __init__(self, data: KeyShards, shuffle_buffer: int, seed: int) -> None:
        self.data, self.shuffle_buffer, self.seed = data, shuffle_buffer, seed
        self._to_id = SampleIds(data)
        self._cache: dict[tuple, list[SampleId]] = {}
        self.samples_listed = 0

    def stream(self, plan: StreamPlan, logical: int, need: int) -> list[SampleId]:
        """The first ``need`` samples worker ``logical`` of ``plan``'s rank yields in epoch 0."""
        workers = plan.num_global_workers if plan.mode == "epoch" else None
        key = (plan.mode, workers, plan.global_worker(logical))
        got = self._cache.get(key, [])
        if len(got) < need:
            got, index = [], 0
            while len(got) < need:
                block = plan.block(0, logical, index)
                if block is None:  # pragma: no cover - train modes pad or never end
                    break
                samples = block_samples(block, _keep_going, self.shuffle_buffer, lazy=True)
                got.extend(self._to_id(s) for s in islice(samples, need - len(got)))
                index += 1
            self.samples_listed += len(got)
            self._cache[key] = got
        return got[:need]


def per_worker_batches(streams: WorkerStreams, mode: str, world_size: int, workers: int, global_batch: int,
                       batches: int) -> list[list[SampleId]]:
    """The first ``batches`` global batches of the loader before the global order at W ranks x K workers."""
    local = global_batch // world_size
    per_worker = -(-batches // workers)  # local batches the busiest worker yields
    counts = list(streams.data.counts) if mode == "epoch" else None
    out: list[list[SampleId]] = [[] for _ in range(batches)]
    for rank in range(world_size):
        plan = StreamPlan([streams.data.source], mode, seed=streams.seed, rank=rank, world_size=world_size,
                          num_workers=workers, shards_per_block=OLD_SHARDS_PER_BLOCK, counts=counts)
        own = [streams.stream(plan, w, per_worker * local) for w in range(workers)]
        for n in range(batches):
            turn = n // workers
            out[n].extend(own[n % workers][turn * local:(turn + 1) * local])
    return out


# ------------------------------------------------------------------------------------------ figures


def neighbours_together(batches: Sequence[Sequence[SampleId]]) -> float:
    """Share of tar neighbours (samples ``i`` and ``i + 1`` of one shard, both in ``batches``) that land in
    the same global batch; a sample seen twice (resampled mode) counts where it is first seen."""
    batch_of: dict[SampleId, int] = {}
    for b, batch in enumerate(batches):
        for sample in batch:
            batch_of.setdefault(sample, b)
    pairs = together = 0
    for (shard, index), b in batch_of.items():
        other = batch_of.get((shard, index + 1))
        if other is not None:
            pairs += 1
            together += other == b
    return together / pairs if pairs else float("nan")


@dataclass
class Figures:
    """Mixing figures of one configuration, and what one reader holds to produce it."""

    order: str  # "global" or "per-worker"
    mode: str
    world_size: int | None  # None: any (the global order does not depend on it)
    workers: int | None
    global_batch: int
    shuffle_shards: int  # shards a block interleaves (old loader: per worker)
    batches: int
    distinct_shards_mean: float
    distinct_shards_min: int
    top_shard_share_mean: float
    top_shard_share_max: float
    neighbours_together: float
    open_shards_per_reader: int
    buffer_samples_per_reader: int
    readers: int | None  # DataLoader workers over all ranks (None: any)
    order_streams: int = 1  # data.order_streams of the global order (the old loader: 1)


def figures(batches: Sequence[Sequence[SampleId]], **config: object) -> Figures:
    """Figures of a list of global batches (``config`` fills the descriptive fields)."""
    distinct, top = [], []
    for batch in batches:
        shards = Counter(shard for shard, _ in batch)
        distinct.append(len(shards))
        top.append(max(shards.values()) / len(batch))
    return Figures(batches=len(batches), distinct_shards_mean=round(sum(distinct) / len(distinct), 2),
                   distinct_shards_min=min(distinct), top_shard_share_mean=round(sum(top) / len(top), 3),
                   top_shard_share_max=round(max(top), 3), neighbours_together=round(neighbours_together(batches), 3),
                   **config)  # type: ignore[arg-type]


def split(ids: Sequence[SampleId], global_batch: int) -> list[list[SampleId]]:
    """Consecutive global batches of ``global_batch`` positions (a last partial one dropped)."""
    return [list(ids[b * global_batch:(b + 1) * global_batch]) for b in range(len(ids) // global_batch)]


@dataclass(frozen=True)
class Setup:
    """What the benchmark compares."""

    shards: int = 512
    samples_per_shard: int = 4000
    positions: int = 16384
    world_sizes: tuple[int, ...] = (1, 8, 64)
    workers: tuple[int, ...] = (1, 4)
    global_batches: tuple[int, ...] = (256, 4096)
    shuffle_shards: tuple[int, ...] = (4, 16, 64)
    shuffle_buffer: int = 1000
    modes: tuple[str, ...] = MODES
    seed: int = 0
    order_streams: tuple[int, ...] = (8, 64)  # the global order with parallel streams (at shuffle_shards 4)


def check(setup: Setup) -> None:
    """Raise ``CliError`` naming the first bad setting."""
    if setup.shards < 1 or setup.samples_per_shard < 1 or setup.shuffle_buffer < 0:
        raise CliError("--shards and --samples-per-shard must be >= 1, --shuffle-buffer >= 0")
    if min(setup.world_sizes + setup.workers + setup.shuffle_shards + setup.global_batches) < 1:
        raise CliError("--world-sizes, --workers-list, --shuffle-shards-list and --global-batches take integers >= 1")
    for g in setup.global_batches:
        if g > setup.positions:
            raise CliError(f"--positions {setup.positions} is less than one global batch of {g}; raise --positions")
        for w in setup.world_sizes:
            if g % w:
                raise CliError(f"global batch {g} does not split over {w} ranks; pick --global-batches divisible "
                               "by every --world-sizes value")
    if "epoch" in setup.modes and setup.positions > setup.shards * max(1, setup.samples_per_shard * 3 // 4):
        raise CliError(f"--positions {setup.positions} may exceed one epoch of the {setup.shards} shards; lower "
                       "--positions or raise --shards / --samples-per-shard")


def run(setup: Setup, work_dir: str) -> tuple[list[Figures], int]:
    """Every configuration's figures, and the samples listed to get them (the shuffle buffers' fill, read
    but not yet handed out, comes on top)."""
    check(setup)
    data = write_key_shards(work_dir, setup.shards, setup.samples_per_shard, setup.seed)
    seed = mix_seed(setup.seed, 0)
    rows: list[Figures] = []
    listed = 0
    for mode in setup.modes:
        for width in setup.shuffle_shards:  # the global order: one listing serves every G, W and K
            ids = global_order_ids(data, mode, width, setup.shuffle_buffer, setup.positions, seed)
            listed += len(ids)
            for g in setup.global_batches:
                rows.append(figures(split(ids, g), order="global", mode=mode, world_size=None, workers=None,
                                    global_batch=g, shuffle_shards=width, open_shards_per_reader=width,
                                    buffer_samples_per_reader=setup.shuffle_buffer, readers=None))
        width = OLD_SHARDS_PER_BLOCK
        for count in setup.order_streams:  # parallel streams: a batch takes G / S positions from each
            for g in setup.global_batches:
                if g % count:
                    continue
                batches = streamed_batches(data, mode, count, width, setup.shuffle_buffer, g, setup.positions // g,
                                           seed)
                listed += sum(len(b) for b in batches)
                rows.append(figures(batches, order="global", mode=mode, world_size=None, workers=None,
                                    global_batch=g, shuffle_shards=width, open_shards_per_reader=width * count,
                                    buffer_samples_per_reader=setup.shuffle_buffer * count, readers=None,
                                    order_streams=count))
        streams = WorkerStreams(data, setup.shuffle_buffer, seed)
        for w in setup.world_sizes:
            for k in setup.workers:
                for g in sorted(setup.global_batches, reverse=True):  # the longest streams are read first
                    batches = per_worker_batches(streams, mode, w, k, g, setup.positions // g)
                    rows.append(figures(batches, order="per-worker", mode=mode, world_size=w, workers=k,
                                        global_batch=g, shuffle_shards=OLD_SHARDS_PER_BLOCK,
                                        open_shards_per_reader=OLD_SHARDS_PER_BLOCK,
                                        buffer_samples_per_reader=setup.shuffle_buffer, readers=w * k))
        listed += streams.samples_listed
    return rows, listed


def markdown(rows: Sequence[Figures]) -> str:
    """The rows as a markdown table."""
    lines = [("| order | mode | W × K | G | shards/block × streams | shards per global batch (mean, min) | top shard share "
              "(mean, max) | tar neighbours in one batch | open shards, buffer samples per reader |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = "any" if r.world_size is None else f"{r.world_size} × {r.workers}"
        width = f"{r.shuffle_shards}" if r.order_streams == 1 else f"{r.shuffle_shards} × {r.order_streams}"
        lines.append(f"| {r.order} | {r.mode} | {shape} | {r.global_batch} | {width} | "
                     f"{r.distinct_shards_mean:g}, {r.distinct_shards_min} | {r.top_shard_share_mean:.3f}, "
                     f"{r.top_shard_share_max:.3f} | {r.neighbours_together:.2f} | {r.open_shards_per_reader}, "
                     f"{r.buffer_samples_per_reader} |")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``bench.data --shuffle-quality``): a markdown table, then the JSON line; the exit status."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--shuffle-quality"]
    d = Setup()
    parser = argparse.ArgumentParser(prog="python -m clip_train.bench.data --shuffle-quality",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--shards", type=int, default=d.shards, help="tiny shards to write")
    parser.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard,
                        help="mean samples per shard (8 sizes within ±25%%)")
    parser.add_argument("--positions", type=int, default=d.positions,
                        help="training positions of epoch 0 measured (global batches = positions // G)")
    parser.add_argument("--world-sizes", type=_ints, default=d.world_sizes, help="ranks W, comma-separated")
    parser.add_argument("--workers-list", type=_ints, default=d.workers, help="DataLoader workers K per rank")
    parser.add_argument("--global-batches", type=_ints, default=d.global_batches, help="global batch sizes G")
    parser.add_argument("--shuffle-shards-list", type=_ints, default=d.shuffle_shards,
                        help="data.shuffle_shards values of the global order")
    parser.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="data.shuffle_buffer")
    parser.add_argument("--order-streams-list", type=_ints, default=d.order_streams,
                        help="data.order_streams values of the global order (at shuffle_shards 4; those that do "
                             "not divide G are left out); open shards and buffers are per reader at W = 1, "
                             "divided by W when W divides the streams")
    parser.add_argument("--modes", type=lambda t: tuple(t.split(",")), default=d.modes,
                        help="epoch and/or resampled")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of both orders")
    args = parser.parse_args(argv)
    setup = Setup(args.shards, args.samples_per_shard, args.positions, args.world_sizes, args.workers_list,
                  args.global_batches, args.shuffle_shards_list, args.shuffle_buffer, args.modes, args.seed,
                  args.order_streams_list)
    start = time.perf_counter()
    try:
        if any(m not in MODES for m in setup.modes):
            raise CliError(f"--modes takes epoch and/or resampled, got {','.join(setup.modes)}")
        with tempfile.TemporaryDirectory(prefix="clip_train_shuffle_") as work_dir:
            rows, listed = run(setup, work_dir)
    except CliError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(markdown(rows))
    result = {
        "bench": "shuffle_quality", "setup": asdict(setup), "rows": [asdict(r) for r in rows],
        "samples_listed": listed, "elapsed_s": round(time.perf_counter() - start, 2),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line("clip_train.bench.data", ["--shuffle-quality", *argv]),
    }
    print(json.dumps(result))
    return 0
