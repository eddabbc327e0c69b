"""Real-world shard folders: each odd case gives one line that names the shard or file and what to do, or is
skipped like bad data elsewhere (issue 15, item 6)."""

from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import good_sample, write_tar

from clip_train.data import DataConfig, build_eval_loader, build_train_loader, resolve_sources


def _img2dataset_folder(root, sizes=(10, 8, 6)):
    """img2dataset's layout: NAME.tar with NAME_stats.json and NAME.parquet, no shards.json."""
    root.mkdir()
    for s, size in enumerate(sizes):
        write_tar(str(root / f"{s:05d}.tar"), [good_sample(100 * s + i) for i in range(size)])
    return root


def test_an_img2dataset_shard_without_stats_is_counted_from_its_tar_and_named(tmp_path, caplog):
    root = _img2dataset_folder(tmp_path / "laion")
    (root / "00000_stats.json").write_text(json.dumps({"count": 12, "successes": 10, "failed_to_download": 2}))
    statuses = ["success"] * 8 + ["failed_to_download"] * 3  # 00001 has only its parquet
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(11)], "status": statuses}), root / "00001.parquet")
    # 00002 has neither: its download was interrupted before img2dataset wrote them.
    cfg = DataConfig(train_shards=str(root / "{00000..00002}.tar"), batch_size=4, num_workers=0,
                     resampled=False, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        loader = build_train_loader(cfg, 16)
    assert len(loader) == (10 + 8 + 6) // 4
    warnings = [r.getMessage() for r in caplog.records if "no sample count" in r.getMessage()]
    assert len(warnings) == 1
    assert "00002.tar (6 samples)" in warnings[0] and "1 from _stats.json, 1 from .parquet" in warnings[0]
    assert str(root) in warnings[0] and "\n" not in warnings[0]
    assert sum(tokens.shape[0] for _, tokens in loader) == 24  # every sample once, the counted shard included


def test_without_any_counts_epoch_mode_still_asks_for_a_manifest(tmp_path):
    root = _img2dataset_folder(tmp_path / "laion")
    cfg = DataConfig(train_shards=str(root), batch_size=4, num_workers=0, resampled=False)
    with pytest.raises(ValueError, match="data.epoch_samples"):
        build_train_loader(cfg, 16)


@pytest.mark.parametrize("empty", [b"", "no members"])
def test_an_empty_first_shard_is_skipped_not_refused(tmp_path, empty, tokenizer):
    root = tmp_path / "shards"
    root.mkdir()
    if empty == b"":
        (root / "00000.tar").write_bytes(b"")
    else:
        write_tar(str(root / "00000.tar"), [])
    write_tar(str(root / "00001.tar"), [good_sample(i) for i in range(8)])
    loader = build_train_loader(DataConfig(train_shards=str(root / "{00000..00001}.tar"), batch_size=4,
                                           num_workers=0, shuffle_buffer=0), 16, tokenizer)
    batches = iter(loader)
    assert next(batches)[1].shape[0] == 4 and next(batches)[1].shape[0] == 4


def test_a_directory_named_like_a_tar_is_reported_as_a_directory(tmp_path, caplog):
    (tmp_path / "x.tar").mkdir()
    with pytest.raises(ValueError, match=r"x\.tar is a directory, not a tar file") as err:
        resolve_sources(str(tmp_path / "x.tar"))
    assert "\n" not in str(err.value) and "matched no" not in str(err.value)
    write_tar(str(tmp_path / "y.tar"), [good_sample(0)])
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        (source,) = resolve_sources(str(tmp_path / "{x,y}.tar"))
    assert source.urls == (str(tmp_path / "y.tar"),)
    assert "directories, not tar files" in caplog.text and "x.tar" in caplog.text
    assert "do not exist" not in caplog.text


def test_an_explicit_list_of_shards_does_not_hint_at_shell_expansion(make_shards, caplog):
    pattern, _ = make_shards([2, 2, 2, 2])
    folder = os.path.dirname(pattern)
    shards = [os.path.join(folder, f"{s:05d}.tar") for s in (0, 2)]
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        (source,) = resolve_sources(shards)
        resolve_sources([{"shards": [shards[0]], "weight": 1.0}, {"shards": [shards[1]], "weight": 2.0}])
    assert source.urls == tuple(shards)
    assert "numbered shards" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        resolve_sources(shards[0])  # one string naming one numbered shard: what the shell leaves of braces
    assert "4 numbered shards" in caplog.text


def test_a_folder_of_shards_is_accepted_for_training_and_eval(make_shards, tokenizer):
    pattern, _ = make_shards([6, 6])
    folder = os.path.dirname(pattern)
    train = build_train_loader(DataConfig(train_shards=folder, batch_size=4, num_workers=0, resampled=False),
                               16, tokenizer)
    assert len(train) == 3
    evaluated = build_eval_loader(DataConfig(val_shards=folder, batch_size=5, num_workers=0), 16, tokenizer)
    assert sum(batch.images.shape[0] for batch in evaluated) == 12
