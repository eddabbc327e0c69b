"""``shards.json``: the sample count of every shard, written by ``make_shards`` and read for epoch lengths.

Format (version 1)::

    {"version": 1, "total_samples": 2500,
     "shards": [{"name": "00000.tar", "num_samples": 1000, "bytes": 51234816}, ...]}

Shard names are relative to the manifest's folder. Shards written by img2dataset carry a
``NAME_stats.json`` (and ``NAME.parquet``) next to each tar instead; its ``successes`` count (or the
parquet's rows with status ``success``) is used when there is no manifest. Manifests and stats are read
from buckets as well as from local folders.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from clip_train.data.remote import RemoteOptions, open_shard, read_small, scheme

log = logging.getLogger(__name__)

MANIFEST_NAME = "shards.json"


def write_manifest(out_dir: str, shards: Sequence[tuple]) -> str:
    """Write ``out_dir/shards.json`` from ``(name, num_samples, bytes)`` tuples; returns its path."""
    entries = [{"name": name, "num_samples": int(n), "bytes": int(size)} for name, n, size in shards]
    doc = {"version": 1, "total_samples": sum(e["num_samples"] for e in entries), "shards": entries}
    path = os.path.join(out_dir, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)  # readers never see a half-written manifest
    return path


def read_manifest(path: str, options: RemoteOptions | None = None) -> dict[str, int]:
    """Shard name -> sample count from a manifest at a local path, an ``s3://``/``gs://``/http URL, or
    anything webdataset can open (``pipe:``)."""
    try:
        if scheme(path) == "pipe":
            with wds.gopen(path, "rb") as f:
                raw = f.read()
        else:
            raw = read_small(path, options)
            if raw is None:
                raise FileNotFoundError("not found")
        doc = json.loads(raw)
        return {str(e["name"]): int(e["num_samples"]) for e in doc["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise ValueError(f"cannot read shard manifest {path}: {exn} (expected {MANIFEST_NAME} as written by "
                         "python -m clip_train.data.make_shards)") from exn


def _img2dataset_count(shard_url: str, options: RemoteOptions | None = None) -> tuple[int, str] | None:
    """img2dataset's count of a shard and where it came from: ``NAME_stats.json`` (``successes``), or the
    rows of ``NAME.parquet`` whose ``status`` is ``success``."""
    base = os.path.splitext(shard_url)[0]
    try:
        raw = read_small(base + "_stats.json", options)
        if raw is not None:
            return int(json.loads(raw)["successes"]), "_stats.json"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        raw = read_small(base + ".parquet", options)
        if raw is not None:
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(raw))
            if "status" in table.column_names:
                return sum(1 for v in table.column("status").to_pylist() if v == "success"), ".parquet"
            return table.num_rows, ".parquet"
    except Exception as exn:  # noqa: BLE001 - an unreadable parquet is no count, like a missing one
        log.debug("data: %s.parquet gives no count: %s", base, exn)
    return None


def count_tar_samples(url: str, options: RemoteOptions | None = None) -> int:
    """Samples in a shard, counted from its member names (local tars: headers only, data is seeked past)."""
    keys = 0
    last = None
    if scheme(url) == "file":
        with tarfile.open(url) as tar:
            names = [m.name for m in tar.getmembers() if m.isreg()]
    else:
        with open_shard(url, options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            names = [m.name for m in tar if m.isreg()]
    for name in names:
        key, _ = base_plus_ext(name)
        if key is not None and key != last:
            keys, last = keys + 1, key
    return keys


def sample_counts(urls: Sequence[str], manifest: str | None = None, options: RemoteOptions | None = None
                  ) -> list[int] | None:
    """Sample count of every shard in ``urls``, or None when none of them is known.

    Counts come from ``manifest`` when given (matched by shard file name), else from the ``shards.json``
    in each shard's folder (local or in a bucket), else from img2dataset's per-shard ``NAME_stats.json`` or
    ``NAME.parquet``. Shards left without a count while others have one (an img2dataset download that was
    interrupted) are counted from their tars, with a warning that names them.
    """
    by_name = read_manifest(manifest, options) if manifest else None
    per_dir: dict[str, dict[str, int] | None] = {}
    counts: list[int | None] = []
    for url in urls:
        name = os.path.basename(url)
        if by_name is not None:
            counts.append(by_name.get(name, by_name.get(url)))
            continue
        folder = os.path.dirname(url)
        if folder not in per_dir:
            per_dir[folder] = None
            if scheme(url) in ("file", "s3", "gs"):
                candidate = f"{folder}/{MANIFEST_NAME}" if folder else MANIFEST_NAME
                try:
                    raw = read_small(candidate, options)
                except OSError:
                    raw = None
                per_dir[folder] = read_manifest(candidate, options) if raw is not None else None
        found = per_dir[folder]
        counts.append(found.get(name) if found is not None else None)
    sources: dict[str, int] = {}
    unknown = [i for i, c in enumerate(counts) if c is None and scheme(urls[i]) in ("file", "s3", "gs")]
    if unknown:
        with ThreadPoolExecutor(16) as pool:  # bucket round trips overlap
            stats = list(pool.map(lambda i: _img2dataset_count(urls[i], options), unknown))
        for i, got in zip(unknown, stats):
            if got is not None:
                counts[i] = got[0]
                sources[got[1]] = sources.get(got[1], 0) + 1
    known = sum(c is not None for c in counts)
    if known == len(counts):
        return counts  # type: ignore[return-value]
    if known == 0 or len(unknown) < len(counts) - known:
        return None  # nothing known, or an http/pipe shard without a count (counting it would read it all)
    gaps = [i for i, c in enumerate(counts) if c is None]
    origin = ", ".join(f"{n} from {where}" for where, n in sources.items()) or "from the manifest"
    for i in gaps:
        counts[i] = count_tar_samples(urls[i], options)
    named = ", ".join(f"{os.path.basename(urls[i])} ({counts[i]} samples)" for i in gaps[:5])
    more = f" and {len(gaps) - 5} more" if len(gaps) > 5 else ""
    log.warning("data: %d of %d shards have no sample count (no manifest entry, NAME_stats.json or NAME.parquet: "
                "an interrupted img2dataset download?), so their samples were counted from the tars: %s%s "
                "(folder %s); the other %d counts came %s. Finish the download (img2dataset "
                "incremental_mode) or remove those shards to silence this.", len(gaps), len(counts), named, more,
                os.path.dirname(urls[gaps[0]]) or ".", known, origin)
    return counts  # type: ignore[return-value]
