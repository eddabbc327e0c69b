"""``shards.json``: the sample count of every shard, written by ``make_shards`` and read for epoch lengths.

Format (version 1)::

    {"version": 1, "total_samples": 2500,
     "shards": [{"name": "00000.tar", "num_samples": 1000, "bytes": 51234816}, ...]}

Shard names are relative to the manifest's folder. Shards written by img2dataset carry a
``NAME_stats.json`` (and ``NAME.parquet``) next to each tar instead; its ``successes`` count (or the
parquet's rows with status ``success``) is used when there is no manifest. Datasets prepared for OpenCLIP
carry its ``sizes.json`` (``{"00000.tar": 10000, ...}``), read like a manifest, or only its ``__len__`` (the
total, a Python integer literal), which gives epoch mode its length. Manifests and stats are read from
buckets as well as from local folders.
"""

from __future__ import annotations

import ast
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
OPENCLIP_SIZES_NAME = "sizes.json"
OPENCLIP_LEN_NAME = "__len__"


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


def parse_manifest(raw: bytes | str) -> dict[str, int]:
    """Shard name -> sample count from the text of a ``shards.json`` or of OpenCLIP's ``sizes.json``."""
    doc = json.loads(raw)
    if isinstance(doc, dict) and isinstance(doc.get("shards"), list):
        return {str(e["name"]): int(e["num_samples"]) for e in doc["shards"]}
    if isinstance(doc, dict) and doc and all(isinstance(v, (int, str)) for v in doc.values()):
        return {str(name): int(count) for name, count in doc.items()}  # OpenCLIP's sizes.json
    raise ValueError("neither a shards.json nor a sizes.json ({\"NAME.tar\": count, ...})")


def _manifest_error(path: str, exn: Exception) -> ValueError:
    return ValueError(f"cannot read shard manifest {path}: {exn} (expected {MANIFEST_NAME} as written by "
                      f"python -m clip_train.data.make_shards, or OpenCLIP's {OPENCLIP_SIZES_NAME})")


def read_manifest(path: str, options: RemoteOptions | None = None) -> dict[str, int]:
    """Shard name -> sample count from a manifest (``shards.json``, or OpenCLIP's ``sizes.json``) at a local
    path, an ``s3://``/``gs://``/http URL, or anything webdataset can open (``pipe:``)."""
    try:
        if scheme(path) == "pipe":
            with wds.gopen(path, "rb") as f:
                raw = f.read()
        else:
            raw = read_small(path, options)
            if raw is None:
                raise FileNotFoundError("not found")
        return parse_manifest(raw)
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise _manifest_error(path, exn) from exn


def _beside(folder: str, name: str) -> str:
    """The path of file ``name`` in a shard's folder (``""`` for the current directory)."""
    return f"{folder}/{name}" if folder else name


def _folder_manifest(folder: str, options: RemoteOptions | None) -> tuple[dict[str, int], str] | None:
    """The counts in ``folder``'s ``shards.json``, else in its OpenCLIP ``sizes.json``, and the file's name."""
    for name in (MANIFEST_NAME, OPENCLIP_SIZES_NAME):
        candidate = _beside(folder, name)
        try:
            raw = read_small(candidate, options)
        except OSError:
            raw = None
        if raw is not None:
            try:
                return parse_manifest(raw), name
            except (ValueError, KeyError, TypeError) as exn:
                raise _manifest_error(candidate, exn) from exn
    return None


def openclip_total(urls: Sequence[str], options: RemoteOptions | None = None) -> int | None:
    """The total in OpenCLIP's ``__len__`` next to the first shard (local or in a bucket), if there is one."""
    if not urls or scheme(urls[0]) not in ("file", "s3", "gs"):
        return None
    path = _beside(os.path.dirname(urls[0]), OPENCLIP_LEN_NAME)
    try:
        raw = read_small(path, options)
        if raw is None:
            return None
        total = ast.literal_eval(raw.decode().strip())
    except (OSError, ValueError, SyntaxError, UnicodeDecodeError) as exn:
        raise ValueError(f"cannot read {path} (OpenCLIP's dataset size: one integer): {exn}") from exn
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise ValueError(f"cannot read {path} (OpenCLIP's dataset size: one integer): it holds {total!r}")
    return total


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

    Counts come from ``manifest`` when given (matched by shard file name), else from the ``shards.json`` (or
    OpenCLIP's ``sizes.json``) in each shard's folder (local or in a bucket), else from img2dataset's
    per-shard ``NAME_stats.json`` or ``NAME.parquet``. Shards left without a count while others have one (an img2dataset download that was
    interrupted) are counted from their tars, with a warning that names them.
    """
    by_name = read_manifest(manifest, options) if manifest else None
    per_dir: dict[str, tuple[dict[str, int], str] | None] = {}
    counts: list[int | None] = []
    sources: dict[str, int] = {}  # where the counts came from, for the warning below
    for url in urls:
        name = os.path.basename(url)
        if by_name is not None:
            found = by_name, "data.manifest"
        else:
            folder = os.path.dirname(url)
            if folder not in per_dir:
                per_dir[folder] = _folder_manifest(folder, options) if scheme(url) in ("file", "s3", "gs") else None
            found = per_dir[folder]
        count = None if found is None else found[0].get(name, found[0].get(url))
        counts.append(count)
        if count is not None:
            sources[found[1]] = sources.get(found[1], 0) + 1
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
    origin = ", ".join(f"{n} from {where}" for where, n in sources.items())
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
