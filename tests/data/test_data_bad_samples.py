"""Bad input never stops a run: every kind is skipped, counted, and warned about at a limited rate."""

from __future__ import annotations

import logging

import pytest
from data_helpers import bomb_png, cut_tar, good_sample, image_bytes

from clip_train.data import DataConfig, build_eval_loader, build_train_loader
from clip_train.data.decode import SkipCounter


def _cut_in_data(jpeg: bytes) -> bytes:
    """A JPEG whose headers are whole (it opens and reports its size) but whose pixel data stops half-way."""
    from io import BytesIO

    from PIL import Image

    cut = jpeg[: len(jpeg) * 6 // 10]
    assert Image.open(BytesIO(cut)).size == (64, 64)
    return cut


BAD_KINDS = {
    "truncated image": lambda: {"jpg": good_sample(900, fmt="jpg")["jpg"][:150], "txt": b"truncated"},
    "image cut inside its data": lambda: {"jpg": _cut_in_data(image_bytes(903, (64, 64), "JPEG")), "txt": b"cut"},
    "not an image": lambda: {"png": b"<html>404 not found</html>", "txt": b"not an image"},
    "missing caption": lambda: {"png": good_sample(901)["png"]},
    "non-UTF-8 caption": lambda: {"png": good_sample(902)["png"], "txt": b"caf\xe9 \xff\xfe"},
    "decompression bomb": lambda: {"png": bomb_png(15000, 14000), "txt": b"a bomb"},
}


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_each_kind_of_bad_sample_is_skipped_and_counted(make_shards, tokenizer, captions_of, kind):
    bad = {0: [dict(BAD_KINDS[kind](), __key__=f"bad{i}") for i in range(3)]}
    pattern, captions = make_shards([4, 3], bad=bad)
    loader = build_eval_loader(DataConfig(val_shards=pattern, num_workers=0, batch_size=4), 16, tokenizer)
    seen = [c for batch in loader for c in captions_of(batch.tokens)]
    assert sorted(seen) == sorted(captions)  # all good samples, none of the bad ones
    assert loader.skipped_samples == 3


def test_a_tar_cut_short_keeps_the_samples_before_the_cut(make_shards, tokenizer, captions_of):
    pattern, captions = make_shards([4, 5])
    cut_tar(pattern.replace("{00000..00001}", "00001"))  # the last sample of shard 1 loses its caption
    loader = build_eval_loader(DataConfig(val_shards=pattern, num_workers=2, batch_size=3), 16, tokenizer)
    seen = [c for batch in loader for c in captions_of(batch.tokens)]
    assert sorted(seen) == sorted(captions[:-1])
    # Counted twice: the read error that ended the shard, and the caption-less remains of its last sample.
    assert loader.skipped_samples == 2


def test_training_over_bad_data_keeps_going_and_reports_skips(make_shards, tokenizer):
    bad = {s: [dict(make(), __key__=f"bad{s}{i}") for i, make in enumerate(BAD_KINDS.values())] for s in range(2)}
    pattern, _ = make_shards([5, 5], bad=bad)
    cut_tar(pattern.replace("{00000..00001}", "00001"))
    loader = build_train_loader(DataConfig(train_shards=pattern, num_workers=2, batch_size=4, shuffle_buffer=4),
                                16, tokenizer)
    it = iter(loader)
    for _ in range(10):  # 40 good samples out of shards that are half bad: many passes over every shard
        images, _ = next(it)
        assert images.shape[0] == 4
    assert loader.skipped_samples >= 10
    assert loader.state_dict()["skipped_samples"] == loader.skipped_samples


def test_a_stream_with_no_usable_sample_stops_with_a_clear_error(make_shards, tokenizer):
    bad = {0: [{"__key__": f"b{i}", "png": b"junk", "txt": b"junk"} for i in range(3)]}
    pattern, _ = make_shards([0], bad=bad)
    loader = build_train_loader(DataConfig(train_shards=pattern, num_workers=0, batch_size=2), 16, tokenizer)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(loader))


def test_epoch_mode_worker_whose_shards_are_all_broken_still_fills_its_quota(make_shards, tokenizer):
    broken = [{"__key__": f"x{i}", "png": b"garbage", "txt": b"garbage"} for i in range(6)]
    pattern, _ = make_shards([6, 6, 6, 0], bad={3: broken})  # one shard per worker of 2 ranks x 2 workers
    skipped = 0
    for rank in range(2):
        loader = build_train_loader(DataConfig(train_shards=pattern, num_workers=2, batch_size=2, resampled=False),
                                    16, tokenizer, rank=rank, world_size=2)
        assert sum(1 for _ in loader) == len(loader) == 24 // 4
        skipped += loader.skipped_samples
    assert skipped >= 6


def test_wrong_image_or_text_key_fails_before_training(make_shards):
    pattern, _ = make_shards([3])
    with pytest.raises(ValueError, match="data.text_key") as err:
        build_train_loader(DataConfig(train_shards=pattern, text_key="caption", num_workers=0), 16)
    assert "png" in str(err.value) and "txt" in str(err.value)


def test_warnings_are_rate_limited(caplog):
    counter = SkipCounter(interval_s=60.0, where="test")
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        for i in range(500):
            counter.skip(f"bad sample {i}")
    assert counter.count == 500
    assert len(caplog.records) == 1  # the first one; the next would come a minute later with the tally


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    from clip_train.data.decode import BadSample, SampleDecoder

    decoder = SampleDecoder(16, max_pixels=24 * 20 - 1)
    with pytest.raises(BadSample, match="max_image_pixels"):
        decoder(good_sample(1))  # a 24x20 image, one pixel over the limit: rejected from its header
    with pytest.raises(BadSample, match="decompression bomb"):
        SampleDecoder(16)({"png": bomb_png(15000, 14000), "txt": b"x"})
    assert SampleDecoder(16, max_pixels=24 * 20)(good_sample(1))[0].shape == (16, 16, 3)
