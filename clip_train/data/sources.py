"""Turn ``data.train_shards`` into concrete shard URLs: brace patterns, globs, lists, list files, weighted sources.

Every mistake a user can make here is reported as one ``ValueError`` line that names the setting and the
pattern, raised when the loader is built, before any training step.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from clip_train.data.remote import (
    RemoteOptions,
    ShardUnavailable,
    describe_s3_error,
    gcs_filesystem,
    list_matching,
    open_shard,
    s3_list,
    scheme,
)

log = logging.getLogger(__name__)

QUOTE_HINT = ("on the Hydra command line, quote brace patterns: "
              "\"data.train_shards='/data/laion/{00000..41407}.tar'\"")
_GLOB_CHARS = re.compile(r"[*?\[]")
_LIST_SUFFIXES = (".txt", ".list")


@dataclass(frozen=True)
class ShardSource:
    """The shards one pattern (or list) expanded to, and its mixing weight (resampled mode)."""

    pattern: str
    urls: tuple[str, ...]
    weight: float = 1.0


def is_remote(url: str) -> bool:
    """True for URLs (``pipe:``, ``http://``, ``s3://``...) rather than local paths."""
    return url.startswith("pipe:") or "://" in url


def is_object_store(url: str) -> bool:
    """True for ``s3://`` and ``gs://`` URLs, whose shards can be listed and checked before training."""
    return scheme(url) in ("s3", "gs")


def _store_error(exn: Exception, url: str, options: RemoteOptions) -> str:
    if scheme(url) == "s3" and not isinstance(exn, ValueError):
        return describe_s3_error(exn, url, options)
    return f"{url}: {exn}" if not isinstance(exn, ValueError) else str(exn)


def _expand_object_store(items: Sequence[str], name: str, pattern: str, options: RemoteOptions
                         ) -> tuple[list[str], int, str | None]:
    """Existing objects among ``items`` (globs and folder prefixes listed), the missing count, the first missing.

    Concrete names are checked against one listing of their common prefix, so 41,408 shards cost a few
    paginated LIST requests, not 41,408 HEADs.
    """
    found: list[str] = []
    concrete = []
    try:
        for item in items:
            if _GLOB_CHARS.search(item) or not os.path.splitext(item)[1]:
                found.extend(list_matching(item, options))
            else:
                concrete.append(item)
        missing, first_missing = 0, None
        listed: set[str] = set()
        by_bucket: dict[str, list[str]] = {}
        for item in concrete:
            by_bucket.setdefault(item.split("/", 3)[2] if item.count("/") >= 3 else item, []).append(item)
        for group in by_bucket.values():
            prefix = os.path.commonprefix(group)
            if prefix.count("/") < 3:  # at least s3://bucket/
                prefix = "/".join(group[0].split("/", 3)[:3]) + "/"
            if scheme(prefix) == "s3":
                listed.update(s3_list(prefix, options))
            else:
                listed.update("gs://" + p for p in gcs_filesystem(options).glob(prefix[len("gs://"):] + "**"))
        for item in concrete:
                if item in listed:
                    found.append(item)
                else:
                    missing += 1
                    first_missing = first_missing or item
    except Exception as exn:  # noqa: BLE001 - boto3/gcsfs raise many types; each becomes one line
        raise ValueError(f"{name}={pattern!r}: {_store_error(exn, items[0], options)}") from None
    return found, missing, first_missing


def _plain(spec: Any) -> Any:
    """OmegaConf containers -> plain Python, so the rest of this module sees lists, dicts and strings."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but keep the module usable alone
        return spec
    if isinstance(spec, (DictConfig, ListConfig)):
        return OmegaConf.to_container(spec, resolve=True)
    return spec


def _check_braces(pattern: str, name: str) -> None:
    depth = 0
    for ch in pattern:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            break
    if depth != 0:
        raise ValueError(f"{name}={pattern!r} has unbalanced braces; {QUOTE_HINT}")


def _read_list_file(path: str, name: str) -> list[str]:
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exn:
        raise ValueError(f"{name}={path!r}: cannot read the shard list: {exn}") from exn
    folder = os.path.dirname(path)
    urls = [u if is_remote(u) or os.path.isabs(u) else os.path.join(folder, u)
            for u in lines if u and not u.startswith("#")]
    if not urls:
        raise ValueError(f"{name}={path!r}: the shard list file names no shards")
    return urls


def _expand_local(items: Sequence[str]) -> list[str]:
    """Local items as paths: globs matched, folders (not named ``*.tar``) expanded to the tars in them."""
    out: list[str] = []
    for item in items:
        item = os.path.expanduser(item)
        if _GLOB_CHARS.search(item):
            out.extend(sorted(glob.glob(item)))
        elif os.path.isdir(item) and not item.endswith(".tar"):  # a folder means every tar in it
            out.extend(sorted(glob.glob(os.path.join(item, "*.tar"))))
        else:
            out.append(item)
    return out


def _warn_if_shell_expanded(pattern: str, url: str) -> None:
    """A lone numbered shard whose folder holds many siblings: often a brace pattern the shell expanded.

    ``data.train_shards=/d/{0..9}.tar`` unquoted becomes ten overrides in bash and Hydra keeps the last one.
    """
    stem, ext = os.path.splitext(os.path.basename(url))
    if not stem.isdigit():
        return
    siblings = glob.glob(os.path.join(os.path.dirname(url), "[0-9]" * len(stem) + ext))
    if len(siblings) > 1:
        log.warning("data: %r names one shard but its folder holds %d numbered shards; if you meant a brace "
                    "pattern, the shell may have expanded it: %s", pattern, len(siblings), QUOTE_HINT)


def expand_pattern(pattern: str, name: str = "data.train_shards", *, lone: bool = True,
                   options: RemoteOptions | None = None) -> list[str]:
    """Shard URLs for one pattern string; raises ``ValueError`` naming ``name`` and the pattern if none exist.

    Brace expansion and ``::``-joined lists use webdataset's ``expand_urls``; local items may also be globs,
    folders (all ``*.tar`` inside) or a ``.txt`` file listing shards; ``s3://``/``gs://`` items may be
    globs or folder prefixes too, and are checked against a listing of the bucket. http(s) and ``pipe:``
    URLs are not checked here. Missing shards among existing ones are dropped with a warning. ``lone``:
    the pattern is the whole setting (not an item of a list), so one numbered shard may be what the shell
    left of a brace pattern.
    """
    options = options or RemoteOptions()
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"{name}={pattern!r} is empty; set it to a shard pattern such as "
                         "'/data/laion/{00000..41407}.tar'")
    pattern = pattern.strip()
    _check_braces(pattern, name)
    if not is_remote(pattern) and pattern.endswith(_LIST_SUFFIXES) and "{" not in pattern:
        if not os.path.exists(os.path.expanduser(pattern)):
            raise ValueError(f"{name}={pattern!r}: shard list file not found")
        items = _read_list_file(os.path.expanduser(pattern), name)
    else:
        items = list(wds.shardlists.expand_urls(pattern))
    stored = [u for u in items if is_object_store(u)]
    remote = [u for u in items if is_remote(u) and not is_object_store(u)]
    local = _expand_local([u for u in items if not is_remote(u)])
    existing = [u for u in local if os.path.isfile(u)]
    directories = [u for u in local if os.path.isdir(u)]
    if len(directories) == len(local) and local and not remote and not stored:
        raise ValueError(f"{name}={pattern!r}: {directories[0]} is a directory, not a tar file; point at the "
                         "shards inside it (a folder not named *.tar means every .tar in it)")
    if directories:
        log.warning("data: %s=%r: %d of the paths are directories, not tar files, and are left out (first: %s)",
                    name, pattern, len(directories), directories[0])
    missing = len(local) - len(existing) - len(directories)
    first = next((u for u in local if not os.path.exists(u)), None)
    if stored:
        found, store_missing, store_first = _expand_object_store(stored, name, pattern, options)
        existing += found
        missing += store_missing
        first = first or store_first
    checked = len(local) + len(stored)
    if not remote and not existing:
        hint = f"; {QUOTE_HINT}" if "{" in pattern or "," in pattern else ""
        what = "objects" if stored and not local else "files"
        raise ValueError(f"{name}={pattern!r} matched no {what} (checked {checked} path(s), e.g. "
                         f"{(local or stored or [pattern])[0]!r}){hint}")
    if missing:
        log.warning("data: %s=%r: %d of %d shards do not exist and are left out (first: %s)",
                    name, pattern, missing, checked, first)
    if lone and len(existing) == 1 and not remote and not stored and "{" not in pattern \
            and not _GLOB_CHARS.search(pattern):
        _warn_if_shell_expanded(pattern, existing[0])
    return remote + existing


def unset_shards_message(name: str = "data.train_shards") -> str:
    """The refusal of a run whose shard setting is left unset (the real experiments ship without one)."""
    return (f"{name} is not set; give a shard pattern such as {name}='/data/laion/{{00000..41407}}.tar', "
            f"or {name}=demo for the built-in digits")


def resolve_sources(spec: Any, name: str = "data.train_shards", options: RemoteOptions | None = None
                    ) -> list[ShardSource]:
    """Parse a shard setting into sources: a pattern, a list of patterns (one source), or weighted sources.

    Weighted form: a list of ``{"shards": pattern-or-list, "weight": w}`` (plain patterns in the list count
    as weight 1).
    """
    spec = _plain(spec)
    if spec is None:
        raise ValueError(unset_shards_message(name))
    if isinstance(spec, str):
        return [ShardSource(spec, tuple(expand_pattern(spec, name, options=options)))]
    if isinstance(spec, dict):
        if "shards" not in spec:
            raise ValueError(f"{name} was read as a mapping {spec!r}: Hydra parses an unquoted '{{' as a dict; "
                             f"{QUOTE_HINT}")
        spec = [spec]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"{name} is an empty list; give at least one shard pattern")
        if all(isinstance(s, str) for s in spec):
            urls = [u for s in spec for u in expand_pattern(s, name, lone=False, options=options)]
            return [ShardSource(", ".join(spec), tuple(urls))]
        sources = []
        for i, item in enumerate(spec):
            if isinstance(item, str):
                item = {"shards": item}
            if not isinstance(item, dict) or "shards" not in item or set(item) - {"shards", "weight"}:
                raise ValueError(f"{name}[{i}]={item!r}: each source is a pattern or "
                                 "{shards: PATTERN_OR_LIST, weight: FLOAT}")
            weight = float(item.get("weight", 1.0))
            if not weight > 0:
                raise ValueError(f"{name}[{i}] weight must be > 0, got {weight}")
            inner = item["shards"]
            patterns = [inner] if isinstance(inner, str) else list(inner)
            urls = [u for p in patterns
                    for u in expand_pattern(p, f"{name}[{i}].shards", lone=isinstance(inner, str),
                                        options=options)]
            sources.append(ShardSource(", ".join(patterns), tuple(urls), weight))
        return sources
    raise ValueError(f"{name} must be a pattern string, a list of patterns or a list of "
                     f"{{shards, weight}} sources, got {type(spec).__name__}: {spec!r}")


def _probe(path: str, probe: int, options: RemoteOptions) -> list[dict]:
    """The first ``probe`` samples of a shard (local or in an object store)."""
    with open_shard(path, options) as f:
        files = (dict(member, __url__=path) for member in tar_file_iterator(f))
        return list(islice(group_by_keys(files), probe))


def check_first_shard(sources: Sequence[ShardSource], name: str = "data.train_shards",
                      image_key: str | None = None, text_key: str | None = None, probe: int = 20,
                      label_key: str | None = None, options: RemoteOptions | None = None) -> None:
    """Read the start of each source's first shard (local or object store), so a wrong file type or wrong keys
    fail before training.

    With ``image_key``/``text_key``, at least one of the first ``probe`` samples must have both (or, with
    ``label_key``, an image and a class label); a shard whose samples all lack them points at a wrong
    ``data.image_key``/``data.text_key``, not at bad data. A first shard that is empty, cut short or
    unreadable is bad data, skipped and counted while training like any other: the next one is probed.
    """
    options = options or RemoteOptions()
    for source in sources:
        candidates = [u for u in source.urls if not is_remote(u) or is_object_store(u)][:5]
        unavailable: ShardUnavailable | None = None
        for path in candidates:
            if not is_remote(path) and os.path.isfile(path) and os.path.getsize(path) == 0:
                log.warning("data: %s: %s is empty; it is skipped (and counted) like any broken shard",
                            name, path)
                continue
            try:
                samples = _probe(path, probe, options)
            except ShardUnavailable as exn:
                if isinstance(exn.__cause__, PermissionError) or "Permission denied" in str(exn):
                    raise ValueError(f"{name}={source.pattern!r}: cannot read {exn}") from None
                unavailable = exn
                continue  # counted while training; judge the next shard
            except PermissionError as exn:
                raise ValueError(f"{name}={source.pattern!r}: cannot read {path}: {exn.strerror}") from exn
            except ValueError:
                break  # e.g. duplicate member names: bad data, skipped and counted while training
            except (tarfile.TarError, OSError) as exn:
                if "unexpected end" in str(exn) or "empty file" in str(exn):
                    continue  # a shard cut short is bad data too
                raise ValueError(f"{name}={source.pattern!r}: {path} is not a readable tar file ({exn}); "
                                 "shards are WebDataset .tar files, e.g. made by python -m "
                                 "clip_train.data.make_shards") from exn
            unavailable = None
            if not samples:
                continue  # a tar without members: nothing to judge the keys by
            if image_key is not None and text_key is not None:
                _check_keys(samples, source, path, name, image_key, text_key, label_key)
            break
        else:
            if unavailable is not None and len(candidates) == len(source.urls):
                raise ValueError(f"{name}={source.pattern!r}: no shard could be read: {unavailable}")


def _check_keys(samples: list[dict], source: ShardSource, path: str, name: str, image_key: str, text_key: str,
                label_key: str | None) -> None:
    images = [k.strip().lower() for k in image_key.split(";") if k.strip()]
    described = [k.lower() for k in (text_key, label_key) if k]
    if not any(any(k in s for k in described) and any(k in s for k in images) for s in samples):
        found = sorted({k for s in samples for k in s if not k.startswith("__")})
        wanted = f"a caption ({text_key})" + (f" or a class ({label_key})" if label_key else "")
        raise ValueError(f"{name}={source.pattern!r}: none of the first {len(samples)} samples of {path} has "
                         f"both an image ({image_key}) and {wanted}; they hold "
                         f"{', '.join(found) or 'nothing'}: set data.image_key / data.text_key")
