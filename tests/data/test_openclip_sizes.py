"""Shards prepared for OpenCLIP: its ``sizes.json`` and ``__len__`` give epoch mode its length, as they give
OpenCLIP's own loader (``open_clip_train.data.get_dataset_size`` is the reference)."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from open_clip_train.data import get_dataset_size

from clip_train.data import DataConfig, build_train_loader
from clip_train.data.manifest import sample_counts


def _epoch_loader(pattern: str, tokenizer, **kw):
    cfg = DataConfig(train_shards=pattern, resampled=False, batch_size=2, num_workers=2, shuffle_buffer=4, **kw)
    return build_train_loader(cfg, 16, tokenizer)


def test_sizes_json_gives_the_counts_openclip_reads_and_an_epoch_sees_every_sample_once(make_shards, tokenizer,
                                                                                        captions_of):
    pattern, captions = make_shards([6, 4, 5], manifest=False)
    folder = os.path.dirname(pattern)
    with open(os.path.join(folder, "sizes.json"), "w") as f:
        json.dump({"00000.tar": 6, "00001.tar": 4, "00002.tar": 5}, f)

    assert sample_counts([f"{folder}/{i:05d}.tar" for i in range(3)]) == [6, 4, 5]
    assert get_dataset_size(pattern) == (15, 3)
    loader = _epoch_loader(pattern, tokenizer)
    assert len(loader) == 15 // 2
    seen = Counter(c for _, tokens in loader for c in captions_of(tokens))
    assert len(seen) == 14 and set(seen) <= set(captions) and max(seen.values()) == 1


def test_sizes_json_elsewhere_is_a_manifest(make_shards, tokenizer, tmp_path):
    pattern, _ = make_shards([6, 6], manifest=False)
    sizes = tmp_path / "meta" / "sizes.json"
    sizes.parent.mkdir()
    sizes.write_text(json.dumps({"00000.tar": "6", "00001.tar": "6"}))  # OpenCLIP casts with int()
    assert len(_epoch_loader(pattern, tokenizer, manifest=str(sizes))) == 6


def test_openclips_len_file_alone_sets_the_epoch_length(make_shards, tokenizer):
    pattern, _ = make_shards([6, 6], manifest=False)
    len_file = os.path.join(os.path.dirname(pattern), "__len__")
    with open(len_file, "w") as f:
        f.write("10\n")
    assert get_dataset_size(pattern) == (10, 2)
    loader = _epoch_loader(pattern, tokenizer)
    assert len(loader) == 5 and sum(1 for _ in loader) == 5
    # data.epoch_samples, set by hand, wins over the file
    assert len(_epoch_loader(pattern, tokenizer, epoch_samples=4)) == 2

    with open(len_file, "w") as f:
        f.write("ten thousand")
    with pytest.raises(ValueError, match=r"__len__ \(OpenCLIP's dataset size: one integer\)") as info:
        _epoch_loader(pattern, tokenizer)
    assert "\n" not in str(info.value)


def test_a_shards_json_beside_a_sizes_json_wins_and_a_broken_sizes_json_is_named(make_shards, tokenizer):
    pattern, _ = make_shards([6, 4])  # with shards.json
    folder = os.path.dirname(pattern)
    with open(os.path.join(folder, "sizes.json"), "w") as f:
        json.dump({"00000.tar": 100, "00001.tar": 100}, f)
    assert sample_counts([f"{folder}/00000.tar", f"{folder}/00001.tar"]) == [6, 4]

    os.remove(os.path.join(folder, "shards.json"))
    with open(os.path.join(folder, "sizes.json"), "w") as f:
        f.write("[6, 4]")
    with pytest.raises(ValueError, match="sizes.json") as info:
        _epoch_loader(pattern, tokenizer)
    assert "\n" not in str(info.value)
