"""The global sample order of training: which raw sample sits at each global position, for any topology.

The order is a pure function of the shard list (and their sample counts), the seed, the epoch, the mode,
``data.shuffle_shards``, ``data.shuffle_buffer`` and ``data.order_streams``; ranks and DataLoader workers only decide who reads what:

- The epoch's shard list is shuffled (epoch mode) or shards are drawn with replacement (resampled mode),
  in *blocks* of ``shuffle_shards`` shards (the plan of one single global worker, see ``plan.py``, where
  the block width is ``StreamPlan.shards_per_block``). There is no per-worker block: the width is a property
  of the order, the same at every world size and worker count.
- A block's samples are its shards read interleaved and passed through a seeded shuffle buffer
  (``reader.block_samples``), so a block's order depends on the block's seed only.
- Block ``i`` occupies the global positions ``[start_i, start_i + size_i)``, where ``size_i`` is the sum of
  its shards' sample counts from the manifest (or, without counts, an estimate per shard). A shard that
  yields fewer samples than its count leaves those positions bad; extra samples are ignored. So positions
  never shift, whoever reads them.
- Global batch ``b`` takes ``G / S`` consecutive positions from each of ``S = data.order_streams`` parallel
  streams of the order (``BatchLayout``; one stream: positions ``[b * G, (b + 1) * G)``). Rank ``r`` of ``W``
  takes the slice ``[r * G / W, (r + 1) * G / W)`` of the batch, so with ``S`` a multiple of ``W`` a rank
  reads only its own streams.
"""

from __future__ import annotations

from collections.abc import Sequence

from clip_train.data.plan import Block, StreamPlan, Unit, mix_seed
from clip_train.data.sources import ShardSource


class GlobalOrder:
    """Blocks of the global order and the global positions each one covers."""

    def __init__(self, sources: Sequence[ShardSource], mode: str, *, seed: int, shuffle_shards: int,
                 counts: Sequence[int] | None, fallback_count: int) -> None:
        if mode not in ("resampled", "epoch"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.seed = seed
        self._plan = StreamPlan(sources, mode, seed=seed, rank=0, world_size=1, num_workers=1,
                                shards_per_block=shuffle_shards, counts=counts)
        self.urls = self._plan.urls
        self._counts = {url: int(c) for url, c in zip(self.urls, counts)} if counts is not None else {}
        self._fallback = max(1, int(fallback_count))
        self._starts: dict[int, list[int]] = {}  # epoch -> start position of blocks 0..n (grown on demand)

    def stream(self, index: int) -> GlobalOrder:
        """The order of parallel stream ``index`` in resampled mode: the same shards, its own seed (stream 0 is
        this order, so one stream is the plain order)."""
        if index == 0:
            return self
        return GlobalOrder(self._plan.sources, self.mode, seed=mix_seed(self.seed, 0x57E, index),
                           shuffle_shards=self.shuffle_shards, counts=self._plan.counts, fallback_count=self._fallback)

    @property
    def shuffle_shards(self) -> int:
        """Shards interleaved into one block (``data.shuffle_shards``, at least 1)."""
        return self._plan.shards_per_block

    def block(self, epoch: int, index: int) -> Block:
        """Block ``index`` of ``epoch`` (epoch mode wraps around the shard list past its end)."""
        block = self._plan.block(epoch if self.mode == "epoch" else 0, 0, index)
        if block is None:  # pragma: no cover - train modes never end
            raise RuntimeError("the global order ended")
        return block

    def unit_size(self, unit: Unit) -> int:
        """Global positions a unit occupies: its sample count, or the estimate when counts are unknown."""
        if unit.num_samples is not None:
            return unit.num_samples
        return self._counts.get(unit.url, self._fallback)

    def block_size(self, epoch: int, index: int) -> int:
        return sum(self.unit_size(u) for u in self.block(epoch, index).units)

    def _grow(self, epoch: int, until_position: int | None = None, until_index: int | None = None) -> list[int]:
        if len(self._starts) > 4 and epoch not in self._starts:
            self._starts = {}
        starts = self._starts.setdefault(epoch, [0])
        while ((until_position is not None and starts[-1] <= until_position)
               or (until_index is not None and len(starts) <= until_index + 1)):
            starts.append(starts[-1] + self.block_size(epoch, len(starts) - 1))
        return starts

    def block_start(self, epoch: int, index: int) -> int:
        """First global position of block ``index``."""
        return self._grow(epoch, until_index=index)[index]

    def locate(self, epoch: int, position: int) -> int:
        """Index of the block holding global ``position``."""
        starts = self._grow(epoch, until_position=position)
        lo, hi = 0, len(starts) - 1  # starts[hi] > position
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if starts[mid] <= position:
                lo = mid
            else:
                hi = mid
        return lo

    def epoch_end(self, epoch: int) -> int | None:
        """End of ``epoch``'s own positions in epoch mode (every shard once; past it the order pads with the
        epoch's shards again), or None in resampled mode, whose order has no end."""
        if self.mode != "epoch":
            return None
        return sum(self.unit_size(u) for u in self._plan.worker_units(epoch, 0))

    def max_empty_blocks(self) -> int:
        """Blocks in a row without one usable sample after which the data is deemed unusable."""
        if self.mode == "resampled":
            return max(2, -(-50 // self.shuffle_shards))
        blocks = -(-max(1, len(self.urls)) // self.shuffle_shards)
        return 2 * blocks + 1


class BatchLayout:
    """Where each sample of a global batch sits in the global order, when the order has parallel streams.

    Global batch ``b`` of ``G`` samples is ``streams`` runs of ``share = G / streams`` positions, one from each
    stream, in stream order; batch-space index ``j`` is position ``b * share + j % share`` of stream
    ``j // share``. Epoch mode: stream ``s`` is the ``s``-th of ``streams`` contiguous segments of the epoch's
    order, each ``batches_per_epoch * share`` positions long, so an epoch still uses positions
    ``[0, batches_per_epoch * G)`` once each. Resampled mode: stream ``s`` is its own endless order
    (``GlobalOrder.stream``). With one stream, batch ``b`` is positions ``[b * G, (b + 1) * G)``.

    A rank's slice of a batch then covers ``streams / world_size`` whole streams (when it divides), so each rank
    reads only its own streams' shards, while a global batch mixes ``streams * shuffle_shards`` shards.
    """

    def __init__(self, order: GlobalOrder, global_batch: int, streams: int, batches_per_epoch: int | None) -> None:
        if streams < 1 or global_batch % streams:
            raise ValueError(f"data.order_streams={streams} must be at least 1 and divide the global batch of "
                             f"{global_batch} samples (world size x data.batch_size); pick a divisor, e.g. the "
                             "number of GPUs of the largest job that will train on this data")
        if order.mode == "epoch" and streams > 1 and batches_per_epoch is None:
            raise ValueError("epoch mode with several streams needs the number of batches per epoch")
        self.streams = streams
        self.share = global_batch // streams
        # Epoch mode with several streams: the streams are consecutive segments of one order, this long.
        self.segment = batches_per_epoch * self.share if order.mode == "epoch" and streams > 1 else None
        self.orders = [order] * streams if order.mode == "epoch" else [order.stream(s) for s in range(streams)]

    def base(self, stream: int) -> int:
        """First position of ``stream`` in its order."""
        return stream * self.segment if self.segment is not None else 0

    def place(self, stream: int, position: int) -> tuple[int, int] | None:
        """``(batch, batch-space index)`` of ``position`` of ``stream``'s order, or None when no batch of the
        epoch holds it (epoch mode: the remainder past the last segment)."""
        if self.segment is not None:  # segments of one order: the position alone says which stream
            stream, position = divmod(position, self.segment)
            if stream >= self.streams:
                return None
        batch, offset = divmod(position, self.share)
        return batch, stream * self.share + offset

    def runs(self, batch: int, start: int, count: int) -> list[tuple[int, int, int]]:
        """``(stream, position, length)`` runs holding batch-space ``[start, start + count)`` of batch ``batch``."""
        out = []
        j, end = start, start + count
        while j < end:
            stream, offset = divmod(j, self.share)
            length = min(end - j, self.share - offset)
            out.append((stream, self.base(stream) + batch * self.share + offset, length))
            j += length
        return out
