"""No silent stalls: a shard server that accepts connections and never answers (a real socket on 127.0.0.1)
costs a bounded time per shard, is abandoned, counted in ``skipped_shards`` and named; when every shard
stalls the run stops with one line; a loader waiting long for a batch says which shards it waits on."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from data_helpers import good_sample, write_tar
from net_helpers import moto_s3, silent_server

from clip_train.data.decode import SkipCounter
from clip_train.data.manifest import write_manifest
from clip_train.data.plan import Unit
from clip_train.data.reader import read_unit
from clip_train.data.remote import RemoteOptions
from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli

FAST_TIMEOUTS = ["data.read_timeout_s=0.5", "data.connect_timeout_s=0.5", "data.read_retries=1",
                 "data.retry_backoff_s=0.05"]


def _read(url: str, options: RemoteOptions) -> tuple[list, SkipCounter, float]:
    counter = SkipCounter(where="test")
    start = time.monotonic()
    samples = list(read_unit(Unit(url), counter.tar_error_handler(url), options))
    return samples, counter, time.monotonic() - start


def _good_shards(folder: Path, count: int = 2, size: int = 12, huge_caption: bool = False) -> str:
    """Shards of good samples; with ``huge_caption`` every fourth caption is one 1 MB word."""
    folder.mkdir()
    entries = []
    huge = "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1_000_000)).encode()
    for s in range(count):
        path = folder / f"{s:05d}.tar"
        samples = [good_sample(100 * s + i) for i in range(size)]
        for sample in samples[::4] if huge_caption else ():
            sample["txt"] = huge
        write_tar(str(path), samples)
        entries.append((path.name, size, path.stat().st_size))
    write_manifest(str(folder), entries)
    return str(folder / f"{{00000..{count - 1:05d}}}.tar")


def test_http_s3_and_pipe_reads_that_never_answer_are_abandoned_and_counted(tmp_path) -> None:
    options = RemoteOptions(connect_timeout_s=0.5, read_timeout_s=0.5, retries=1, retry_backoff_s=0.05)
    with silent_server() as port:
        samples, counter, _ = _read(f"http://127.0.0.1:{port}/00000.tar", options)
        assert samples == [] and counter.shards == 1
        assert "Read timed out" in counter.last_shard_error and "gave up after 2 tries" in counter.last_shard_error
        with moto_s3():  # credentials from the environment, the endpoint pointed at the silent server
            import os

            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
            samples, counter, _ = _read("s3://bucket/00000.tar", options)
        assert samples == [] and counter.shards == 1 and "timeout" in counter.last_shard_error.lower()
    samples, counter, _ = _read("pipe:sleep 30", options)
    assert samples == [] and counter.shards == 1 and "no output for 0.5 s" in counter.last_shard_error
    # A pipe that works is read as before.
    good = _good_shards(tmp_path / "good", 1).replace("{00000..00000}", "00000")
    samples, counter, _ = _read(f"pipe:cat {good}", options)
    assert len(samples) == 12 and counter.shards == 0


def test_training_goes_on_with_the_good_shards_when_one_stalls(tmp_path) -> None:
    """Also: a quarter of the good captions are a 1 MB word, which costs what a short caption does (before
    the tokenizer's bound, BPE on it took hours: no step would finish)."""
    good = _good_shards(tmp_path / "good", huge_caption=True)
    run_dir = tmp_path / "run"
    with silent_server() as port:
        stalled = f"http://127.0.0.1:{port}/00002.tar"
        # Epoch mode with one worker: the epoch (36 samples claimed, 24 good) makes it read the stalled shard.
        result = run_cli([*FAST_DEMO, f"data.train_shards=['{good}','{stalled}']", "data.resampled=false",
                          "data.epoch_samples=36", "data.batch_size=8", "train.max_steps=4",
                          "ckpt.every_n_steps=0", *FAST_TIMEOUTS, f"hydra.run.dir={run_dir}"],
                         tmp_path / "cache", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert steps[-1]["skipped_shards"] >= 1
    assert steps[-1]["skipped_samples"] == 0  # the 1 MB captions are used (their first tokens), not dropped
    assert f"abandoned shard {stalled}" in result.stdout + result.stderr


def test_when_every_shard_stalls_the_run_stops_with_one_line_well_within_a_minute(tmp_path) -> None:
    run_dir = tmp_path / "run"
    with silent_server() as port:
        start = time.monotonic()
        result = run_cli([*FAST_DEMO, f"data.train_shards='http://127.0.0.1:{port}/{{00000..00003}}.tar'",
                          "data.num_workers=1", "data.batch_size=8", "train.max_steps=4", "ckpt.every_n_steps=0",
                          *FAST_TIMEOUTS, "data.max_failed_shards_in_row=4", "data.stall_timeout_s=1",
                          f"hydra.run.dir={run_dir}"], tmp_path / "cache", timeout=60)
        elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "clip_train: error:" in line]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert "4 shards in a row could not be read" in errors[0] and f"127.0.0.1:{port}" in errors[0]
    # While it waited, the loader said what it was waiting on.
    waiting = [line for line in output.splitlines() if "no batch for" in line]
    assert waiting and f"http://127.0.0.1:{port}/" in waiting[0] and "worker 0 of rank 0" in waiting[0]
    print(f"stopped after {elapsed:.1f} s", file=sys.stderr)


def test_the_stall_watchdog_does_not_keep_a_finished_loader_alive(tmp_path, tokenizer) -> None:
    import gc
    import weakref

    from clip_train.data import DataConfig, build_train_loader

    pattern = _good_shards(tmp_path / "good")
    loader = build_train_loader(DataConfig(train_shards=pattern, batch_size=4, num_workers=0, stall_timeout_s=0.2),
                                16, tokenizer)
    next(iter(loader))  # starts the watchdog thread
    ref = weakref.ref(loader)
    del loader
    gc.collect()
    assert ref() is None
