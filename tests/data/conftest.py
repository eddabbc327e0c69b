"""Fixtures that write small WebDataset shards (tiny images, captions "sample N") into tmp dirs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
from data_helpers import good_sample, write_tar

from clip_train.data.manifest import write_manifest
from clip_train.tokenizer import get_tokenizer


@pytest.fixture
def make_shards(tmp_path) -> Callable:
    """``make_shards(sizes, manifest=True, bad=None, name="shards")`` -> (brace pattern, list of captions).

    Shard ``i`` holds ``sizes[i]`` good samples numbered consecutively from ``first`` (captions listed as
    "sampleN"); ``bad`` maps a shard index to extra raw samples appended to it.
    """
    def make(sizes: Sequence[int], manifest: bool = True, bad: dict[int, list[dict]] | None = None,
             name: str = "shards", first: int = 0) -> tuple:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        captions, entries, index = [], [], first
        for s, size in enumerate(sizes):
            samples = []
            for _ in range(size):
                samples.append(good_sample(index))
                captions.append(f"sample{index}")
                index += 1
            samples += (bad or {}).get(s, [])
            path = str(folder / f"{s:05d}.tar")
            write_tar(path, samples)
            entries.append((os.path.basename(path), len(samples), os.path.getsize(path)))
        if manifest:
            write_manifest(str(folder), entries)
        pattern = str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")
        return pattern, captions

    return make


@pytest.fixture(scope="session")
def tokenizer():
    return get_tokenizer(context_length=16)


@pytest.fixture(scope="session")
def captions_of(tokenizer) -> Callable:
    """Decode a token batch back to its captions without spaces ("sample17"; how tests identify samples).

    CLIP's tokenizer splits numbers into digits, so decoding gives "sample 1 7": spaces are dropped.
    """
    return lambda tokens: [tokenizer.decode(row).replace(" ", "") for row in tokens]
