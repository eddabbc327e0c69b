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
from clip_train.data.plan import Block, StreamPlan, mix_seed
from clip_train.data.reader import Sample, block_samples, materialize
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


class GlobalBatchStream(IterableDataset):
    """One rank's share of the global batches, split over its DataLoader workers by batch index.

    The main process sets ``epoch``, ``first_batch`` (the next global batch the training loop needs) and
    ``end_batch`` (None: endless) before each DataLoader iterator is created. Physical worker ``j`` of
    ``K`` then yields global batches ``first_batch + j``, ``first_batch + j + K``, ... — DataLoader's round
    robin over workers (which starts at worker 0) hands them to the loop in batch order. Each batch is this
    rank's slice of the global batch: runs of the order's streams (``order.BatchLayout``), each stream read in
    order by one reader, so the bytes of samples the worker does not own are passed over, never decoded.

    Batches keep their size: a bad position ``p`` (a sample that does not decode, or one its shard did not
    deliver) holds a copy of the sample at the first good position ``q > p`` of the epoch's order, whoever
    owns ``q``, decoded with ``q``'s own augmentation seed, so the fill is the same at every world size and
    worker count. The worker finds ``q`` by decoding the positions after ``p`` as its stream passes them (it
    reads ahead; its own positions met on the way wait in a small buffer). Only the owner of a position
    counts it as skipped, and a tar error or lost shard counts for the position whose read raised it, so
    ``skipped_samples`` summed over ranks is the same at every shape. The one fill that depends on the shape:
    no good position after ``p`` before the end of the epoch (epoch mode) or within
    ``order.max_empty_blocks()`` blocks (resampled), where ``p`` takes the last good sample this worker had;
    a worker with none looks on until a sample decodes or the stop rules end the run.
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

    def owns(self, stream: int, position: int, physical: int, workers: int) -> bool:
        """Whether physical worker ``physical`` of ``workers`` yields ``position`` of ``stream``'s order in this
        iteration."""
        found = self.layout.place(stream, position)
        if found is None:
            return False
        batch, offset = found
        first = self.first_batch + physical
        return (offset // self.batch_size == self.rank and batch >= first and (batch - first) % workers == 0
                and (self.end_batch is None or batch < self.end_batch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        Image.MAX_IMAGE_PIXELS = self.max_pixels  # PIL's own bomb check, at our limit
        counter = SkipCounter(0, where=f"data (rank {self.rank}, worker {physical})")
        return self._batches(physical, count, counter)

    def _batches(self, physical: int, workers: int, counter: SkipCounter) -> Iterator[tuple[torch.Tensor, ...]]:
        batch = self.first_batch + physical
        # One reader per stream of the order (epoch mode: the streams are segments of one order, so a search
        # for a replacement may run on into the next segment).
        fills = [_Fill(self, order, self.epoch,
                       lambda position, s=s: self.owns(s, position, physical, workers), counter)
                 for s, order in enumerate(self.layout.orders)]
        while self.end_batch is None or batch < self.end_batch:
            slots = [fills[s].sample(position) for s, start, length in self.slice_runs(batch)
                     for position in range(start, start + length)]
            yield self._collate(slots, (physical, self.epoch, batch, counter.count, counter.shards))
            batch += workers

    def _collate(self, slots: list[tuple[np.ndarray, str]], meta: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        size = self.decoder.image_size
        batch = np.empty((len(slots), 3, size, size), dtype=np.uint8)
        for i, (image, _) in enumerate(slots):
            batch[i] = image.transpose(2, 0, 1)  # HWC -> CHW, one copy into the batch
        return torch.from_numpy(batch), self.tokenizer([text for _, text in slots]), torch.tensor(meta)


class _Positions:
    """A worker's forward-only pass over the global positions of an epoch, block after block.

    ``read(n)`` gives the raw sample at position ``n`` (None when its block's stream ended before it).
    Positions between two reads are passed over as bytes, and a block holding no position asked for is not
    opened. A tar error or lost shard is attributed to the position whose read raised it and kept until that
    position's owner counts it (``count_errors``): the same position at every topology, however far ahead a
    worker reads. The stop rules (blocks in a row without a usable sample, shards in a row that could not be
    read) are checked as each opened block is left.
    """

    def __init__(self, stream: GlobalBatchStream, order: GlobalOrder, epoch: int, owns: Callable[[int], bool],
                 counter: SkipCounter) -> None:
        self.order, self.epoch, self.owns, self.counter = order, epoch, owns, counter
        self.shuffle_buffer, self.remote = stream.shuffle_buffer, stream.remote
        self.max_failed_shards_in_row = stream.max_failed_shards_in_row
        self.block: Block | None = None  # the open block
        self.end = 0  # end of the open block's positions
        self.next = 0  # the position the open block's stream delivers next
        self.samples: Iterator[Sample] | None = None  # None once the open block's stream has ended
        self.reading = -1  # the position being read: errors raised meanwhile belong to it
        self.errors: dict[int, list[tuple[str, Exception]]] = {}  # own positions -> errors not counted yet
        self.usable = False  # a sample of the open block decoded (set by the caller)
        self.lost = 0  # shards of the open block abandoned as unavailable
        self.last_lost = ""
        self.empty_run = self.failed_run = 0

    def read(self, position: int) -> Sample | None:
        if position < self.next:
            raise RuntimeError(f"data: position {position} asked for after {self.next - 1} (the stream only goes on)")
        if self.block is None or position >= self.end:
            self._enter(self.order.locate(self.epoch, position))
        while self.next < position:  # someone else's: pass over its bytes
            self._fetch()
        return self._fetch()

    def count_errors(self, position: int) -> None:
        """Count the tar errors and lost shards raised while ``position`` (one of this worker's) was read."""
        for url, exn in self.errors.pop(position, ()):
            self.counter.tar_error_handler(url)(exn)

    def _fetch(self) -> Sample | None:
        self.reading = self.next
        self.next += 1
        sample = next(self.samples, None) if self.samples is not None else None
        if sample is None:  # the block ended early: its remaining positions are bad
            self.samples = None
        return sample

    def _enter(self, index: int) -> None:
        if self.block is not None:
            self._leave()
        self.block = self.order.block(self.epoch, index)
        self.next = self.order.block_start(self.epoch, index)
        self.end = self.next + self.order.block_size(self.epoch, index)
        self.usable, self.lost = False, 0
        self.samples = iter(block_samples(self.block, self._handler_for, self.shuffle_buffer, self.remote,
                                          lazy=True))

    def _handler_for(self, url: str) -> Callable[[Exception], bool]:
        first = [True]  # a broken tar usually raises twice (the member, the next header): one count

        def handler(exn: Exception) -> bool:
            if isinstance(exn, ShardUnavailable):
                self.lost += 1
                self.last_lost = str(exn.args[0]).split(" @ ")[0] if exn.args else str(exn)
            if first[0]:
                first[0] = False
                if self.owns(self.reading):
                    self.errors.setdefault(self.reading, []).append((url, exn))
            return True
        return handler

    def _leave(self) -> None:
        assert self.block is not None
        self.empty_run = 0 if self.usable else self.empty_run + 1
        self.failed_run = 0 if self.usable else self.failed_run + self.lost
        if self.failed_run >= self.max_failed_shards_in_row:
            raise DataUnavailable(f"data: {self.failed_run} shards in a row could not be read (last: "
                                  f"{self.last_lost or self.counter.last_shard_error}); check that the store is "
                                  "reachable, or raise data.read_timeout_s / data.read_retries / "
                                  "data.max_failed_shards_in_row")
        if self.empty_run >= self.order.max_empty_blocks():
            last_url = self.block.units[-1].url if self.block.units else ""
            raise DataUnavailable(f"data: {self.empty_run} blocks of shards in a row gave no usable sample "
                                  f"(last shard read: {last_url}); {self.counter.count} samples were skipped as "
                                  "bad. Check data.train_shards, data.image_key and data.text_key.")


_Decoded = tuple[np.ndarray, str] | str | None  # a sample, why it is bad, or None: not delivered


class _Fill:
    """The sample in each of a worker's slots: its own position's, or for a bad position ``p`` the sample at
    the first good position after ``p`` (see ``GlobalBatchStream``)."""

    def __init__(self, stream: GlobalBatchStream, order: GlobalOrder, epoch: int, owns: Callable[[int], bool],
                 counter: SkipCounter) -> None:
        self.order, self.epoch, self.owns, self.counter = order, epoch, owns, counter
        self.decoder = stream.decoder
        self.positions = _Positions(stream, order, epoch, owns, counter)
        epoch_end = self.order.epoch_end(epoch)
        if epoch_end is not None and stream.end_batch is not None:  # (an epoch_samples estimate may pass it)
            epoch_end = max(epoch_end, stream.end_batch * stream.global_batch)
        self.epoch_end = epoch_end
        self.ahead: dict[int, _Decoded] = {}  # own positions decoded while looking for a replacement
        self.found: tuple[int, tuple[np.ndarray, str]] | None = None  # the last replacement found, and where
        self.last_good: tuple[np.ndarray, str] | None = None
        self.files: dict[str, object] = {}  # the local shard being materialized from

    def sample(self, position: int) -> tuple[np.ndarray, str]:
        """The sample in the slot of ``position`` (one of this worker's, asked for in increasing order); its
        failure, if any, is counted here."""
        decoded = self.ahead.pop(position) if position in self.ahead else self._decode(position)
        self.positions.count_errors(position)
        if isinstance(decoded, tuple):
            self.last_good = decoded
            return decoded
        if decoded is not None:  # (not delivered: the tar error or lost shard that cut it short counts)
            self.counter.skip(decoded)
        return self._replacement(position)

    def _replacement(self, bad: int) -> tuple[np.ndarray, str]:
        if self.found is not None and self.found[0] > bad:  # every position between was bad too
            return self.found[1]
        # The positions from bad + 1 up to where the stream stands were decoded looking for the last
        # replacement, and were all bad: look on from there.
        position = max(bad + 1, self.positions.next)
        end = self._search_end(bad)
        while end is None or position < end:
            decoded = self._decode(position)
            if self.owns(position):
                self.ahead[position] = decoded
            if isinstance(decoded, tuple):
                self.found = (position, decoded)
                self.last_good = decoded
                return decoded
            position += 1
        assert self.last_good is not None
        return self.last_good

    def _search_end(self, bad: int) -> int | None:
        """Where the search for ``bad``'s replacement gives up for the last good sample, or None: never (this
        worker has no good sample yet; the stop rules end a hopeless search)."""
        if self.last_good is None:
            return None
        if self.epoch_end is not None:
            return self.epoch_end
        return self.order.block_start(self.epoch, self.order.locate(self.epoch, bad) + self.order.max_empty_blocks())

    def _decode(self, position: int) -> _Decoded:
        raw = self.positions.read(position)
        if raw is None:
            return None
        try:
            try:
                sample = materialize(raw, self.files)
            except OSError as exn:
                raise BadSample(f"unreadable: {exn}") from None
            image, text, _ = self.decoder(sample, sample_rng(self.order.seed, self.epoch, position))
        except BadSample as exn:
            return f"{raw.get('__url__')} key {raw.get('__key__')}: {exn}"
        self.positions.usable = True
        return image, text
