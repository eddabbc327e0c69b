"""Shards in an S3 bucket (a real moto server on 127.0.0.1): listing, epoch counts from the bucket, training,
exact resume and evaluation from it, and one clear line or a counted skip for each way a bucket fails."""

from __future__ import annotations

import json
import logging
import shutil

import boto3
import pytest
from data_helpers import good_sample, write_tar
from net_helpers import dropping_proxy, moto_s3

from clip_train.data import DataConfig, build_train_loader, resolve_sources
from clip_train.data.decode import SkipCounter
from clip_train.data.plan import Unit
from clip_train.data.reader import read_unit
from clip_train.data.remote import RemoteOptions
from clip_train.train import checkpoint as ckpt
from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli, train_losses

BUCKET = "shards"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A moto S3 server with ``s3://shards/train/0000{0,1,2}.tar`` (+ shards.json), the same shards with
    img2dataset stats under ``i2d/`` (one stats file missing), and labelled shards under ``val/``."""
    from clip_train.data.manifest import write_manifest

    local = tmp_path_factory.mktemp("local")
    with moto_s3() as endpoint:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        entries = []
        for s, size in enumerate((20, 12, 16)):
            path = local / f"{s:05d}.tar"
            write_tar(str(path), [good_sample(100 * s + i) for i in range(size)])
            entries.append((path.name, size, path.stat().st_size))
            s3.upload_file(str(path), BUCKET, f"train/{path.name}")
            s3.upload_file(str(path), BUCKET, f"i2d/{path.name}")
            if s != 1:  # 00001_stats.json is missing: an interrupted img2dataset download
                s3.put_object(Bucket=BUCKET, Key=f"i2d/{s:05d}_stats.json",
                              Body=json.dumps({"count": size + 3, "successes": size}).encode())
        write_manifest(str(local), entries)
        s3.upload_file(str(local / "shards.json"), BUCKET, "train/shards.json")
        val = local / "val"
        val.mkdir()
        for s in range(2):
            samples = [dict(good_sample(500 + 10 * s + i), cls=str(i % 2).encode()) for i in range(6)]
            write_tar(str(val / f"{s:05d}.tar"), samples)
            s3.upload_file(str(val / f"{s:05d}.tar"), BUCKET, f"val/{s:05d}.tar")
        yield {"endpoint": endpoint, "local": local, "s3": s3}


def test_brace_glob_and_folder_prefix_list_the_bucket(store) -> None:
    expected = [f"s3://{BUCKET}/train/{s:05d}.tar" for s in range(3)]
    for spec in (f"s3://{BUCKET}/train/{{00000..00002}}.tar", f"s3://{BUCKET}/train/*.tar",
                 f"s3://{BUCKET}/train", f"s3://{BUCKET}/train/"):
        assert list(resolve_sources(spec)[0].urls) == expected, spec


def test_epoch_length_comes_from_the_manifest_or_img2dataset_stats_in_the_bucket(store, caplog) -> None:
    cfg = DataConfig(train_shards=f"s3://{BUCKET}/train/{{00000..00002}}.tar", batch_size=8, num_workers=0,
                     resampled=False, shuffle_buffer=0)
    assert len(build_train_loader(cfg, 16, seed=0)) == 48 // 8
    # img2dataset layout: counts from _stats.json; the shard without one is counted from its tar and named.
    cfg.train_shards = f"s3://{BUCKET}/i2d/{{00000..00002}}.tar"
    with caplog.at_level(logging.WARNING, logger="clip_train.data.manifest"):
        loader = build_train_loader(cfg, 16, seed=0)
    assert len(loader) == 48 // 8
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "00001.tar (12 samples)" in warning and "2 from _stats.json" in warning
    # Exactly once per epoch, straight from the bucket.
    seen = [row for _, tokens in loader for row in tokens.tolist()]
    assert len(seen) == 48 and len({tuple(r) for r in seen}) == 48


def test_one_clear_line_for_a_missing_bucket_and_missing_keys(store) -> None:
    with pytest.raises(ValueError, match="bucket 'nobucket' does not exist") as err:
        resolve_sources("s3://nobucket/train/{00000..00002}.tar")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="matched no objects") as err:
        resolve_sources(f"s3://{BUCKET}/train/{{00010..00012}}.tar")
    assert "\n" not in str(err.value)
    # Some keys missing among existing ones: left out with a warning, the run goes on.
    assert len(resolve_sources(f"s3://{BUCKET}/train/{{00000..00004}}.tar")[0].urls) == 3


def _read(url: str, options: RemoteOptions) -> tuple[list, SkipCounter]:
    counter = SkipCounter(where="test")
    return list(read_unit(Unit(url), counter.tar_error_handler(url), options)), counter


def test_a_key_gone_while_training_is_a_counted_skip(store, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        samples, counter = _read(f"s3://{BUCKET}/train/00009.tar", RemoteOptions(retries=1, retry_backoff_s=0.01))
    assert samples == [] and counter.shards == 1 and counter.count == 0
    assert "abandoned shard s3://shards/train/00009.tar" in caplog.text and "no object" in caplog.text


def test_a_dropped_connection_resumes_at_the_byte_reached_or_is_a_counted_skip(store, monkeypatch) -> None:
    upstream = int(store["endpoint"].rsplit(":", 1)[1])
    drops: list[bytes] = []

    def drop_first_get(request: bytes) -> bool:
        if b"GET /shards/train/00000.tar" in request and not drops:
            drops.append(request)
            return True
        return False

    options = RemoteOptions(read_timeout_s=5, retries=2, retry_backoff_s=0.01)
    with dropping_proxy(upstream, 3000, drop_first_get) as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        samples, counter = _read(f"s3://{BUCKET}/train/00000.tar", options)
    assert drops, "the proxy must have cut the first transfer"
    assert len(samples) == 20 and counter.shards == 0 and counter.count == 0  # resumed with a Range request
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(20)]

    # Every connection dropped before a byte arrives: the tries run out and the shard is one counted skip.
    with dropping_proxy(upstream, 0, lambda request: b"GET /shards/train/00000.tar" in request) as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        samples, counter = _read(f"s3://{BUCKET}/train/00000.tar", options)
    assert samples == [] and counter.shards == 1 and counter.count == 0
    assert "gave up after 3 tries" in counter.last_shard_error


def test_train_resume_and_evaluate_from_the_bucket(store, tmp_path) -> None:
    from clip_train.eval.__main__ import main as eval_main

    cache = tmp_path / "cache"
    args = [*FAST_DEMO, f"data.train_shards='s3://{BUCKET}/train/{{00000..00002}}.tar'", "data.batch_size=8",
            "data.resampled=false", "train.max_steps=4", "ckpt.every_n_steps=2", "ckpt.keep_last=0"]
    full = tmp_path / "full"
    result = run_cli([*args, f"hydra.run.dir={full}"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = train_losses(full)
    assert sorted(reference) == [1, 2, 3, 4]
    assert all(m["skipped_shards"] == 0 for m in read_metrics(full) if "loss" in m)

    # As if it had died after step 2: resumes in the middle of the epoch, straight from the bucket.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, symlinks=True)
    shutil.rmtree(resumed / "checkpoints" / ckpt.step_dir_name(4))
    (resumed / "checkpoints" / "latest").unlink()
    (resumed / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (resumed / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("step", 0) <= 2))
    result = run_cli([*args, f"hydra.run.dir={resumed}"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr + result.stdout
    assert train_losses(resumed) == reference

    # Evaluation reads the bucket like local shards: the same numbers as on a local copy.
    labels = store["local"] / "names.txt"
    labels.write_text("zero\none\n")
    common = ["zeroshot", "--checkpoint", str(full), "--classnames", str(labels), "--templates", "simple",
              "--batch-size", "4", "--num-workers", "0", "--no-progress"]
    out_s3, out_local = tmp_path / "s3.json", tmp_path / "local.json"
    assert eval_main([*common, "--data", f"s3://{BUCKET}/val/{{00000..00001}}.tar", "--output", str(out_s3)]) == 0
    local = str(store["local"] / "val" / "{00000..00001}.tar")
    assert eval_main([*common, "--data", local, "--output", str(out_local)]) == 0
    from_s3, from_disk = json.loads(out_s3.read_text()), json.loads(out_local.read_text())
    assert from_s3["samples"] == 12
    assert from_s3["top1"] == from_disk["top1"] and from_s3["per_class_top1"] == from_disk["per_class_top1"]


def test_gs_shards_without_gcsfs_are_one_line_naming_the_package() -> None:
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ValueError, match=r"gs:// shards need the gcsfs package: pip install gcsfs") as err:
        resolve_sources("gs://bucket/laion/{00000..00009}.tar")
    assert "\n" not in str(err.value)
