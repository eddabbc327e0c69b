"""Write samples into numbered WebDataset shards plus their ``shards.json`` manifest."""

from __future__ import annotations

import os

import webdataset as wds

from clip_train.data.manifest import write_manifest


class ManifestShardWriter:
    """``wds.ShardWriter`` into ``out_dir/{prefix}00000.tar, ...`` that also records each shard's sample count
    and size, and writes ``out_dir/shards.json`` on ``close()``.

    Samples are dicts with ``__key__`` and bytes (or str) values keyed by extension: ``{"__key__": "000001",
    "jpg": b"...", "txt": "a dog"}``.
    """

    def __init__(self, out_dir: str, samples_per_shard: int = 10_000, max_shard_bytes: float = 1e9,
                 prefix: str = "") -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples per shard must be >= 1, got {samples_per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.prefix = prefix
        self.shards: list[tuple[str, int, int]] = []
        self._writer = wds.ShardWriter(os.path.join(out_dir, f"{prefix}%05d.tar"), maxcount=samples_per_shard,
                                       maxsize=max_shard_bytes, post=self._finished, verbose=0)

    def _finished(self, fname: str) -> None:
        count = self._writer.count
        if count == 0:  # ShardWriter opens a shard before the first sample; drop it if nothing came
            os.remove(fname)
            return
        self.shards.append((os.path.basename(fname), count, os.path.getsize(fname)))

    def write(self, sample: dict[str, object]) -> None:
        """Append one sample, starting a new shard when the current one is full."""
        self._writer.write(sample)

    def close(self) -> str:
        """Finish the last shard, write the manifest; returns the brace pattern of the shards written."""
        self._writer.close()
        write_manifest(self.out_dir, self.shards)
        return self.pattern

    @property
    def pattern(self) -> str:
        """Brace pattern naming every shard written so far (``DIR/{00000..00012}.tar``)."""
        n = len(self.shards)
        if n == 0:
            return ""
        if n == 1:
            return os.path.join(self.out_dir, self.shards[0][0])
        return os.path.join(self.out_dir, f"{self.prefix}{{00000..{n - 1:05d}}}.tar")

    def __enter__(self) -> ManifestShardWriter:  # noqa: PYI034 - py3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()
