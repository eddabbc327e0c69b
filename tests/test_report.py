"""``python -m clip_train.report``: PNGs and a markdown summary from a metrics file the test writes."""

from __future__ import annotations

import builtins
import json

import pytest

from clip_train.report import main as report_main
from clip_train.report import read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, steps: int = 30, torn: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": 4.0 / step, "lr": 1e-3 * min(1.0, step / 5), "temperature": 0.07 - step * 1e-3,
                      "samples_per_s": 1000.0 + step, "skipped_samples": 0, "world_size": 2, "global_batch_size": 64})
        if step % 10 == 0:
            lines.append({"step": step, "zeroshot_top1": step / 40, "zeroshot_top5": step / 35})
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    if torn:
        text += '{"step": 31, "loss": 0.1'  # a run killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)


def test_report_renders_pngs_and_summary(tmp_path, capsys):
    _write_run(tmp_path / "run")
    assert report_main([str(tmp_path / "run")]) == 0
    report = tmp_path / "run" / "report"
    for name in ("loss", "temperature", "lr", "samples_per_s", "eval"):
        data = (report / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name
    printed = capsys.readouterr().out.split()
    assert str(report / "summary.md") in printed and str(report / "loss.png") in printed
    summary = (report / "summary.md").read_text()
    assert "| final loss | 0.1333 |" in summary
    assert "| `zeroshot_top1` | 0.75 (step 30) | 0.75 (30) |" in summary
    assert "![loss](loss.png)" in summary and "1 unreadable line(s)" in summary


def test_read_metrics_keeps_the_last_line_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 1.5}\nnot json\n')
    metrics = read_metrics(path)
    assert metrics.series["loss"] == [(1, 3.0), (2, 1.5)] and metrics.bad_lines == 1


def test_report_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert report_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err

    _write_run(tmp_path / "run", steps=3, torn=False)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert report_main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "clip-train[report]" in err and "--no-plots" in err
    files = write_report(tmp_path / "run", plots=False)  # the summary needs no matplotlib
    assert [f.name for f in files] == ["summary.md"]


@pytest.mark.parametrize("content", ["", "\n"])
def test_report_on_an_empty_metrics_file(tmp_path, capsys, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    assert report_main([str(tmp_path)]) == 2
    assert "no logged steps" in capsys.readouterr().err


def test_newest_picks_the_latest_run_under_a_folder(tmp_path, capsys):
    import os

    _write_run(tmp_path / "outputs" / "day" / "old", steps=3)
    _write_run(tmp_path / "outputs" / "day" / "new", steps=3)
    os.utime(tmp_path / "outputs" / "day" / "old" / "metrics.jsonl", (1, 1))
    assert report_main([str(tmp_path / "outputs"), "--newest", "--no-plots"]) == 0
    assert str(tmp_path / "outputs" / "day" / "new" / "report" / "summary.md") in capsys.readouterr().out
    assert report_main([str(tmp_path / "outputs" / "day" / "new" / "report"), "--newest"]) == 2


def test_module_entry_points_run(tmp_path):
    """``python -m clip_train.report`` and ``python -m clip_train.eval`` start as the docs show."""
    import subprocess
    import sys

    _write_run(tmp_path / "run", steps=3, torn=False)
    done = subprocess.run([sys.executable, "-m", "clip_train.report", str(tmp_path / "run"), "--no-plots"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("summary.md"), done.stderr
    (tmp_path / "no_runs").mkdir()  # the sweep path's error, raised in another module, is one line too
    done = subprocess.run([sys.executable, "-m", "clip_train.report", str(tmp_path / "no_runs"), "--no-plots"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "metrics.jsonl not found" in done.stderr
    done = subprocess.run([sys.executable, "-m", "clip_train.eval", "--help"], capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0 and all(t in done.stdout for t in ("zeroshot", "retrieval", "linear-probe"))


def _write_sweep_point(run_dir, overrides: list[str], top1: float, steps: int = 30, max_steps: int = 30) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / ".hydra" / "config.yaml").write_text(f"train:\n  max_steps: {max_steps}\n")
    lines = [{"step": s, "loss": 4.0 / s, "samples_per_s": 900.0 + s} for s in range(1, steps + 1)]
    lines += [{"step": steps // 2, "zeroshot_top1": top1 + 0.1}, {"step": steps, "zeroshot_top1": top1}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_sweep_folder_is_reported_side_by_side_ranked_by_its_eval(tmp_path, capsys):
    # Hydra's multirun layout: one numbered run dir per point, each with the overrides that made it.
    sweep = tmp_path / "multirun" / "2026-12-03" / "10-00-00"
    for num, (temperature, batch, top1) in enumerate([(0.1, 256, 0.31), (0.05, 256, 0.42), (0.1, 512, 0.27)]):
        _write_sweep_point(sweep / str(num), ["+experiment=vit_b32", f"loss.temperature={temperature}",
                                              f"data.batch_size={batch}", f"hydra.run.dir=/x/{num}"], top1)
    _write_sweep_point(sweep / "10", ["+experiment=vit_b32", "loss.temperature=0.02", "data.batch_size=512"], 0.05,
                       steps=12)  # preempted and not yet requeued
    assert report_main([str(sweep)]) == 0
    report = sweep / "report"
    for name in ("loss", "eval"):
        assert (report / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    summary = (report / "summary.md").read_text()
    assert "4 runs, highest final `zeroshot_top1` first. Swept: `data.batch_size`, `loss.temperature`; " \
           "shared: `experiment=vit_b32`." in summary
    rows = [line for line in summary.splitlines() if line.startswith("| `")]
    assert [row.split(" | ")[0] for row in rows] == ["| `1`", "| `0`", "| `2`", "| `10`"]
    assert rows[0].startswith("| `1` | 256 | 0.05 | finished | 0.1333 | 0.1333 | 0.42 | 0.52 (15) | 916 |"), rows[0]
    assert "| stopped at 12 of 30 |" in rows[3]
    assert "hydra" not in summary.split("## Plots")[0].replace("Hydra", "")  # hydra.run.dir is no swept value


def test_a_folder_without_runs_is_still_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl" in err
