"""A shard with a 1 MB one-word caption trains to the end: tokenising it costs what a short caption does."""

from __future__ import annotations

import random
from pathlib import Path

from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli
from tests.data.data_helpers import good_sample, write_tar


def test_a_one_megabyte_one_word_caption_trains_to_the_end(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = random.Random(0)
    huge = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1_000_000)).encode()
    samples = [good_sample(i) for i in range(16)]
    for i in range(0, 16, 4):  # every fourth sample's caption is the 1 MB word
        samples[i]["txt"] = huge
    write_tar(str(shards / "00000.tar"), samples)
    run_dir = tmp_path / "run"
    result = run_cli([*FAST_DEMO, f"data.train_shards={shards}/00000.tar", "data.batch_size=8",
                      "train.max_steps=4", "ckpt.every_n_steps=0", f"hydra.run.dir={run_dir}"],
                     tmp_path / "cache", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert steps[-1]["skipped_samples"] == 0  # the long caption is used (its head), not dropped
