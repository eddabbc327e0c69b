"""The IterableDataset each DataLoader worker runs: blocks of raw samples -> decoded, tokenised batches.

Every batch carries a small ``meta`` tensor (which worker made it, and that worker's position and skip
count right after it) that the loader in the main process strips off and keeps as its resumable state.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from clip_train.data.config import DEFAULT_MAX_IMAGE_PIXELS
from clip_train.data.decode import BadSample, SampleDecoder, SkipCounter
from clip_train.data.order import BatchLayout, GlobalOrder
from clip_train.data.plan import StreamPlan, mix_seed
from clip_train.data.reader import block_samples, materialize
from clip_train.data.remote import RemoteOptions, ShardUnavailable

# Order of the fields in each batch's meta tensor.
META_FIELDS = ("worker", "epoch", "block", "within", "batches", "skipped", "skipped_shards")


class DataUnavailable(RuntimeError, ValueError):
    """The data cannot be read at all (every shard broken, or the store unreachable): stops the run in one line.

    Also a ``ValueError``, like the other bad-input errors, so the CLI reports it in one line and exits 2.
    """


@dataclass
class WorkerPosition:
    """Where a worker's stream stands after the last batch the training loop received from it."""

    block: int = 0  # index of the block being read
    within: int = 0  # raw samples (good or bad) already taken from that block's shuffled order
    batches: int = 0  # batches yielded in the current epoch
    skipped: int = 0  # bad samples skipped so far, all epochs
    skipped_shards: int = 0  # shards abandoned as unavailable so far, all epochs

    def as_list(self) -> list[int]:
        """``[block, within, batches, skipped, skipped_shards]``: the form kept in ``state_dict()``."""
        return [self.block, self.within, self.batches, self.skipped, self.skipped_shards]


class ShardStream(IterableDataset):
    """One rank's stream, split over its DataLoader workers by the plan.

    The main process sets ``epoch``, ``rotation``, ``positions`` and ``quotas`` before each DataLoader
    iterator is created; workers receive a copy. Physical worker ``p`` plays logical worker
    ``(p + rotation) % num_workers``, so after a resume DataLoader's round robin (which always starts at
    worker 0) continues with the worker that was due next.
    """

    def __init__(self, plan: StreamPlan, decoder: SampleDecoder, tokenizer: Callable, batch_size: int,
                 shuffle_buffer: int, *, with_labels: bool = False, partial_last: bool = False,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, remote: RemoteOptions | None = None,
                 max_failed_shards_in_row: int = 16) -> None:
        super().__init__()
        self.plan = plan
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.with_labels = with_labels
        self.partial_last = partial_last
        self.max_pixels = max_pixels
        self.remote = remote or RemoteOptions()
        self.max_failed_shards_in_row = max(1, max_failed_shards_in_row)
        self.epoch = 0
        self.rotation = 0
        self.positions = [WorkerPosition() for _ in range(plan.num_workers)]
        self.quotas: list[int] | None = None  # batches per logical worker this epoch; None = until data ends

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if count != self.plan.num_workers:
            raise RuntimeError(f"stream planned for {self.plan.num_workers} workers runs in {count}")
        logical = (physical + self.rotation) % count
        Image.MAX_IMAGE_PIXELS = self.max_pixels  # PIL's own bomb check, at our limit
        position = self.positions[logical]
        quota = self.quotas[logical] if self.quotas is not None else None
        counter = SkipCounter(position.skipped, where=f"data (rank {self.plan.rank}, worker {logical})",
                              shards=position.skipped_shards)
        return self._batches(logical, position, quota, counter)

    def _batches(self, logical: int, start: WorkerPosition, quota: int | None, counter: SkipCounter
                 ) -> Iterator[tuple[torch.Tensor, ...]]:
        plan, epoch = self.plan, self.epoch
        batches = start.batches
        if quota is not None and batches >= quota:
            return
        images: list[np.ndarray] = []
        texts: list[str] = []
        labels: list[int] = []
        index, resume_within = start.block, start.within
        empty_run, last_url, failed_run = 0, "", 0
        while True:
            block = plan.block(epoch, logical, index)
            if block is None:
                break
            shards_before = counter.shards
            samples = iter(block_samples(block, counter.tar_error_handler, self.shuffle_buffer, self.remote))
            within = 0
            if resume_within:
                # Re-read (not decode) what this worker had already passed; its errors were counted then.
                counter.muted = True
                within = sum(1 for _ in islice(samples, resume_within))
                counter.muted = False
                resume_within = 0
            good = 0
            for sample in samples:
                within += 1
                try:
                    image, text, label = self.decoder(sample, random.Random(mix_seed(block.seed, within)))
                except BadSample as exn:
                    counter.skip(f"{sample.get('__url__')} key {sample.get('__key__')}: {exn}")
                    continue
                good += 1
                images.append(image)
                texts.append(text)
                labels.append(label)
                if len(images) == self.batch_size:
                    batches += 1
                    meta = (logical, epoch, index, within, batches, counter.count, counter.shards)
                    yield self._collate(images, texts, labels, meta)
                    images, texts, labels = [], [], []
                    if quota is not None and batches >= quota:
                        return
            last_url = block.units[-1].url if block.units else last_url
            empty_run = 0 if good else empty_run + 1
            failed_run = 0 if good else failed_run + counter.shards - shards_before
            if failed_run >= self.max_failed_shards_in_row:
                raise DataUnavailable(f"data: {failed_run} shards in a row could not be read (last: "
                                   f"{counter.last_shard_error}); check that the store is reachable, or raise "
                                   "data.read_timeout_s / data.read_retries / data.max_failed_shards_in_row")
            limit = plan.max_empty_blocks(epoch, logical)
            if limit is not None and empty_run >= limit:
                raise DataUnavailable(f"data: {empty_run} blocks of shards in a row gave no usable sample "
                                   f"(last shard read: {last_url}); {counter.count} samples were skipped as bad. "
                                   "Check data.train_shards, data.image_key and data.text_key.")
            index += 1
        if images and self.partial_last:
            yield self._collate(images, texts, labels,
                                (logical, epoch, index, 0, batches + 1, counter.count, counter.shards))

    def _collate(self, images: list[np.ndarray], texts: list[str], labels: list[int],
                 meta: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        size = self.decoder.image_size
        batch = np.empty((len(images), 3, size, size), dtype=np.uint8)
        for i, image in enumerate(images):
            batch[i] = image.transpose(2, 0, 1)  # HWC -> CHW, one copy into the batch
        out = [torch.from_numpy(batch), self.tokenizer(texts)]
        if self.with_labels:
            out.append(torch.tensor(labels, dtype=torch.long))
        out.append(torch.tensor(meta, dtype=torch.long))
        return tuple(out)


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The augmentation randomness of the sample at global ``position`` of ``epoch``: the same whoever reads it."""
    return random.Random(mix_seed(seed, epoch, position, 0xA06))


class _StreamReader:
    """One worker's forward-only reader of one stream of the global order.

    ``take(position, count)`` decodes those positions and passes over the ones before them (the bytes of other
    ranks' and workers' samples are read, never decoded). A block is opened only when it holds a position
    asked for; a block that ends early (a cut tar, a lost shard) leaves its remaining positions bad.
    """

    def __init__(self, stream: GlobalBatchStream, order: GlobalOrder, epoch: int, counter: SkipCounter) -> None:
        self.stream = stream
        self.order = order
        self.epoch = epoch
        self.counter = counter
        self.index = -1  # the open block (-1: none yet)
        self.start = self.end = 0  # its positions
        self.samples: Iterator | None = None
        self.position = 0  # the position the next sample of ``samples`` sits at
        self.exhausted = False  # the open block ended before its last position
        self.good = 0  # good samples decoded from the open block
        self.lost = [0]  # its shards abandoned as unavailable
        self.empty_run = 0  # opened blocks in a row without one good sample of ours
        self.failed_run = 0
        self.open_files: dict[str, object] = {}  # the local shard being materialized from

    def take(self, position: int, count: int) -> list[tuple[np.ndarray, str] | None]:
        """Positions ``[position, position + count)``, decoded (None: a bad sample)."""
        out: list[tuple[np.ndarray, str] | None] = []
        for need in range(position, position + count):
            if self.samples is None or need >= self.end:
                self._open(need)
            sample = None
            while not self.exhausted and self.position <= need:
                sample = next(self.samples, None)  # type: ignore[arg-type]
                if sample is None:
                    self.exhausted = True  # not counted: the tar error or lost shard that cut it short was
                elif self.position < need:
                    sample = None  # someone else's: passed over
                self.position += 1
            out.append(None if sample is None else self._decode(sample, need))
        return out

    def _decode(self, sample: dict, position: int) -> tuple[np.ndarray, str] | None:
        try:
            try:
                sample = materialize(sample, self.open_files)
            except OSError as exn:
                raise BadSample(f"unreadable: {exn}") from None
            image, text, _ = self.stream.decoder(sample, sample_rng(self.order.seed, self.epoch, position))
        except BadSample as exn:
            self.counter.skip(f"{sample.get('__url__')} key {sample.get('__key__')}: {exn}")
            return None
        self.good += 1
        return image, text

    def _open(self, need: int) -> None:
        self._close_block()
        index = self.order.locate(self.epoch, need)
        block = self.order.block(self.epoch, index)
        self.index, self.start = index, self.order.block_start(self.epoch, index)
        self.end = self.start + self.order.block_size(self.epoch, index)
        # Only the reader of the block's first position counts its tar errors and lost shards, so each is
        # counted once whatever the topology; every reader sees its own failures for the stop rule.
        owner = self.start == need
        counter, lost = self.counter, [0]
        self.lost = lost

        def handler_for(url: str) -> Callable[[Exception], bool]:
            counted = counter.tar_error_handler(url) if owner else None

            def handler(exn: Exception) -> bool:
                if isinstance(exn, ShardUnavailable):
                    lost[0] += 1
                return counted(exn) if counted is not None else True
            return handler

        self.block = block
        self.samples = iter(block_samples(block, handler_for, self.stream.shuffle_buffer, self.stream.remote,
                                          lazy=True))
        self.position, self.exhausted, self.good = self.start, False, 0

    def _close_block(self) -> None:
        """Apply the stop rules to the block just read: a long run of blocks without a usable sample, or of
        shards that could not be read, means the data is unusable."""
        if self.samples is None:
            return
        self.empty_run = 0 if self.good else self.empty_run + 1
        self.failed_run = 0 if self.good else self.failed_run + self.lost[0]
        self.samples = None
        if self.failed_run >= self.stream.max_failed_shards_in_row:
            raise DataUnavailable(f"data: {self.failed_run} shards in a row could not be read (last: "
                                  f"{self.counter.last_shard_error}); check that the store is reachable, or raise "
                                  "data.read_timeout_s / data.read_retries / data.max_failed_shards_in_row")
        if self.empty_run >= self.order.max_empty_blocks():
            raise DataUnavailable(f"data: {self.empty_run} blocks of shards in a row gave no usable sample "
                                  f"(last shard read: {self.block.units[-1].url}); {self.counter.count} samples "
                                  "were skipped as bad. Check data.train_shards, data.image_key and data.text_key.")


class GlobalBatchStream(IterableDataset):
    """One rank's share of the global batches, split over its DataLoader workers by batch index.

    The main process sets ``epoch``, ``first_batch`` (the next global batch the training loop needs) and
    ``end_batch`` (None: endless) before each DataLoader iterator is created. Physical worker ``j`` of
    ``K`` then yields global batches ``first_batch + j``, ``first_batch + j + K``, ... — DataLoader's round
    robin over workers (which starts at worker 0) hands them to the loop in batch order. Each batch is this
    rank's slice of the global batch: runs of the order's streams (``order.BatchLayout``), each read in order
    by one ``_StreamReader``, so the bytes of samples the worker does not own are passed over, never decoded.

    A bad sample is replaced by a copy of a good one of the same slice (or, if the whole slice is bad, the
    last good sample this worker produced, or the next one it finds), so batches keep their size.
    """

    def __init__(self, order: GlobalOrder, decoder: SampleDecoder, tokenizer: Callable, global_batch: int,
                 rank: int, world_size: int, shuffle_buffer: int, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 remote: RemoteOptions | None = None, max_failed_shards_in_row: int = 16, streams: int = 1,
                 batches_per_epoch: int | None = None) -> None:
        super().__init__()
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not split over {world_size} ranks")
        self.order = order
        self.layout = BatchLayout(order, global_batch, streams, batches_per_epoch)
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.batch_size = global_batch // world_size
        self.shuffle_buffer = shuffle_buffer
        self.max_pixels = max_pixels
        self.remote = remote or RemoteOptions()
        self.max_failed_shards_in_row = max(1, max_failed_shards_in_row)
        self.epoch = 0
        self.first_batch = 0
        self.end_batch: int | None = None

    @property
    def streams(self) -> int:
        """Parallel streams of the order (``data.order_streams``)."""
        return self.layout.streams

    def slice_runs(self, batch: int) -> list[tuple[int, int, int]]:
        """``(stream, position, length)`` runs of this rank's slice of global batch ``batch``."""
        return self.layout.runs(batch, self.rank * self.batch_size, self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        Image.MAX_IMAGE_PIXELS = self.max_pixels  # PIL's own bomb check, at our limit
        counter = SkipCounter(0, where=f"data (rank {self.rank}, worker {physical})")
        return self._batches(physical, count, counter)

    def _batches(self, physical: int, workers: int, counter: SkipCounter) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, end = self.epoch, self.end_batch
        readers = [_StreamReader(self, order, epoch, counter) for order in self.layout.orders]
        pending: list[tuple[int, list]] = []  # whole-bad slices waiting for a first good sample
        last_good: tuple[np.ndarray, str] | None = None
        batch = self.first_batch + physical
        while end is None or batch < end or pending:
            slots: list[tuple[np.ndarray, str] | None] = []
            for stream, position, length in self.slice_runs(batch):
                slots += readers[stream].take(position, length)
            good = [s for s in slots if s is not None]
            if good:
                last_good = good[-1]
            if pending and last_good is not None:
                for waiting_batch, waiting in pending:
                    yield self._collate(waiting, last_good, (physical, epoch, waiting_batch, counter.count,
                                                             counter.shards))
                pending = []
            if end is None or batch < end:  # (past the end a slice is read only to find a good sample)
                if last_good is not None:
                    yield self._collate(slots, last_good, (physical, epoch, batch, counter.count, counter.shards))
                else:
                    pending.append((batch, slots))
            batch += workers

    def _collate(self, slots: list, fallback: tuple[np.ndarray, str] | None, meta: tuple[int, ...]
                 ) -> tuple[torch.Tensor, ...]:
        good = [s for s in slots if s is not None]
        filled = [s if s is not None else (good[i % len(good)] if good else fallback)
                  for i, s in enumerate(slots)]
        size = self.decoder.image_size
        batch = np.empty((len(filled), 3, size, size), dtype=np.uint8)
        for i, (image, _) in enumerate(filled):
            batch[i] = image.transpose(2, 0, 1)  # HWC -> CHW, one copy into the batch
        return torch.from_numpy(batch), self.tokenizer([text for _, text in filled]), torch.tensor(meta)
