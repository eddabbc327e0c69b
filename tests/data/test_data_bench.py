"""The data benchmark CLI runs end to end on a few synthetic samples and ends with a JSON line."""

from __future__ import annotations

import json

import pytest

from clip_train.bench.data import main


@pytest.mark.parametrize("baseline", [None, pytest.param("open_clip", marks=pytest.mark.slow)])  # import ~10 s
def test_bench_prints_samples_per_second_as_the_last_json_line(tmp_path, capsys, baseline):
    if baseline:
        pytest.importorskip("open_clip")
    args = ["--synthetic", str(tmp_path / "shards"), "--synthetic-samples", "6", "--batches", "2", "--warmup", "1",
            "--batch-size", "3", "--image-size", "32", "--shuffle-buffer", "4"]
    assert main(args + (["--baseline", baseline] if baseline else [])) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pipeline"] == (baseline or "clip_train") and result["samples_per_s"] > 0
    assert {"machine", "date", "command"} <= set(result)


def test_bench_without_shards_is_a_one_line_error(capsys):
    assert main(["--batches", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: give a shard PATTERN or --synthetic DIR"
    assert main(["/nowhere/{0..3}.tar"]) == 2
    err = capsys.readouterr().err.strip()
    assert "matched no files" in err and "\n" not in err
