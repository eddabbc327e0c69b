"""Parallel streams of the global order (``data.order_streams``): the same global batches at every shape, more
shards mixed per batch, and each rank reading only its own streams."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import clip_train.data.stream as stream_module
from clip_train.bench import shuffle
from clip_train.config import ConfigError
from clip_train.data.decode import SkipCounter
from clip_train.data.order import BatchLayout, GlobalOrder
from clip_train.data.plan import mix_seed
from clip_train.data.stream import GlobalBatchStream
from tests.test_bench_shuffle import KeyDecoder

SEED, WIDTH, BUFFER = mix_seed(0, 0), 2, 20


def global_batches(data: shuffle.KeyShards, mode: str, streams: int, global_batch: int, batches: int,
                   world_size: int, workers: int, opened: dict[int, list] | None = None) -> list[list[str]]:
    """Every global batch as the concatenation of the ranks' slices, each rank's batches spread over workers."""
    got: list[list[str]] = [[] for _ in range(batches)]
    epoch_batches = sum(data.counts) // global_batch if mode == "epoch" else None
    for rank in range(world_size):
        order = GlobalOrder([data.source], mode, seed=SEED, shuffle_shards=WIDTH, counts=list(data.counts),
                            fallback_count=data.counts[0])
        stream = GlobalBatchStream(order, KeyDecoder(), lambda texts: texts, global_batch, rank, world_size, BUFFER,
                                   streams=streams, batches_per_epoch=epoch_batches)
        stream.end_batch = batches
        for worker in range(workers):
            for _, texts, meta in stream._batches(worker, workers, SkipCounter(0, where=f"rank {rank}")):
                got[int(meta[2])] += texts
        if opened is not None:
            opened[rank] = list(OPENED)
            OPENED.clear()
    return got


OPENED: list[tuple[str, ...]] = []


@pytest.fixture()
def record_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    real = stream_module.block_samples

    def recording(block, *args, **kwargs):
        OPENED.append(tuple(u.url for u in block.units))
        return real(block, *args, **kwargs)
    monkeypatch.setattr(stream_module, "block_samples", recording)
    OPENED.clear()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> shuffle.KeyShards:
    return shuffle.write_key_shards(str(tmp_path_factory.mktemp("keys")), shards=16, samples_per_shard=30)


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_streams_give_the_same_global_batches_at_any_ranks_and_workers(data, mode: str) -> None:
    g, streams = 24, 4
    batches = sum(data.counts) // g if mode == "epoch" else 12
    expected = global_batches(data, mode, streams, g, batches, world_size=1, workers=1)
    # 3 ranks: slices of 8 that cut streams (6 positions a batch) in two
    for world_size, workers in ((2, 1), (4, 2), (3, 2), (1, 3)):
        assert global_batches(data, mode, streams, g, batches, world_size, workers) == expected, (world_size, workers)
    if mode == "epoch":  # every sample of the epoch once (the remainder, under one batch, dropped)
        seen = Counter(key for batch in expected for key in batch)
        assert max(seen.values()) == 1 and len(seen) == batches * g >= sum(data.counts) - g
    assert expected != global_batches(data, mode, 1, g, batches, world_size=1, workers=1)  # streams are the order


def test_more_streams_mix_more_shards_into_each_global_batch(data) -> None:
    g, batches = 24, sum(data.counts) // 24

    def shards_per_batch(streams: int) -> float:
        found = global_batches(data, "epoch", streams, g, batches, world_size=1, workers=1)
        return float(np.mean([len({key.split("|")[0] for key in batch}) for batch in found]))
    one, four = shards_per_batch(1), shards_per_batch(4)
    assert one <= WIDTH + 1 and four >= 3 * WIDTH


def test_with_a_stream_per_rank_each_rank_opens_only_its_own_blocks(data, record_blocks) -> None:
    g, world_size = 24, 4
    batches = sum(data.counts) // g
    blocks = -(-len(data.counts) // WIDTH)
    for streams, most in ((1, blocks), (4, -(-blocks // 4) + 1)):
        opened: dict[int, list] = {}
        global_batches(data, "epoch", streams, g, batches, world_size, workers=1, opened=opened)
        per_rank = [len(set(o)) for o in opened.values()]
        assert max(per_rank) <= most, (streams, per_rank)
    # one stream: every rank goes through every block; a stream per rank: about a quarter each
    assert min(per_rank) < blocks / 2


def test_streams_must_divide_the_global_batch() -> None:
    from clip_train.config import TrainConfig, validate
    from clip_train.data.sources import ShardSource

    order = GlobalOrder([ShardSource("x", ("a.tar", "b.tar"))], "resampled", seed=0, shuffle_shards=1, counts=None,
                        fallback_count=4)
    with pytest.raises(ValueError, match="data.order_streams=5 must"):
        BatchLayout(order, global_batch=16, streams=5, batches_per_epoch=None)
    cfg = TrainConfig()
    cfg.data.batch_size, cfg.data.order_streams = 8, 3
    with pytest.raises(ConfigError, match="data.order_streams=3 must divide the global batch of 16"):
        validate(cfg, world_size=2, device_type="cpu")
