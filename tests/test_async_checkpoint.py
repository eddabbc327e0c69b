"""Issue 16: ``ckpt.async_save`` checkpoints that do not stop training.

In-process: the background save writes the same bytes as a synchronous one from a host copy that later
updates do not touch, and a failed background write (a full disk) is raised on the main thread. Real
``python -m clip_train`` processes, with checkpoint writes slowed on purpose by ``tests/slow_checkpoint.py``:
training goes on during the write, a SIGKILL mid-write leaves the previous ``latest`` and the rerun resumes
from it with the same losses, SIGTERM mid-write exits 3 with both checkpoints complete, and
``ckpt_block_s``/``ckpt_write_s`` reach ``metrics.jsonl``. FSDP's path (DCP ``async_save``) runs on a
one-rank gloo group.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import clip_train
from clip_train.train import checkpoint as ckpt
from clip_train.train import sharded_checkpoint as sharded_io
from tests.cli_helpers import FAST_DEMO, REPO, cli_env, read_metrics, run_cli, train_losses
from tests.torch_support import requires_fsdp

DEADLINE_S = 300
RUN = [*FAST_DEMO, "data.batch_size=16", "ckpt.every_n_steps=3", "ckpt.keep_last=0"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def training_like_state() -> dict:
    """Model and AdamW state after one step, with a view sharing its base's storage, RNG and plain values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).square().sum().backward()
    optimizer.step()
    base = torch.arange(12.0)
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "views": {"base": base, "tail": base[4:].view(2, 4)},
        "rng": {"torch": torch.get_rng_state(), "numpy": ("MT19937", torch.arange(5), 3, 0, 0.0)},
        "step": 7, "config": {"optim": {"betas": [0.9, 0.98]}}, "pair": (1, 2.5),
    }


def test_async_save_writes_the_same_bytes_as_a_sync_save_from_a_copy_later_steps_do_not_touch(tmp_path: Path):
    state = training_like_state()
    sync_dir = ckpt.write_checkpoint(tmp_path / "sync", 7, state)

    snapshot = ckpt.HostSnapshot()
    host = snapshot.take(state)
    for tensor in [*state["model"].values(), state["views"]["base"]]:
        tensor.add_(1.0)  # the next training steps update the live state in place
    state["config"]["optim"]["betas"][0] = 0.5
    writer = ckpt.BackgroundWriter()
    writer.submit(ckpt.SaveTiming(7, block_s=0.0), lambda: ckpt.write_checkpoint(tmp_path / "async", 7, host))
    timing = writer.wait()

    assert timing.path == tmp_path / "async" / ckpt.step_dir_name(7) and timing.write_s > 0
    assert (timing.path / ckpt.STATE_FILE).read_bytes() == (sync_dir / ckpt.STATE_FILE).read_bytes()
    assert ckpt.verify_checkpoint(timing.path) == 7
    loaded = ckpt.load_checkpoint(timing.path)
    # The view still shares its base's storage (not a second copy of it).
    loaded["views"]["tail"][0, 0] = -1.0
    assert loaded["views"]["base"][4] == -1.0
    assert (tmp_path / "async" / ckpt.LATEST).resolve() == timing.path
    writer.submit(ckpt.SaveTiming(8, block_s=0.0), lambda: None)
    with pytest.raises(RuntimeError, match="already in flight"):  # one write at a time
        writer.submit(ckpt.SaveTiming(9, block_s=0.0), lambda: None)
    writer.wait()

    # The next snapshot reuses the host buffers instead of allocating the state again.
    again = snapshot.take(state)
    assert again["model"]["0.weight"].data_ptr() == host["model"]["0.weight"].data_ptr()
    torch.testing.assert_close(again["model"]["0.weight"], state["model"]["0.weight"], rtol=0, atol=0)


def test_weights_are_copied_by_the_writer_thread_and_the_optimizer_step_waits_for_that_copy(tmp_path: Path):
    state = training_like_state()
    sync_dir = ckpt.write_checkpoint(tmp_path / "sync", 7, state)
    weights = {t.untyped_storage().data_ptr() for t in state["model"].values()}
    snapshot = ckpt.HostSnapshot()
    host = snapshot.take(state, weights)
    state["views"]["base"].add_(1.0)  # copied by take(): the next forward may change such state at once
    optimizer_step = threading.Thread(target=snapshot.wait_copied)
    optimizer_step.start()
    time.sleep(0.2)
    assert optimizer_step.is_alive(), "the optimizer step did not wait for the copy of the weights"

    def write() -> Path:
        snapshot.complete()
        return ckpt.write_checkpoint(tmp_path / "async", 7, host)

    writer = ckpt.BackgroundWriter()
    writer.submit(ckpt.SaveTiming(7, block_s=0.0), write)
    optimizer_step.join(timeout=60)
    assert not optimizer_step.is_alive() and snapshot.wait_copied() == 0.0
    path = writer.wait().path
    assert (path / ckpt.STATE_FILE).read_bytes() == (sync_dir / ckpt.STATE_FILE).read_bytes()


def test_a_background_write_that_fills_the_disk_is_raised_on_the_main_thread_and_keeps_latest(
    tmp_path: Path, monkeypatch
):
    root = tmp_path / "checkpoints"
    ckpt.write_checkpoint(root, 3, {"step": 3})
    real_save = ckpt.save_state_file

    def full_disk(state, path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt, "save_state_file", full_disk)
    writer = ckpt.BackgroundWriter()
    writer.submit(ckpt.SaveTiming(6, block_s=0.0), lambda: ckpt.write_checkpoint(root, 6, {"step": 6}))
    with pytest.raises(ckpt.DiskFull, match=r"no space left .*latest still points at step_000000003"):
        writer.wait()
    assert not writer.pending and writer.wait() is None  # raised once, then the writer is free again
    assert not list(root.glob(".tmp-*")) and os.readlink(root / ckpt.LATEST) == ckpt.step_dir_name(3)
    monkeypatch.setattr(ckpt, "save_state_file", real_save)
    writer.submit(ckpt.SaveTiming(6, block_s=0.0), lambda: ckpt.write_checkpoint(root, 6, {"step": 6}))
    assert writer.wait().path.name == ckpt.step_dir_name(6)


# ------------------------------------------------------------------------------ real training processes


def _start(args: list[str], cache_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.slow_checkpoint", *args], cwd=REPO,
                            env={**cli_env(cache_dir), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_until(proc: subprocess.Popen, condition, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{what}: not within {DEADLINE_S}s")
        time.sleep(0.02)


def _logged_steps(run_dir: Path) -> set[int]:
    try:
        return set(train_losses(run_dir))
    except (FileNotFoundError, ValueError):  # not yet written, or a line being written
        return set()


def test_training_goes_on_during_the_write_and_a_sigkill_mid_write_resumes_from_the_previous_latest(
    cache_dir: Path, tmp_path: Path
):
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    args = [*RUN, "train.max_steps=8", "ckpt.async_save=true", f"hydra.run.dir={run_dir}"]
    # Step 3's write takes 2 s longer; step 6's would take 10 minutes: it is killed during it.
    proc = _start(args, cache_dir, {"CLIP_TRAIN_TEST_SLOW_SAVE": "3:2,6:600",
                                    "CLIP_TRAIN_TEST_SAVE_MARKERS": str(markers)})
    try:
        _wait_until(proc, lambda: (markers / "writing-6").exists() and 8 in _logged_steps(run_dir),
                    "step 8 logged during the write of step 6")
        # Steps 7 and 8 trained while checkpoint 6 was being written; the end of training waits for it.
        time.sleep(0.5)
        assert proc.poll() is None, "the run ended before its last checkpoint write finished"
        assert not (run_dir / "checkpoints" / ckpt.step_dir_name(6)).exists()
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    checkpoints = run_dir / "checkpoints"
    assert os.readlink(checkpoints / ckpt.LATEST) == ckpt.step_dir_name(3)
    assert [path.name for _, path in ckpt.list_checkpoints(checkpoints)] == [ckpt.step_dir_name(3)]
    assert ckpt.verify_checkpoint(checkpoints / ckpt.step_dir_name(3)) == 3
    killed = read_metrics(run_dir)

    # The slowed write of step 3 is reported once, on a later training line: the step waited only for
    # the host copy, the write took the extra 2 s.
    (report,) = [line for line in killed if line.get("ckpt_step") == 3]
    # No later than step 7: the save of step 6 waited for it (one write in flight).
    assert 3 < report["step"] <= 7 and "loss" in report
    assert report["ckpt_write_s"] >= 2.0 and 0.0 < report["ckpt_block_s"] < report["ckpt_write_s"]

    result = run_cli([*args], cache_dir, timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoints / ckpt.step_dir_name(3)} at step 3" in result.stdout + result.stderr
    resumed = train_losses(run_dir)
    assert sorted(resumed) == list(range(1, 9))
    assert {step: resumed[step] for step in range(4, 9)} == {m["step"]: m["loss"] for m in killed
                                                             if "loss" in m and m["step"] > 3}
    assert os.readlink(checkpoints / ckpt.LATEST) == ckpt.step_dir_name(8)
    for step in (3, 6, 8):
        assert ckpt.verify_checkpoint(checkpoints / ckpt.step_dir_name(step)) == step


def test_a_sync_save_reports_its_whole_write_as_the_stall(cache_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = _start([*RUN, "train.max_steps=4", f"hydra.run.dir={run_dir}"], cache_dir,
                  {"CLIP_TRAIN_TEST_SLOW_SAVE": "3:1"})
    out, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, out[-3000:]
    (report,) = [line for line in read_metrics(run_dir) if line.get("ckpt_step") == 3]
    assert report["step"] == 4  # the first training line after the save
    assert report["ckpt_write_s"] >= 1.0 and report["ckpt_block_s"] >= report["ckpt_write_s"]


def test_a_full_disk_in_the_background_write_ends_the_run_with_the_one_line_and_exit_6(cache_dir: Path,
                                                                                      tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = _start([*RUN, "train.max_steps=8", "ckpt.async_save=true", f"hydra.run.dir={run_dir}"], cache_dir,
                  {"CLIP_TRAIN_TEST_FULL_SAVE": "6"})
    out, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 6, out[-3000:]
    errors = [line for line in out.splitlines() if "clip_train: error:" in line]
    assert len(errors) == 1 and "no space left on the device while writing checkpoint" in errors[0]
    assert "latest still points at step_000000003" in errors[0] and "Traceback" not in out
    checkpoints = run_dir / "checkpoints"
    assert not list(checkpoints.glob(".tmp-*")) and os.readlink(checkpoints / ckpt.LATEST) == ckpt.step_dir_name(3)


def test_sigterm_during_the_background_write_exits_3_with_the_pending_and_the_final_checkpoint_complete(
    cache_dir: Path, tmp_path: Path
):
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    proc = _start([*RUN, "train.max_steps=200", "ckpt.async_save=true", f"hydra.run.dir={run_dir}"], cache_dir,
                  {"CLIP_TRAIN_TEST_SLOW_SAVE": "3:3", "CLIP_TRAIN_TEST_SAVE_MARKERS": str(markers)})
    try:
        # Once step 4 trained, the write of step 3 still in progress: SIGTERM lands mid-write.
        _wait_until(proc, lambda: (markers / "writing-3").exists() and 4 in _logged_steps(run_dir),
                    "step 4 during the write of step 3")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, out[-3000:]
    stopped = int(out.split("preempted: checkpoint written at step ")[1].split(";")[0])
    checkpoints = run_dir / "checkpoints"
    assert stopped > 3 and os.readlink(checkpoints / ckpt.LATEST) == ckpt.step_dir_name(stopped)
    assert ckpt.verify_checkpoint(checkpoints / ckpt.step_dir_name(3)) == 3
    assert ckpt.verify_checkpoint(checkpoints / ckpt.step_dir_name(stopped)) == stopped
    assert ckpt.load_checkpoint(checkpoints / ckpt.step_dir_name(stopped))["train_state"]["step"] == stopped
    assert max(train_losses(run_dir)) == stopped


# ------------------------------------------------------------------------------ FSDP: DCP's async_save


@requires_fsdp
def test_fsdp_async_save_stages_the_shards_and_seals_the_same_state_as_a_sync_save(one_rank_group, tmp_path):
    from clip_train.train.optim import build_optimizer
    from clip_train.train.parallelize import parallelize
    from clip_train.train.trainer import build_model
    from tests.test_scaling import CPU, batch, contrastive_loss, train_config

    cfg = train_config(strategy="fsdp")
    torch.manual_seed(0)
    model = build_model(cfg)
    parallel = parallelize(model, cfg, CPU)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    contrastive_loss(parallel.module, *batch()).backward()
    parallel.sync_grads()
    optimizer.step()
    sharded_io.save_sharded_checkpoint(tmp_path / "sync", 1, model, optimizer, {"step": 1}, is_main=True)

    writer = ckpt.BackgroundWriter()
    finish = sharded_io.start_sharded_checkpoint_async(tmp_path / "async", 1, model, optimizer,
                                                       ckpt.HostSnapshot().take({"step": 1}), is_main=True,
                                                       process_group=dist.new_group(backend="gloo"))
    writer.submit(ckpt.SaveTiming(1, block_s=0.0), finish)
    with torch.no_grad():  # the next step changes the live shards while DCP writes its staged copy
        for parameter in model.parameters():
            parameter.add_(1.0)
    path = writer.wait().path
    assert path == tmp_path / "async" / ckpt.step_dir_name(1) and ckpt.verify_checkpoint(path) == 1
    assert os.readlink(tmp_path / "async" / ckpt.LATEST) == path.name
    assert ckpt.load_checkpoint(path) == {"step": 1}
    written = sharded_io.read_sharded_model_state(path)
    expected = sharded_io.read_sharded_model_state(tmp_path / "sync" / ckpt.step_dir_name(1))
    assert written.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(written[key], expected[key], rtol=0, atol=0, msg=key)


@requires_fsdp
@pytest.mark.slow  # two torchrun ranks: about a minute on two loaded cores
def test_fsdp_async_save_on_two_gloo_ranks_writes_every_shard_before_sealing(cache_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "fsdp"
    result = run_cli([*FAST_DEMO, "data.batch_size=8", "train.max_steps=4", "ckpt.every_n_steps=2",
                      "ckpt.keep_last=0", "train.strategy=fsdp", "ckpt.async_save=true",
                      f"hydra.run.dir={run_dir}"], cache_dir, torchrun_procs=2, timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert os.readlink(checkpoints / ckpt.LATEST) == ckpt.step_dir_name(4)
    for step in (2, 4):
        path = checkpoints / ckpt.step_dir_name(step)
        assert ckpt.verify_checkpoint(path) == step
        assert sorted(p.name for p in (path / sharded_io.SHARDED_DIR).iterdir()) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert ckpt.load_checkpoint(path)["train_state"]["step"] == step
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------ the benchmark


def test_checkpoint_benchmark_reports_both_stalls_as_a_final_json_line(tmp_path: Path, capsys):
    from clip_train.bench import checkpoint as bench

    report = bench.main(["--model", "tiny", "--rounds", "2", "--dir", str(tmp_path), "--out",
                         str(tmp_path / "runs.jsonl")])
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final == json.loads((tmp_path / "runs.jsonl").read_text()) == json.loads(json.dumps(report))
    assert final["bench"] == "checkpoint" and final["model"] == "tiny"
    assert len(final["all_s"]["sync_s"]) == len(final["all_s"]["async_stall_s"]) == 2
    assert 0 < final["async_stall_s"] and 0 < final["sync_stall_s"]
    assert final["stall_ratio"] == pytest.approx(final["async_stall_s"] / final["sync_stall_s"], rel=1e-2)
    # Weights and both AdamW moments of every parameter (fp32).
    assert final["state_bytes"] >= 3 * sum(p.numel() * 4 for p in clip_train.create_model("tiny").parameters())
    assert list(tmp_path.iterdir()) == [tmp_path / "runs.jsonl"]  # the checkpoints it wrote are gone
