"""``shards.json``: the sample count of every shard, written by ``make_shards`` and read for epoch lengths.

Format (version 1)::

    {"version": 1, "total_samples": 2500,
     "shards": [{"name": "00000.tar", "num_samples": 1000, "bytes": 51234816}, ...]}

Shard names are relative to the manifest's folder. Shards written by img2dataset carry a
``NAME_stats.json`` next to each tar instead; its ``successes`` count is used when there is no manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import webdataset as wds

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


def read_manifest(path: str) -> dict[str, int]:
    """Shard name -> sample count from a manifest at a local path or any URL webdataset can open."""
    try:
        if os.path.exists(path):
            with open(path, "rb") as f:
                raw = f.read()
        else:
            with wds.gopen(path, "rb") as f:
                raw = f.read()
        doc = json.loads(raw)
        return {str(e["name"]): int(e["num_samples"]) for e in doc["shards"]}
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise ValueError(f"cannot read shard manifest {path}: {exn} (expected {MANIFEST_NAME} as written by "
                         "python -m clip_train.data.make_shards)") from exn


def _img2dataset_count(shard_path: str) -> int | None:
    stats = os.path.splitext(shard_path)[0] + "_stats.json"
    try:
        with open(stats) as f:
            return int(json.load(f)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sample_counts(urls: Sequence[str], manifest: str | None = None) -> list[int] | None:
    """Sample count of every shard in ``urls``, or None when any of them is unknown.

    Counts come from ``manifest`` when given (matched by shard file name), else from the ``shards.json``
    in each local shard's folder, else from img2dataset's per-shard ``_stats.json`` files.
    """
    by_name = read_manifest(manifest) if manifest else None
    per_dir: dict[str, dict[str, int] | None] = {}
    counts: list[int] = []
    for url in urls:
        name = os.path.basename(url)
        if by_name is not None:
            count = by_name.get(name, by_name.get(url))
        else:
            folder = os.path.dirname(url)
            if folder not in per_dir:
                candidate = os.path.join(folder, MANIFEST_NAME)
                per_dir[folder] = read_manifest(candidate) if os.path.isfile(candidate) else None
            found = per_dir[folder]
            count = found.get(name) if found is not None else None
            if count is None and os.path.isfile(url):
                count = _img2dataset_count(url)
        if count is None:
            return None
        counts.append(count)
    return counts
