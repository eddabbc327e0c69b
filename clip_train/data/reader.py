"""Raw samples out of the units of a block: webdataset's tar reading, interleaving, and shuffling.

Samples here are dicts of undecoded bytes (``{"__key__", "__url__", "jpg", "txt", ...}``), so a resumed
worker can skip to its saved position at the cost of reading bytes, never of decoding images.
"""

from __future__ import annotations

import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from clip_train.data.plan import Block, Unit, mix_seed
from clip_train.data.remote import RemoteOptions, ShardUnavailable, open_shard, scheme

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


class LazyMember:
    """A tar member's bytes, not read yet: where they lie in a local tar (``materialize`` reads them)."""

    __slots__ = ("offset", "path", "size")

    def __init__(self, path: str, offset: int, size: int) -> None:
        self.path, self.offset, self.size = path, offset, size


_META = re.compile(r"__[^/]*__($|/)")


def _local_members(path: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Members of a local uncompressed tar from their headers only (tarfile seeks past the data)."""
    try:
        tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by the with below
    except Exception as exn:  # noqa: BLE001 - empty or broken tars go to the handler, like webdataset's reader
        handler(exn)
        return
    with tar:
        try:
            for info in tar:
                if not info.isreg() or _META.match(info.name):
                    continue
                yield {"fname": info.name, "data": LazyMember(path, info.offset_data, info.size), "__url__": path}
                tar.members = []  # keep no index of a shard's members
        except Exception as exn:  # noqa: BLE001 - a tar cut short: the samples before the cut stay
            handler(exn)


def lazy_capable(url: str) -> bool:
    """Whether ``url`` is a local uncompressed tar, whose members can be passed over without reading them."""
    return scheme(url) == "file" and url.endswith(".tar") and os.path.isfile(url)


def materialize(sample: Sample, files: dict[str, object]) -> Sample:
    """``sample`` with its lazy members read (``files`` caches one open file per shard); a member cut short
    raises ``OSError``."""
    out: Sample = {}
    for key, value in sample.items():
        if isinstance(value, LazyMember):
            handle = files.get(value.path)
            if handle is None:
                for old in list(files.values()):
                    old.close()  # type: ignore[attr-defined]
                files.clear()
                handle = files[value.path] = open(value.path, "rb")  # noqa: SIM115 - closed by the next shard
            handle.seek(value.offset)  # type: ignore[attr-defined]
            data = handle.read(value.size)  # type: ignore[attr-defined]
            if len(data) != value.size:
                raise OSError(f"{value.path}: member {sample.get('__key__')}.{key} cut short")
            value = data
        out[key] = value
    return out


def read_unit(unit: Unit, handler: Callable[[Exception], bool], options: RemoteOptions | None = None,
              lazy: bool = False) -> Iterator[Sample]:
    """Samples of one unit; open errors and broken tars go to ``handler`` (which returns True to go on).

    Local paths, ``s3://``, ``gs://``, http(s) URLs and ``pipe:`` commands are opened by
    ``remote.open_shard`` with ``options``' timeouts and retries; a shard abandoned after them reaches
    ``handler`` as ``ShardUnavailable``.
    """
    if lazy and lazy_capable(unit.url):  # members read only when materialized (training's pass-over)
        files = _local_members(unit.url, handler)
    else:
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
                  shuffle_buffer: int, options: RemoteOptions | None = None, lazy: bool = False
                  ) -> Iterable[Sample]:
    """The block's samples in their final (deterministic) order: units interleaved, then a shuffle buffer.

    The buffer fills completely before the first sample leaves it, and restarts with each block; both
    random sources are seeded from the block's seed, so the order is a pure function of the plan. With
    ``lazy``, local uncompressed tars give samples whose members are ``LazyMember`` until ``materialize``:
    the order depends only on how many samples there are, so passing over one costs no data read.
    """
    streams = [read_unit(unit, handler_for(unit.url), options, lazy) for unit in block.units]
    mixed: Iterable[Sample] = streams[0] if len(streams) == 1 else \
        interleave(streams, random.Random(mix_seed(block.seed, 1)))
    if shuffle_buffer > 1:
        mixed = wds.filters.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=mix_seed(block.seed, 2))(mixed)
    return mixed
