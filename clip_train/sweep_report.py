"""``python -m clip_train.report SWEEP_DIR``: the runs of a sweep (or of any folder of runs), side by side.

A Hydra multirun writes one run directory per point (``multirun/DATE/TIME/0``, ``1``, ...). This report
finds every run under the folder, names each by the overrides that differ between them (the swept values),
ranks them by their final evaluation (the first ``*_top1`` metric, as the training app returns to Hydra's
sweepers; else ``mean_recall``; else the final loss) and
writes ``summary.md`` with one row per run, plus ``loss.png`` and ``eval.png`` with one curve per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clip_train.report import (
    METRICS_FILE,
    ReportError,
    RunMetrics,
    fmt,
    output_dir,
    plot_curves,
    read_metrics,
)


@dataclass
class SweepRun:
    """One run of the folder: where it is, what it was told, what it logged."""

    name: str  # its path under the sweep folder
    run_dir: Path
    overrides: dict[str, str]
    metrics: RunMetrics
    max_steps: int | None


def find_runs(folder: Path) -> list[Path]:
    """Run directories under ``folder`` (any depth), in the sweep's order: ``2`` before ``10``."""
    runs = [p.parent for p in folder.rglob(METRICS_FILE) if p.is_file() and p.parent != folder]

    def natural(path: Path) -> list[tuple[int, int, str]]:
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.relative_to(folder).parts]

    return sorted(runs, key=natural)


def _overrides(run_dir: Path) -> dict[str, str]:
    """``key -> value`` of the command-line overrides Hydra recorded for the run (Hydra's own keys left out)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    found = {}
    for override in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra"):
            found[key] = value
    return found


def _max_steps(run_dir: Path) -> int | None:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    value = OmegaConf.select(OmegaConf.load(path), "train.max_steps", default=None)
    return int(value) if isinstance(value, int) else None


def ranking_key(runs: list[SweepRun]) -> str | None:
    """The evaluation metric the runs are ranked by: the first ``*_top1`` any run logged, else ``mean_recall``."""
    logged = sorted({key for run in runs for key in run.metrics.series})
    return next((k for k in logged if k.endswith("_top1")), "mean_recall" if "mean_recall" in logged else None)


def _label(run: SweepRun, varying: list[str]) -> str:
    return ", ".join(f"{key}={run.overrides.get(key, '(default)')}" for key in varying) or run.name


def _status(run: SweepRun) -> str:
    loss = run.metrics.series.get("loss", [])
    if not loss:
        return "no steps logged"
    last = loss[-1][0]
    if run.max_steps is None:
        return f"step {last}"
    return "finished" if last >= run.max_steps else f"stopped at {last} of {run.max_steps}"


def _table(ranked: list[SweepRun], varying: list[str], metric: str | None) -> tuple[list[str], list[list[str]]]:
    """The summary's header and one row per run, in ``ranked`` order."""
    headers = ["run", *[f"`{k}`" for k in varying], "status", "final loss", "lowest loss"]
    if metric is not None:
        headers += [f"final `{metric}`", "best (step)"]
    headers.append("samples/s")
    rows = []
    for run in ranked:
        series = run.metrics.series
        loss = [v for _, v in series.get("loss", [])]
        row = [f"`{run.name}`", *[run.overrides.get(k, "(default)") for k in varying], _status(run),
               fmt(loss[-1]) if loss else "-", fmt(min(loss)) if loss else "-"]
        if metric is not None:
            points = series.get(metric, [])
            if points:
                step, best = max(points, key=lambda p: p[1])
                row += [fmt(points[-1][1]), f"{fmt(best)} ({step})"]
            else:
                row += ["-", "-"]
        throughput = sorted(v for _, v in series.get("samples_per_s", []))
        row.append(fmt(throughput[len(throughput) // 2]) if throughput else "-")
        rows.append(row)
    return headers, rows


def write_sweep_report(folder: str | Path, out_dir: str | Path | None = None, plots: bool = True) -> list[Path]:
    """Compare the runs under ``folder``; returns the files written (``summary.md`` last)."""
    folder = Path(folder).expanduser()
    run_dirs = find_runs(folder) if folder.is_dir() else []
    if not run_dirs:
        raise ReportError(f"{folder / METRICS_FILE} not found, nor any run below it: give the run directory of a "
                          f"clip_train run (it holds {METRICS_FILE}), or a sweep's folder of runs")
    runs = [SweepRun(str(d.relative_to(folder)), d, _overrides(d), read_metrics(d / METRICS_FILE), _max_steps(d))
            for d in run_dirs]
    keys = sorted({key for run in runs for key in run.overrides})
    varying = [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]
    metric = ranking_key(runs)

    def score(run: SweepRun) -> tuple[int, float]:
        """Sort key: runs with the metric first, highest final value first; then by final loss, lowest first."""
        if metric is not None and run.metrics.series.get(metric):
            return (0, -run.metrics.series[metric][-1][1])
        loss = run.metrics.series.get("loss")
        return (1, loss[-1][1]) if loss else (2, 0.0)

    ranked = sorted(runs, key=score)
    out = output_dir(folder, out_dir, plots)

    written: list[Path] = []
    if plots:
        for stem, title, key in (("loss", "Training loss", "loss"), ("eval", f"Evaluation: {metric}", metric)):
            curves = {_label(r, varying): r.metrics.series[key] for r in runs if key and r.metrics.series.get(key)}
            if curves:
                plot_curves(out / f"{stem}.png", title, curves, log_y=False)
                written.append(out / f"{stem}.png")

    headers, rows = _table(ranked, varying, metric)
    ranked_by = f"highest final `{metric}` first" if metric is not None else "lowest final loss first"
    swept = ", ".join(f"`{k}`" for k in varying) or "nothing differs"
    shared = ", ".join(f"`{k}={runs[0].overrides[k]}`" for k in keys if k not in varying)
    lines = [f"# Sweep report: `{folder.resolve().name}`", "", f"Folder: `{folder.resolve()}`", "",
             f"{len(runs)} runs, {ranked_by}. Swept: {swept}{'; shared: ' + shared if shared else ''}.", "",
             "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", f"Each run's own report: `python -m clip_train.report {folder}/RUN`.", ""]
    if written:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in written] + [""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return written + [summary]
