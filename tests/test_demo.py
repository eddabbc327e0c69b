"""`make train`'s demo, run exactly as a user runs it: it must learn the digits well enough to classify them zero-shot."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_helpers import read_metrics, run_cli

DEMO_TARGET_TOP1 = 0.9


@pytest.mark.slow
def test_demo_reaches_its_zero_shot_accuracy(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # No overrides beyond the run dir: this is the configuration `make train` runs.
    result = run_cli(["+experiment=demo", f"hydra.run.dir={run_dir}"], tmp_path / "cache", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if "zeroshot_top1" in m]
    final = evals[-1]
    assert final["step"] == max(m["step"] for m in metrics)
    assert final["zeroshot_top1"] >= DEMO_TARGET_TOP1, evals
    # Progress is printed while it trains, and the final accuracy at the end.
    output = result.stdout + result.stderr
    assert "samples/s" in output and "ETA" in output
    assert f"final zeroshot_top1 {final['zeroshot_top1']:.4f}" in output
