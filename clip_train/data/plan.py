"""Which shards a reader reads, as a pure function of (seed, epoch, reader, block).

Training uses it with one single global reader (``order.py`` turns its blocks into global positions that
any rank and worker can find); evaluation splits the shard list over every worker of every rank.
Nothing here reads data. Because the plan is deterministic, a worker can jump to any block of its stream
without replaying what came before, which is what makes exact resume cheap.

Vocabulary: a *unit* is a shard, a contiguous range of a shard's samples (epoch mode with known sample
counts), or one of ``parts`` interleaved slices of a shard (sample ``i`` belongs to slice ``i % parts``;
epoch mode without counts, when there are fewer shards than workers). A *block* is the group of units a
worker reads interleaved at one time; a worker's stream is its blocks one after another.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from clip_train.data.sources import ShardSource

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from integers (stable across processes and Python runs, unlike ``hash``)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK))
    return h


@dataclass(frozen=True)
class Unit:
    """One shard, the ``part``-th of ``parts`` interleaved slices of it, or its samples ``start:stop``."""

    url: str
    part: int = 0
    parts: int = 1
    num_samples: int | None = None
    start: int = 0
    stop: int | None = None  # None: to the end of the shard


@dataclass(frozen=True)
class Block:
    """What a worker reads at one point of its stream, and the seed for its shuffling and augmentation."""

    units: tuple[Unit, ...]
    seed: int


class StreamPlan:
    """The deterministic reading plan of one rank.

    Modes: ``resampled`` (blocks of shards drawn with replacement, weighted by source, endless), ``epoch``
    (each epoch shuffles the shard list and splits it across all ranks' workers; a worker that runs out
    before its batch quota pads from the rest of the epoch's units) and ``eval`` (no shuffling, one pass).

    """

    def __init__(self, sources: Sequence[ShardSource], mode: str, *, seed: int, rank: int, world_size: int,
                 num_workers: int, shards_per_block: int = 4, counts: Sequence[int] | None = None,
                 salt: int = 0, batch_size: int | None = None) -> None:
        if mode not in ("resampled", "epoch", "eval"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.sources = list(sources)
        self.urls = [u for s in self.sources for u in s.urls]
        self.counts = list(counts) if counts is not None else None
        if self.counts is not None and len(self.counts) != len(self.urls):
            raise ValueError("counts must give one sample count per shard")
        self.seed = seed
        self.salt = salt
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.shards_per_block = max(1, shards_per_block)
        self.batch_size = batch_size
        self.weights = [s.weight for s in self.sources]
        self._assignments: dict = {}  # epoch -> assignment; recomputed in each worker, never pickled

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_assignments"] = {}
        return state

    def set_salt(self, salt: int) -> None:
        """Change the extra seed component (used when a saved position cannot be restored exactly)."""
        self.salt = salt
        self._assignments = {}

    @property
    def num_global_workers(self) -> int:
        """Workers over all ranks: the number of parts an epoch's shard list is split into."""
        return self.world_size * self.num_workers

    def global_worker(self, logical: int) -> int:
        """Index of this rank's worker ``logical`` among all ranks' workers."""
        return self.rank * self.num_workers + logical

    # ---- epoch / eval: a split of the shard list over every worker of every rank -------------------------
    def assignment(self, epoch: int) -> tuple[tuple[Unit, ...], ...]:
        """Units of every global worker for ``epoch``: shard order shuffled per epoch (not in eval mode),
        shards sliced when there are fewer than workers, and balanced by sample count when counts are known."""
        if epoch not in self._assignments:
            self._assignments = {epoch: self._assign(epoch)}
        return self._assignments[epoch]

    def _assign(self, epoch: int) -> tuple[tuple[Unit, ...], ...]:
        order = list(range(len(self.urls)))
        if self.counts is not None:  # empty shards would give a worker nothing to read
            order = [i for i in order if self.counts[i] > 0]
        if self.mode != "eval":
            random.Random(mix_seed(self.seed, self.salt, epoch, 0xE90C)).shuffle(order)
        workers = self.num_global_workers
        parts = max(1, math.ceil(workers / max(1, len(order))))
        per_worker: list[list[Unit]] = [[] for _ in range(workers)]
        units = [Unit(self.urls[i], p, parts) for i in order for p in range(parts)]
        for j, unit in enumerate(units):
            per_worker[j % workers].append(unit)
        return tuple(tuple(u) for u in per_worker)

    def worker_units(self, epoch: int, logical: int) -> tuple[Unit, ...]:
        """The units this rank's worker ``logical`` owns in ``epoch`` (epoch and eval modes)."""
        return self.assignment(epoch)[self.global_worker(logical)]

    # ---- blocks ---------------------------------------------------------------------------------------------
    def block(self, epoch: int, logical: int, index: int) -> Block | None:
        """Block ``index`` of a worker's stream, or None when an eval stream has ended."""
        g = self.global_worker(logical)
        seed = mix_seed(self.seed, self.salt, epoch, g, index)
        if self.mode == "resampled":
            rng = random.Random(seed)
            units = []
            for _ in range(self.shards_per_block):
                source = rng.choices(self.sources, weights=self.weights)[0] if len(self.sources) > 1 \
                    else self.sources[0]
                units.append(Unit(source.urls[rng.randrange(len(source.urls))]))
            return Block(tuple(units), seed)
        mine = self.worker_units(epoch, logical)
        per_block = self._per_block(mine)
        own = math.ceil(len(mine) / per_block)
        if index < own:
            return Block(tuple(mine[index * per_block:(index + 1) * per_block]), seed)
        if self.mode == "eval" or not mine:
            return None
        # Padding: a worker that ran out before its batch quota walks the whole epoch's unit list, starting
        # with the next worker's units, so padding is spread over the dataset and a worker whose own shards
        # are all broken still fills its quota.
        flat = [u for units in self.assignment(epoch) for u in units]
        start = sum(len(units) for units in self.assignment(epoch)[:g + 1])
        first = start + (index - own) * per_block
        return Block(tuple(flat[(first + t) % len(flat)] for t in range(per_block)), seed)

    def _per_block(self, mine: Sequence[Unit]) -> int:
        return 1 if self.mode == "eval" else max(1, min(self.shards_per_block, len(mine)))

    def max_empty_blocks(self, epoch: int, logical: int) -> int | None:
        """Blocks in a row without one usable sample after which the data is deemed unusable, or None.

        Resampled: about 50 shards. Epoch: the worker's own units and then every unit of the epoch.
        """
        if self.mode == "resampled":
            return math.ceil(50 / self.shards_per_block)
        if self.mode == "eval":
            return None
        mine = self.worker_units(epoch, logical)
        per_block = self._per_block(mine)
        total = sum(len(units) for units in self.assignment(epoch))
        return math.ceil(len(mine) / per_block) + math.ceil(total / per_block)
