"""The loss benchmark CLI runs end to end and ends with a JSON line that agrees with OpenCLIP's value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_train.bench import loss as bench_loss


def test_loss_benchmark_cli_reports_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs.jsonl"
    argv = ["--batch", "300", "--dim", "16", "--repeats", "1", "--impl", "tiled,open_clip",
            "--tile-size", "128", "--device", "cpu", "--out", str(out)]  # fmt: skip
    bench_loss.main(argv)  # the parent runs here; each measurement still runs in a fresh subprocess
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("[bench.loss] tiled") for line in lines[:-1])  # progress lines
    report = json.loads(lines[-1])
    assert report == json.loads(out.read_text().splitlines()[-1])
    assert (report["batch"], report["dim"], report["tile_size"]) == (300, 16, 128)
    results = {r["impl"]: r for r in report["results"]}
    assert "error" not in results["tiled"] and "error" not in results["open_clip"], results
    assert results["tiled"]["median_s"] > 0 and results["tiled"]["peak_mem_bytes"] >= 0
    # Same seeded input for both implementations, so the same loss.
    assert abs(results["tiled"]["loss_value"] - results["open_clip"]["loss_value"]) < 1e-4
    assert "time_ratio" in report["vs_open_clip"]["tiled"]


def test_unknown_implementation_is_an_error() -> None:
    with pytest.raises(SystemExit, match="unknown"):
        bench_loss.main(["--impl", "tiled,fastest"])
