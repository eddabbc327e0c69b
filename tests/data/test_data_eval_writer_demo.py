"""Eval loader, the shard writer CLI, and the built-in demo dataset."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
from data_helpers import image_bytes
from PIL import Image

from clip_train.data import DataConfig, build_eval_loader, build_train_loader
from clip_train.data.make_shards import main as make_shards_main


def test_eval_loader_reads_every_sample_once_over_ranks_and_workers(make_shards, tokenizer, captions_of):
    pattern, captions = make_shards([5, 4, 3])  # fewer shards than the 4 workers: shards are sliced
    seen = []
    for rank in range(2):
        cfg = DataConfig(val_shards=pattern, num_workers=2, batch_size=2)
        for batch in build_eval_loader(cfg, 16, tokenizer, rank=rank, world_size=2):
            assert batch.images.shape[1:] == (3, 16, 16) and (batch.labels == -1).all()
            seen += captions_of(batch.tokens)
    assert Counter(seen) == Counter(captions)


def _image_folder(root, n):
    os.makedirs(root / "sub", exist_ok=True)
    for i in range(n):
        folder = root / "sub" if i % 2 else root
        (folder / f"img{i}.png").write_bytes(image_bytes(i, (30, 20)))
        if i != n - 1:  # the last image has no caption file
            (folder / f"img{i}.txt").write_text(f"caption number {i}\n")


def _read_tars(folder):
    samples = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            with tarfile.open(folder / name) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_make_shards_from_a_folder_round_trips(tmp_path, capsys):
    _image_folder(tmp_path / "photos", 7)
    out = tmp_path / "shards"
    assert make_shards_main([str(tmp_path / "photos"), str(out), "--samples-per-shard", "4", "--no-progress"]) == 0
    manifest = json.loads((out / "shards.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 2] and manifest["total_samples"] == 6
    samples = _read_tars(out)
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    for i in range(6):
        rel = f"sub/img{i}.png" if i % 2 else f"img{i}.png"
        assert by_source[rel]["txt"].decode() == f"caption number {i}"
        assert by_source[rel]["png"] == image_bytes(i, (30, 20))  # untouched bytes
    printed = capsys.readouterr().out
    assert "1 no caption" in printed and "data.train_shards=" in printed


def test_make_shards_converts_other_image_formats_to_png_and_counts_every_captioned_file(tmp_path, capsys, tokenizer):
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.arange(24 * 18 * 3, dtype=np.uint8).reshape(18, 24, 3)
    Image.fromarray(pixels).save(photos / "scan.tif")
    Image.fromarray(pixels).save(photos / "paint.BMP")
    Image.fromarray(pixels[..., 0]).save(photos / "grey.tiff")
    Image.fromarray(pixels).convert("P").save(photos / "anim.gif")
    (photos / "notes.md").write_text("# not an image")
    (photos / "stats.json").write_text("{}")  # img2dataset writes KEY.json beside KEY.jpg and KEY.txt
    for stem in ("scan", "paint", "grey", "anim", "notes", "stats"):
        (photos / f"{stem}.txt").write_text(f"a picture called {stem}")
    out = tmp_path / "shards"
    assert make_shards_main([str(photos), str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "skipped: 1 unreadable image" in printed, printed  # notes.md: tried, since it has a caption
    assert "converted to PNG: " in printed and "2 TIFF" in printed and "1 BMP" in printed and "1 GIF" in printed
    samples = {json.loads(s["json"])["source"]: s for s in _read_tars(out).values()}
    assert sorted(samples) == ["anim.gif", "grey.tiff", "paint.BMP", "scan.tif"]
    for name, sample in samples.items():
        assert set(sample) == {"png", "txt", "json"}
        stored = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        assert np.array_equal(stored, np.asarray(Image.open(photos / name).convert("RGB"))), name  # lossless
    loader = build_train_loader(DataConfig(train_shards=str(out / "00000.tar"), num_workers=0, batch_size=4,
                                           resampled=False), 16, tokenizer)
    assert next(iter(loader))[0].shape == (4, 3, 16, 16)
    # Downscaled on the way (--max-size), a TIFF is still counted under its own format.
    assert make_shards_main([str(photos), str(tmp_path / "small"), "--max-size", "10", "--no-progress"]) == 0
    assert "2 TIFF" in capsys.readouterr().out


def test_make_shards_from_csv_and_parquet_with_resize(tmp_path, tokenizer):
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = []
    for i in range(5):
        Image.fromarray(np.full((300, 400, 3), i * 40, np.uint8)).save(photos / f"{i}.jpg", quality=90)
        rows.append({"path": f"photos/{i}.jpg", "caption": f"grey level {i}"})
    rows.append({"path": "photos/missing.jpg", "caption": "gone"})
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    for table in ("pairs.csv", "pairs.parquet"):
        out = tmp_path / f"out_{table}"
        assert make_shards_main([str(tmp_path / table), str(out), "--max-size", "100", "--no-progress"]) == 0
        samples = _read_tars(out)
        assert len(samples) == 5
        for sample in samples.values():
            assert min(Image.open(io.BytesIO(sample["jpg"])).size) == 100
        loader = build_train_loader(DataConfig(train_shards=str(out / "00000.tar"), num_workers=0, batch_size=5,
                                               resampled=False), 16, tokenizer)
        assert len(loader) == 1 and next(iter(loader))[0].shape == (5, 3, 16, 16)


def test_make_shards_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("a,b\nx,y\n")
    assert make_shards_main([str(tmp_path / "t.csv"), str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--image-col" in err and "\n" not in err
    assert make_shards_main([str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_dataset_builds_once_into_the_cache_and_loads(tmp_path, monkeypatch, tokenizer, captions_of):
    from clip_train.data.demo import ensure_demo_data, load_classnames

    monkeypatch.setenv("CLIP_TRAIN_CACHE", str(tmp_path / "cache"))
    demo = ensure_demo_data()
    assert demo.root.startswith(str(tmp_path / "cache"))
    stamp = os.path.getmtime(demo.classnames)
    assert ensure_demo_data().train_shards == demo.train_shards
    assert os.path.getmtime(demo.classnames) == stamp  # second call reuses the cache
    classnames, templates = load_classnames(demo.classnames)
    assert classnames[7] == "seven" and all("{}" in t for t in templates)

    loader = build_train_loader(DataConfig(train_shards="demo", num_workers=0, batch_size=64, resampled=False),
                                32, tokenizer)
    images, tokens = next(iter(loader))
    assert images.shape == (64, 3, 32, 32) and len(loader) == 4 * 1498 // 64
    assert len(set(captions_of(tokens))) > 20  # varied templates, not one caption per class
    labels = Counter()
    for batch in build_eval_loader(DataConfig(val_shards="demo", num_workers=0, batch_size=100), 32, tokenizer):
        labels.update(batch.labels.tolist())
    assert sorted(labels) == list(range(10)) and sum(labels.values()) == 299


def test_make_shards_from_tsv_splits_by_size_and_the_loader_counts_from_the_manifest(tmp_path, tokenizer,
                                                                                     captions_of):
    photos = tmp_path / "photos"
    photos.mkdir()
    with open(tmp_path / "pairs.tsv", "w") as f:
        f.write("url\ttext\n")
        for i in range(6):
            (photos / f"{i}.png").write_bytes(image_bytes(i, (200, 150)))  # ~90 KB of noise each
            f.write(f"photos/{i}.png\tnoise image {i}\n")
    out = tmp_path / "shards"
    assert make_shards_main([str(tmp_path / "pairs.tsv"), str(out), "--image-col", "url", "--max-shard-mb", "0.2",
                             "--no-progress"]) == 0
    manifest = json.loads((out / "shards.json").read_text())
    sizes = [s["num_samples"] for s in manifest["shards"]]
    assert len(sizes) > 1 and sum(sizes) == 6  # a new shard whenever the next image would pass 0.2 MB
    assert all(s["bytes"] < 0.2e6 + 120_000 for s in manifest["shards"])  # at most one image over
    pattern = str(out / f"{{00000..{len(sizes) - 1:05d}}}.tar")
    loader = build_train_loader(DataConfig(train_shards=pattern, num_workers=0, batch_size=2, resampled=False),
                                16, tokenizer)
    assert len(loader) == 3
    assert sorted(c for _, t in loader for c in captions_of(t)) == sorted(f"noiseimage{i}" for i in range(6))


def test_demo_command_writes_loadable_shards_and_refuses_a_full_folder(tmp_path, capsys, tokenizer):
    from clip_train.data.demo import load_classnames
    from clip_train.data.demo import main as demo_main

    out = tmp_path / "demo"
    assert demo_main([str(out)]) == 0
    printed = capsys.readouterr().out
    train = next(line for line in printed.splitlines() if line.startswith("train:")).split("=", 1)[1].strip("'")
    loader = build_train_loader(DataConfig(train_shards=train, num_workers=0, batch_size=32, resampled=False),
                                32, tokenizer)
    images, _ = next(iter(loader))
    assert images.shape == (32, 3, 32, 32)
    classnames, _ = load_classnames(str(out))
    assert classnames[:3] == ["zero", "one", "two"]
    assert demo_main([str(out)]) == 2 and "not empty" in capsys.readouterr().err
