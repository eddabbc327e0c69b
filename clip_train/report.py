"""``python -m clip_train.report RUN_DIR``: plots and a markdown summary of a run, from its ``metrics.jsonl``.

Writes into ``RUN_DIR/report/`` (or ``--out``): one PNG per curve that the run logged (loss, temperature,
learning rate, samples/s, evaluation metrics), a stacked plot of where each logged window's time went
(data wait, forward+backward, optimizer, communication, other, evaluation, checkpoint) and ``summary.md``
linking them, with the run's time totals and the profiler traces under ``RUN_DIR/profile/``. The plots need
matplotlib, an optional dependency (``pip install 'clip-train[report]'``); ``--no-plots`` writes the summary alone.
Given a folder of runs (a sweep's), it compares them instead (``clip_train/sweep_report.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
# (file stem, title, metric keys drawn on it, log-scale y)
TRAIN_PLOTS = (
    ("loss", "Training loss", ("loss",), False),
    ("temperature", "Softmax temperature", ("temperature",), True),
    ("lr", "Learning rate", ("lr",), False),
    ("samples_per_s", "Throughput (samples/s, global)", ("samples_per_s",), False),
)
# Evaluation metrics: anything the eval hook logs that reads as an accuracy or a recall.
EVAL_SUFFIXES = ("_top1", "_top5", "recall@1", "recall@5", "recall@10", "mean_recall")
# The parts of a logged window's wall time, bottom to top of the stacked plot (keys of the training lines).
TIME_PARTS = (
    ("data_wait_s", "data wait"),
    ("forward_backward_s", "forward+backward"),
    ("optimizer_s", "optimizer"),
    ("comm_s", "communication"),
    ("other_s", "other"),
    ("eval_s", "evaluation"),
    ("checkpoint_s", "checkpoint"),
)
PROFILE_DIR = "profile"


class ReportError(ValueError):
    """A run directory without usable metrics, or plots asked for without matplotlib."""


@dataclass
class RunMetrics:
    """Every logged value by key, as (step, value) in step order; the last line for a step wins."""

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    last: dict[str, object] = field(default_factory=dict)
    bad_lines: int = 0

    def keys_like(self, suffixes: tuple[str, ...]) -> list[str]:
        return sorted(k for k in self.series if k.endswith(suffixes))


def read_metrics(path: Path) -> RunMetrics:
    """Parse ``metrics.jsonl``; lines that are not JSON objects with a ``step`` (a torn last line) are counted
    and skipped."""
    by_key: dict[str, dict[int, float]] = {}
    out = RunMetrics()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            out.bad_lines += 1
            continue
        for key, value in record.items():
            if key == "step":
                continue
            out.last[key] = value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                by_key.setdefault(key, {})[step] = float(value)
    out.series = {key: sorted(points.items()) for key, points in by_key.items()}
    return out


def plot_curves(path: Path, title: str, curves: dict[str, list[tuple[int, float]]], log_y: bool) -> None:
    """One PNG: each curve's (step, value) points, labelled by its key."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend picked up from the session
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    if log_y and all(v > 0 for points in curves.values() for _, v in points):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_time_breakdown(path: Path, metrics: RunMetrics) -> bool:
    """Stacked bars: each logged window's seconds split into TIME_PARTS. False when the run logged none."""
    parts = [(key, label) for key, label in TIME_PARTS if key in metrics.series]
    if not parts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({step for key, _ in parts for step, _ in metrics.series[key]})
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    width = 0.8 * (min(gaps) if gaps else 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    bottom = [0.0] * len(steps)
    for key, label in parts:
        by_step = dict(metrics.series[key])
        heights = [by_step.get(step, 0.0) for step in steps]
        # Each bar ends at the step that closed its window.
        ax.bar(steps, heights, width=-width, align="edge", bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_title("Where the time went (seconds per logged window)")
    ax.set_xlabel("step (end of window)")
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _time_lines(metrics: RunMetrics) -> list[str]:
    """The run's time totals per part (sums over the logged windows) and their shares."""
    totals = [(label, sum(v for _, v in metrics.series[key])) for key, label in TIME_PARTS if key in metrics.series]
    whole = sum(total for _, total in totals)
    if not totals or whole <= 0:
        return []
    lines = ["## Where the time went", "", "| part | seconds | share |", "| --- | --- | --- |"]
    lines += [f"| {label} | {total:.4g} | {100 * total / whole:.1f}% |" for label, total in totals]
    peak = metrics.series.get("peak_mem_gib")
    if peak:
        lines.append(f"| peak memory | {max(v for _, v in peak):.3g} GiB | |")
    note = ("Sums over the logged windows (an evaluation or checkpoint after the last logged step is not in them). "
            "On a GPU the device regions are CUDA-event times and can overlap the host's data wait.")
    lines += ["", note, ""]
    return lines


def _profile_lines(run_dir: Path) -> list[str]:
    """Where the profiler traces and memory snapshots of the run are, and how to open them."""
    folder = run_dir / PROFILE_DIR
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".pickle")) if folder.is_dir() else []
    if not files:
        return []
    lines = ["## Profiler traces", ""]
    for file in files:
        kind = "memory snapshot (https://pytorch.org/memory_viz)" if file.suffix == ".pickle" else (
            "Chrome trace (https://ui.perfetto.dev or chrome://tracing)")
        lines.append(f"- `{file.resolve()}`: {kind}")
    return lines + [""]


def check_matplotlib() -> None:
    """``ReportError`` naming the extra to install when the plots cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(
            "the plots need matplotlib: pip install 'clip-train[report]' (or pass --no-plots for the summary only)"
        ) from None


def output_dir(reported: Path, out_dir: str | Path | None, plots: bool) -> Path:
    """Where a report goes (``out_dir``, else ``reported/report``), created; first, matplotlib if plots are asked for."""
    if plots:
        check_matplotlib()
    out = Path(out_dir).expanduser() if out_dir is not None else reported / "report"
    out.mkdir(parents=True, exist_ok=True)
    return out


def fmt(value: object) -> str:
    """A table cell: floats to four significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _config_lines(run_dir: Path) -> list[str]:
    """A few settings from Hydra's saved config, when the run has one."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        return []
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config)
    wanted = ("model.name", "loss.name", "optim.lr", "data.batch_size", "train.max_steps", "train.precision",
              "train.seed")
    lines = []
    for key in wanted:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            lines.append(f"| `{key}` | {fmt(value)} |")
    return ["## Configuration", "", "| key | value |", "| --- | --- |", *lines, ""] if lines else []


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, plots: bool = True) -> list[Path]:
    """Render the plots and ``summary.md`` of ``run_dir``; returns the files written (summary last)."""
    run_dir = Path(run_dir).expanduser()
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path} not found: give the run directory of a clip_train run (it holds {METRICS_FILE})")
    metrics = read_metrics(metrics_path)
    if not metrics.series:
        raise ReportError(f"{metrics_path} holds no logged steps yet")
    out = output_dir(run_dir, out_dir, plots)

    written: list[Path] = []
    if plots:
        for stem, title, keys, log_y in TRAIN_PLOTS:
            curves = {k: metrics.series[k] for k in keys if k in metrics.series}
            if curves:
                plot_curves(out / f"{stem}.png", title, curves, log_y)
                written.append(out / f"{stem}.png")
        eval_keys = metrics.keys_like(EVAL_SUFFIXES)
        if eval_keys:
            plot_curves(out / "eval.png", "Evaluation", {k: metrics.series[k] for k in eval_keys}, False)
            written.append(out / "eval.png")
        if _plot_time_breakdown(out / "time_breakdown.png", metrics):
            written.append(out / "time_breakdown.png")

    lines = [f"# Run report: `{run_dir.resolve().name}`", "", f"Run directory: `{run_dir.resolve()}`", ""]
    loss = metrics.series.get("loss", [])
    if loss:
        best_step, best = min(loss, key=lambda p: p[1])
        lines += [
            "## Training", "", "| | |", "| --- | --- |",
            f"| steps logged | {loss[0][0]} … {loss[-1][0]} ({len(loss)} lines) |",
            f"| final loss | {fmt(loss[-1][1])} |",
            f"| lowest loss | {fmt(best)} (step {best_step}) |",
        ]
        for key, label in (("temperature", "final temperature"), ("lr", "final learning rate"),
                           ("world_size", "world size"), ("global_batch_size", "global batch size"),
                           ("skipped_samples", "skipped samples")):
            if key in metrics.last:
                lines.append(f"| {label} | {fmt(metrics.last[key])} |")
        throughput = [v for _, v in metrics.series.get("samples_per_s", [])]
        if throughput:
            lines.append(f"| samples/s (median of logged windows) | {fmt(sorted(throughput)[len(throughput) // 2])} |")
        lines.append("")
    eval_keys = metrics.keys_like(EVAL_SUFFIXES)
    if eval_keys:
        lines += ["## Evaluation", "", "| metric | last | best (step) |", "| --- | --- | --- |"]
        for key in eval_keys:
            points = metrics.series[key]
            best_step, best = max(points, key=lambda p: p[1])
            lines.append(f"| `{key}` | {fmt(points[-1][1])} (step {points[-1][0]}) | {fmt(best)} ({best_step}) |")
        lines.append("")
    lines += _time_lines(metrics)
    lines += _profile_lines(run_dir)
    lines += _config_lines(run_dir)
    if written:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in written] + [""]
    if metrics.bad_lines:
        lines += [f"_{metrics.bad_lines} unreadable line(s) in {METRICS_FILE} were skipped._", ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return written + [summary]


def newest_run(parent: str | Path) -> Path:
    """The run directory under ``parent`` (e.g. Hydra's ``outputs/``) whose ``metrics.jsonl`` changed last."""
    parent = Path(parent).expanduser()
    found = [p for p in parent.rglob(METRICS_FILE) if p.is_file()] if parent.is_dir() else []
    if not found:
        raise ReportError(f"no {METRICS_FILE} under {parent}: give a run directory, or a folder of runs with --newest")
    return max(found, key=lambda p: p.stat().st_mtime).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_train.report",
                                     description="Plots and a markdown summary of a run from its metrics.jsonl, "
                                                 "or of the runs of a sweep side by side.")
    parser.add_argument("run_dir", help="the run directory (holds metrics.jsonl), or a sweep's folder of runs to "
                                        "compare them side by side")
    parser.add_argument("--newest", action="store_true",
                        help="RUN_DIR is a folder of runs (e.g. outputs): report the most recently updated one")
    parser.add_argument("--out", default=None, help="where to write (default: RUN_DIR/report)")
    parser.add_argument("--no-plots", action="store_true", help="only summary.md (no matplotlib needed)")
    args = parser.parse_args(argv)
    try:
        run_dir = newest_run(args.run_dir) if args.newest else Path(args.run_dir).expanduser()
        if run_dir.is_dir() and not (run_dir / METRICS_FILE).exists():  # a sweep's folder, or any folder of runs
            from clip_train.sweep_report import write_sweep_report as report
        else:
            report = write_report
        files = report(run_dir, args.out, plots=not args.no_plots)
    except ReportError as err:
        print(f"clip_train.report: error: {err}", file=sys.stderr)
        return 2
    for file in files:
        print(file)
    return 0


if __name__ == "__main__":
    # Run this module's canonical copy: sweep_report imports clip_train.report, and under ``python -m`` this
    # file is also ``__main__``, whose ReportError would be another class that main() cannot catch.
    from clip_train.report import main as canonical_main

    sys.exit(canonical_main())
