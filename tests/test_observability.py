"""Seeing inside a run: the step-time breakdown, TensorBoard, profiler traces, the report's time plot, bench.gpu.

The breakdown tests build the real Trainer in this process (tiny model, built-in digits, a few steps) so that
a loader can be slowed on purpose; the rest run ``python -m clip_train`` the way users do.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clip_train.train.timing import EtaEstimator, StepTimer, scheduled_between
from tests.cli_helpers import FAST_DEMO, REPO, cli_env, kill_process_tree, process_tree, read_metrics

REGIONS = ("data", "forward", "loss", "backward", "optimizer")
TIME_KEYS = ("train_s", "step_s", "data_wait_s", "data_wait_max_s", "data_wait_min_s", "compute_s",
             "forward_backward_s", "optimizer_s", "comm_s", "other_s", "eval_s", "checkpoint_s", "eta_s",
             "peak_mem_gib")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _config_dir() -> Path:
    for candidate in (REPO / "configs", REPO / "clip_train" / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError("no configs/train.yaml in the repository")


def _trainer(run_dir: Path, cache_dir: Path, monkeypatch, overrides: list[str]):
    """The Trainer of ``python -m clip_train +experiment=demo ...`` built in this process (one CPU rank)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from clip_train.config import register_configs, validate
    from clip_train.train.distributed import init_distributed
    from clip_train.train.trainer import Trainer

    monkeypatch.setenv("CLIP_TRAIN_CACHE", str(cache_dir))
    register_configs()
    with initialize_config_dir(config_dir=str(_config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*FAST_DEMO, "data.batch_size=16", *overrides])
    typed = OmegaConf.to_object(cfg)
    validate(typed, 1, "cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(typed, run_dir, init_distributed("cpu"), resolved_config=OmegaConf.to_container(cfg))


class SlowLoader:
    """The real loader, with ``delay`` seconds of extra wait before each batch (a slow file system)."""

    def __init__(self, loader, delay: float) -> None:
        self._loader, self.delay = loader, delay

    def __iter__(self):
        for batch in self._loader:
            time.sleep(self.delay)
            yield batch

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _train_lines(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run_dir) if "loss" in m}


def test_step_time_keys_add_up_and_data_wait_grows_with_a_slow_loader(tmp_path, cache_dir, monkeypatch):
    delay = 0.3
    runs = {}
    for name, slow in (("fast", False), ("slow", True)):
        trainer = _trainer(tmp_path / name, cache_dir, monkeypatch,
                           ["train.max_steps=4", "train.log_every_n_steps=2", "ckpt.every_n_steps=0"])
        if slow:
            trainer.loader = SlowLoader(trainer.loader, delay)
        trainer.train()
        runs[name] = _train_lines(tmp_path / name)
    for lines in runs.values():
        assert sorted(lines) == [2, 4]
        for step, line in lines.items():
            for key in TIME_KEYS:
                assert math.isfinite(line[key]) and line[key] >= 0, (step, key, line[key])
            # One rank: its data wait is the max and the min; on a CPU the parts add up to the window.
            assert line["data_wait_max_s"] == line["data_wait_min_s"] == line["data_wait_s"]
            parts = sum(line[k] for k in ("data_wait_s", "forward_backward_s", "optimizer_s", "comm_s", "other_s"))
            assert parts == pytest.approx(line["train_s"], rel=1e-6)
            assert line["compute_s"] == pytest.approx(line["train_s"] - line["data_wait_s"])
            assert line["samples_per_s"] == pytest.approx(2 * 16 / line["train_s"])
            assert line["step_s"] == pytest.approx(line["train_s"] / 2)
            assert line["forward_backward_s"] > 0 and line["optimizer_s"] > 0
            assert line["comm_s"] < 0.05  # one process: nothing is gathered
            assert line["eval_s"] == 0 and line["checkpoint_s"] == 0
            assert 0.01 < line["peak_mem_gib"] < 64  # this process's peak resident set
        assert lines[4]["eta_s"] == 0 and lines[2]["eta_s"] > 0
    # The slow loader's wait is in data_wait_s and nowhere else.
    slow, fast = runs["slow"][4], runs["fast"][4]
    assert slow["data_wait_s"] >= 2 * delay
    assert slow["data_wait_fraction"] > fast["data_wait_fraction"]
    assert slow["data_wait_s"] - fast["data_wait_s"] > 1.5 * delay
    assert slow["forward_backward_s"] < 2 * delay  # the sleep did not land in the compute keys


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, cache_dir) -> Path:
    """8 steps logged every 2, an eval and a checkpoint at 4 and 8, TensorBoard on, step 1 profiled."""
    run_dir = tmp_path_factory.mktemp("eval_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        trainer = _trainer(run_dir, cache_dir, monkeypatch, [
            "train.max_steps=8", "train.log_every_n_steps=2", "ckpt.every_n_steps=4", "eval.every_n_steps=4",
            "logger.tensorboard.enabled=true", "train.profile.steps=[1,1]",
            "eval.zeroshot=[{name: zeroshot, data: demo, classnames: demo, templates: demo, batch_size: 256}]",
        ])
        console, logger = _ConsoleLines(), logging.getLogger("clip_train")
        level = logger.level
        logger.addHandler(console)
        logger.setLevel(logging.INFO)
        try:
            trainer.train()
        finally:
            logger.removeHandler(console)
            logger.setLevel(level)
    (run_dir / "console.txt").write_text("\n".join(console.lines))
    return run_dir


class _ConsoleLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_console_line_shows_the_breakdown_peak_memory_and_an_eta(eval_run):
    console = (eval_run / "console.txt").read_text().splitlines()
    line = next(text for text in console if text.startswith("step 6/8 |"))
    assert re.search(r"\| data wait \d+% \| fwd\+bwd \d+% \| optim \d+% \| comm \d+% \| peak mem \d+\.\d\d GiB "
                     r"\| ETA \d\d:\d\d:\d\d$", line), line
    assert any(text.startswith("time in evaluations ") for text in console)


def test_eval_and_checkpoint_time_stay_out_of_the_throughput_window(eval_run):
    lines = _train_lines(eval_run)
    evals = [m for m in read_metrics(eval_run) if "zeroshot_top1" in m]
    assert [m["step"] for m in evals] == [4, 8]
    after = lines[6]  # the window that holds the evaluation and the checkpoint of step 4
    assert after["eval_s"] > 0 and after["checkpoint_s"] > 0
    for step in (2, 4, 8):
        assert lines[step]["eval_s"] == 0 and lines[step]["checkpoint_s"] == 0
    # Had the eval and checkpoint leaked into the window, each of its 2 steps would look this much slower:
    leak_per_step = (after["eval_s"] + after["checkpoint_s"]) / 2
    clean = max(lines[4]["step_s"], lines[8]["step_s"])
    assert leak_per_step > 0.5 * clean, "the eval is too cheap for this test to tell a leak from noise"
    assert after["step_s"] < clean + 0.5 * leak_per_step
    assert after["compute_s"] < lines[4]["compute_s"] + after["eval_s"] / 2
    # The ETA at step 6 counts the final evaluation and checkpoint still to come (each timed once at step 4).
    assert after["eta_s"] >= 0.99 * (after["eval_s"] + after["checkpoint_s"])


def test_eta_counts_the_evaluations_and_checkpoints_to_come():
    assert scheduled_between(0, 10, 4, 10) == 3  # 4, 8 and the final 10
    assert scheduled_between(4, 8, 4, 8) == 1
    assert scheduled_between(3, 10, 0, 10) == 1  # final only
    assert scheduled_between(10, 10, 4, 10) == 0
    eta = EtaEstimator(max_steps=100, start_step=0, eval_every=50, ckpt_every=25)
    eta.add_train(10.0)  # 10 steps in 10 s
    assert eta.eta_s(10) == pytest.approx(90.0)  # no eval or checkpoint timed yet
    eta.add("eval", 30.0)
    eta.add("checkpoint", 4.0)
    assert eta.eta_s(10) == pytest.approx(90.0 + 2 * 30.0 + 4 * 4.0)
    assert EtaEstimator(100, 0, None, 0).eta_s(100) == 0


def test_step_timer_sums_regions_per_window():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.region("forward_backward"):
            time.sleep(0.01)
        with timer.host_region("data"):
            time.sleep(0.02)
    first = timer.collect()
    assert first["forward_backward"] >= 0.03 and first["data"] >= 0.06
    assert timer.collect() == {}  # the next window starts empty


# ---------------------------------------------------------------- a real two-rank run: TensorBoard, traces, report

def _trace_names(path: Path) -> set[str]:
    trace = json.loads(path.read_text())  # valid JSON, or this raises
    return {event.get("name") for event in trace["traceEvents"]}


def test_tensorboard_event_file_holds_the_metrics_jsonl_values(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((eval_run / "tensorboard").iterdir())
    assert len(event_files) == 1 and event_files[0].name.startswith("events.out.tfevents")
    events = EventAccumulator(str(eval_run / "tensorboard"))
    events.Reload()
    expected: dict[str, dict[int, float]] = {}
    for record in read_metrics(eval_run):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                expected.setdefault(key, {})[record["step"]] = float(value)
    assert {"loss", "samples_per_s", "forward_backward_s", "eval_s", "zeroshot_top1"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, by_step in expected.items():
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx(by_step, rel=1e-6, abs=1e-30), key  # TensorBoard keeps float32


def test_profile_steps_write_a_chrome_trace_naming_the_step_regions(eval_run):
    assert sorted(p.name for p in (eval_run / "profile").iterdir()) == ["trace_steps1-1_rank0.json"]
    names = _trace_names(eval_run / "profile" / "trace_steps1-1_rank0.json")
    assert set(REGIONS) <= names


def test_sigurg_to_a_torchrun_job_profiles_every_rank_and_the_loss_communication_is_timed(tmp_path, cache_dir):
    """SIGURG to every process of a job (the torchrun agent, two ranks, their DataLoader workers), as
    ``pkill -URG -f clip_train`` does: the agent and the workers ignore it, each rank profiles its next
    ``signal_steps`` steps into its own trace; then SIGTERM stops the job as usual."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "clip_train", *FAST_DEMO, f"hydra.run.dir={run_dir}", "data.num_workers=1",
               "train.max_steps=100000", "train.log_every_n_steps=2", "ckpt.every_n_steps=0",
               "train.profile.signal_steps=2"]
    proc = subprocess.Popen(command, cwd=REPO, env=cli_env(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    profile = run_dir / "profile"
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        processes = process_tree(proc.pid)
        assert len(processes) >= 5  # the agent, 2 ranks, a DataLoader worker each
        for pid in processes:
            os.kill(pid, signal.SIGURG)
        while len(list(profile.glob("*.json"))) < 2 if profile.is_dir() else True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # a step or two more, logged after the profiled ones
        assert proc.poll() is None and set(process_tree(proc.pid)) >= set(processes), "SIGURG ended a process"
        os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to the ranks
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_process_tree(proc.pid)
            proc.wait()
    assert stderr.count("SIGURG received; profiling the next 2 steps") == 2, stderr[-3000:]
    # Each rank starts at the step it was signalled in (one may be a step later), so order them by rank.
    traces = sorted(profile.glob("*.json"), key=lambda t: t.name.rsplit("_", 1)[1])
    assert [t.name.rsplit("_", 1)[1] for t in traces] == ["rank0.json", "rank1.json"]
    for trace in traces:
        first, last = (int(n) for n in trace.name.removeprefix("trace_steps").rsplit("_", 1)[0].split("-"))
        assert last == first + 1 and first >= 2
        assert {*REGIONS, "comm"} <= _trace_names(trace), trace.name
    for line in _train_lines(run_dir).values():
        assert line["world_size"] == 2 and line["data_wait_max_rank"] in (0, 1)
        assert line["data_wait_min_s"] <= line["data_wait_s"] <= line["data_wait_max_s"]
        assert line["comm_s"] > 0  # the loss's all-gather and its backward reduce, timed apart from compute
        parts = sum(line[k] for k in ("data_wait_s", "forward_backward_s", "optimizer_s", "comm_s", "other_s"))
        assert parts == pytest.approx(line["train_s"], rel=1e-6)


def test_report_plots_where_the_time_went_and_points_at_the_trace(eval_run, capsys):
    from clip_train.report import main as report_main

    assert report_main([str(eval_run)]) == 0
    plot = eval_run / "report" / "time_breakdown.png"
    assert str(plot) in capsys.readouterr().out.split()
    data = plot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    summary = (eval_run / "report" / "summary.md").read_text()
    assert "![time_breakdown](time_breakdown.png)" in summary
    totals = _train_lines(eval_run)
    eval_total = sum(m["eval_s"] for m in totals.values())
    assert f"| evaluation | {eval_total:.4g} |" in summary
    assert f"`{(eval_run / 'profile' / 'trace_steps1-1_rank0.json').resolve()}`" in summary


def test_bench_gpu_dry_run_runs_each_entry_on_cpu_or_lists_it_as_needing_cuda(tmp_path, cache_dir, monkeypatch,
                                                                              capsys):
    from clip_train.bench import gpu

    monkeypatch.setenv("CLIP_TRAIN_CACHE", str(cache_dir))
    table = gpu.main(["--dry-run", "--out", str(tmp_path)])
    assert capsys.readouterr().out.strip().endswith(table.strip().splitlines()[-1])
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| entry", "| ---"))]
    assert len(rows) == len(gpu.ENTRIES)
    by_name = {row.split(" | ")[0].removeprefix("| "): row.split(" | ")[1] for row in rows}
    for entry in gpu.ENTRIES:
        assert by_name[entry.what] == ("ok" if entry.dry_run_on_cpu else gpu.NEEDS_CUDA), entry.name
    assert {"nccl_group", "sdpa_flash", "pinned_copies", "compile", "max_batch"} <= {
        e.name for e in gpu.ENTRIES if not e.dry_run_on_cpu}
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    train = next(r for r in saved["rows"] if r["name"].startswith("ViT-B/16 bf16 B=256 step vs"))
    assert "ms/step" in train["result"] and "speed-up" in train["result"]  # parsed from bench.train's JSON
    # A command cell pasted into a shell runs the arguments that ran: unquoted, [3,4] would be a glob that
    # a file named train.profile.steps=3 in the working directory matches.
    command = next(r for r in saved["rows"] if r["name"].startswith("CLI run on the GPU"))["command"]
    shell_dir = tmp_path / "shell"
    shell_dir.mkdir()
    (shell_dir / "train.profile.steps=3").touch()
    pasted = subprocess.run(["bash", "-c", f"printf '%s\\n' {command}"], cwd=shell_dir, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    assert pasted[:3] == ["python", "-m", "clip_train"] and "train.profile.steps=[3,4]" in pasted
    assert (tmp_path / "bench_gpu.md").read_text().strip() == table.strip()


def test_bench_gpu_without_cuda_says_so_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from clip_train.bench import gpu

    with pytest.raises(SystemExit) as stop:
        gpu.main([])
    assert stop.value.code == 2 and "--dry-run" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("steps", [[0, 2], [3, 2], [1, 2, 3], [5, 9]])
def test_a_bad_profile_window_is_one_line_naming_the_key(steps):
    from clip_train.config import ConfigError, ProfileConfig, validate_profile

    with pytest.raises(ConfigError, match=r"train\.profile\.steps=.*\[START,END\]"):
        validate_profile(ProfileConfig(steps=steps), max_steps=8)
    validate_profile(ProfileConfig(steps=[2, 8]), max_steps=8)
