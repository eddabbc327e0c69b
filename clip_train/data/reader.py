"""Raw samples out of the units of a block: webdataset's tar reading, interleaving, and shuffling.

Samples here are dicts of undecoded bytes (``{"__key__", "__url__", "jpg", "txt", ...}``), so a resumed
worker can skip to its saved position at the cost of reading bytes, never of decoding images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from clip_train.data.plan import Block, Unit, mix_seed
from clip_train.data.remote import RemoteOptions, ShardUnavailable, open_shard

Sample = dict[str, object]


def _opened(url: str, handler: Callable[[Exception], bool], options: RemoteOptions | None) -> Iterator[dict]:
    """The shard's stream for webdataset's tar expander, closed when reading ends (connections are freed)."""
    try:
        stream = open_shard(url, options)
    except ShardUnavailable as exn:
        handler(exn)
        return
    try:
        yield {"url": url, "stream": stream}
    finally:
        stream.close()


def read_unit(unit: Unit, handler: Callable[[Exception], bool], options: RemoteOptions | None = None
              ) -> Iterator[Sample]:
    """Samples of one unit; open errors and broken tars go to ``handler`` (which returns True to go on).

    Local paths, ``s3://``, ``gs://``, http(s) URLs and ``pipe:`` commands are opened by
    ``remote.open_shard`` with ``options``' timeouts and retries; a shard abandoned after them reaches
    ``handler`` as ``ShardUnavailable``.
    """
    files = tar_file_expander(_opened(unit.url, handler, options), handler=handler)
    samples = group_by_keys(files, handler=handler)
    if unit.start or unit.stop is not None:  # a range: the samples before it are read as bytes, not decoded
        samples = islice(samples, unit.start, unit.stop)
    if unit.parts == 1:
        return samples
    return (s for i, s in enumerate(samples) if i % unit.parts == unit.part)


def interleave(streams: list[Iterator[Sample]], rng: random.Random) -> Iterator[Sample]:
    """Draw each next sample from a random still-open stream, so a batch mixes several shards."""
    live = list(streams)
    while live:
        i = rng.randrange(len(live))
        try:
            yield next(live[i])
        except StopIteration:
            live.pop(i)


def block_samples(block: Block, handler_for: Callable[[str], Callable[[Exception], bool]],
                  shuffle_buffer: int, options: RemoteOptions | None = None) -> Iterable[Sample]:
    """The block's samples in their final (deterministic) order: units interleaved, then a shuffle buffer.

    The buffer fills completely before the first sample leaves it, and restarts with each block; both
    random sources are seeded from the block's seed, so the order is a pure function of the plan.
    """
    streams = [read_unit(unit, handler_for(unit.url), options) for unit in block.units]
    mixed: Iterable[Sample] = streams[0] if len(streams) == 1 else \
        interleave(streams, random.Random(mix_seed(block.seed, 1)))
    if shuffle_buffer > 1:
        mixed = wds.filters.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=mix_seed(block.seed, 2))(mixed)
    return mixed
