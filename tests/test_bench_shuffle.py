"""The shuffle-quality benchmark: its batches are the real loaders' batches, and its figures move the right way."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_train.bench import data as bench_data
from clip_train.bench import shuffle
from clip_train.data.decode import SkipCounter
from clip_train.data.order import GlobalOrder
from clip_train.data.plan import mix_seed
from clip_train.data.stream import GlobalBatchStream

TINY = shuffle.Setup(shards=24, samples_per_shard=60, positions=768, world_sizes=(1, 4), workers=(1, 2),
                     global_batches=(64,), shuffle_shards=(2, 4, 8), shuffle_buffer=100,
                     order_streams=(4,))


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[shuffle.Figures]:
    rows, _ = shuffle.run(TINY, str(tmp_path_factory.mktemp("shuffle")))
    return rows


def pick(rows: list[shuffle.Figures], **match: object) -> shuffle.Figures:
    found = [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]
    assert len(found) == 1, match
    return found[0]


@pytest.mark.parametrize("mode", shuffle.MODES)
def test_one_rank_one_worker_mixes_like_the_global_order_of_four_shards(rows, mode: str) -> None:
    before = pick(rows, order="per-worker", mode=mode, world_size=1, workers=1)
    after = pick(rows, order="global", mode=mode, shuffle_shards=4, order_streams=1)
    assert after.distinct_shards_mean == pytest.approx(before.distinct_shards_mean, rel=0.15)
    assert after.top_shard_share_mean == pytest.approx(before.top_shard_share_mean, rel=0.25)


@pytest.mark.parametrize("mode", shuffle.MODES)
def test_more_shuffle_shards_mix_more_shards_per_batch(rows, mode: str) -> None:
    means = [pick(rows, order="global", mode=mode, shuffle_shards=s, order_streams=1).distinct_shards_mean for s in (2, 4, 8)]
    assert means[0] < means[1] < means[2]
    shares = [pick(rows, order="global", mode=mode, shuffle_shards=s, order_streams=1).top_shard_share_mean for s in (2, 4, 8)]
    assert shares[0] > shares[2]


def test_per_worker_streams_mixed_more_shards_at_more_ranks(rows) -> None:
    # The effect the global order gives up: one global batch took a block from every rank's worker.
    one = pick(rows, order="per-worker", mode="epoch", world_size=1, workers=1)
    four = pick(rows, order="per-worker", mode="epoch", world_size=4, workers=1)
    assert four.distinct_shards_mean > 2 * one.distinct_shards_mean


class KeyDecoder:
    """Stands in for the image decoder: the sample's shard and key as its text, a 1-pixel image."""

    image_size = 1

    def __call__(self, sample: dict, rng: object) -> tuple[np.ndarray, str, int]:
        return np.zeros((1, 1, 3), np.uint8), f"{sample['__url__']}|{sample['__key__']}", 0


@pytest.mark.parametrize("mode", shuffle.MODES)
def test_the_global_order_figures_hold_at_any_ranks_and_workers(tmp_path, mode: str) -> None:
    """The benchmark cuts the global order's positions into batches; the real training stream, split over
    ranks and workers, gives exactly those batches, so the figures do not depend on W or K."""
    data = shuffle.write_key_shards(str(tmp_path), shards=12, samples_per_shard=40)
    seed, width, buffer, g = mix_seed(0, 0), 3, 50, 24
    ids = shuffle.global_order_ids(data, mode, width, buffer, positions=8 * g, seed=seed)
    expected = shuffle.split(ids, g)
    to_id = shuffle.SampleIds(data)
    for world_size, workers in ((1, 1), (2, 1), (2, 3), (4, 2)):
        got: list[list[shuffle.SampleId]] = [[] for _ in expected]
        for rank in range(world_size):
            order = GlobalOrder([data.source], mode, seed=seed, shuffle_shards=width, counts=list(data.counts),
                                fallback_count=data.counts[0])
            stream = GlobalBatchStream(order, KeyDecoder(), lambda texts: texts, g, rank, world_size, buffer)
            stream.end_batch = len(expected)
            for worker in range(workers):
                for _, texts, meta in stream._batches(worker, workers, SkipCounter(0, where=f"rank {rank} worker {worker}")):
                    batch = int(meta[2])
                    for text in texts:
                        url, key = text.split("|")
                        got[batch].append(to_id({"__url__": url, "__key__": key}))
        assert got == expected, (world_size, workers)
        fields = {"order": "global", "mode": mode, "world_size": None, "workers": None, "global_batch": g,
                  "shuffle_shards": width, "open_shards_per_reader": width, "buffer_samples_per_reader": buffer,
                  "readers": None}
        assert shuffle.figures(got, **fields) == shuffle.figures(expected, **fields)


def test_cli_prints_a_table_and_a_json_line(capsys) -> None:
    code = bench_data.main(["--shuffle-quality", "--shards", "8", "--samples-per-shard", "40", "--positions", "128",
                            "--world-sizes", "1,2", "--workers-list", "1", "--global-batches", "32",
                            "--shuffle-shards-list", "4", "--modes", "epoch"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[0].startswith("| order | mode |")
    result = json.loads(out[-1])
    assert result["bench"] == "shuffle_quality"
    assert {(r["order"], r["world_size"]) for r in result["rows"]} == {("global", None), ("per-worker", 1),
                                                                        ("per-worker", 2)}
    assert all(r["batches"] == 4 for r in result["rows"])


def test_cli_refuses_a_batch_that_does_not_split_over_the_ranks(capsys) -> None:
    code = bench_data.main(["--shuffle-quality", "--world-sizes", "3", "--global-batches", "64"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not split over 3 ranks" in err[0]


def test_parallel_streams_mix_as_many_blocks_as_there_are_streams(rows) -> None:
    one = pick(rows, order="global", mode="epoch", shuffle_shards=4, order_streams=1)
    four = pick(rows, order="global", mode="epoch", shuffle_shards=4, order_streams=4)
    assert four.distinct_shards_mean > 2.5 * one.distinct_shards_mean
    assert four.open_shards_per_reader == 16
