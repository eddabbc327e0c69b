"""Issue 14: one writer per run directory, resume semantics, one timeline, full disks, Ctrl-C, one-line refusals.

Real ``python -m clip_train`` processes on the demo with a few tiny steps: two trainers on one directory,
leases left by dead processes, a resume with a new lr, a resume from an older checkpoint, a save that fills
a real tmpfs, SIGINT to the process group, and broken or hostile files and values. docs/reliability.md
lists what each test proves.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clip_train
from clip_train.models import CheckpointError
from clip_train.train import checkpoint as ckpt
from clip_train.train import run_lock
from clip_train.train.optim import const_with_cooldown, cosine_with_warmup
from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli, train_losses
from tests.test_reliability import _finish, _kill_group, _logged_step, _start, _wait_for_step
from tests.wandb_records import read_wandb_records, wandb_config

EXIT_PREEMPTED, EXIT_BAD_INPUT, EXIT_DISK_FULL, EXIT_INTERRUPTED = 3, 2, 6, 130
DEADLINE_S = 420


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if "error:" in line]


def _steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir) if "loss" in m]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lease(run_dir: Path, **info) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / run_lock.LOCK_FILE
    base = {"host": socket.gethostname(), "pid": 1, "pid_start": None, "slurm_job_id": None,
            "torchelastic_run_id": None, "started": "2026-01-01T00:00:00Z", "token": "feedfeedfeedfeed"}
    path.write_text(json.dumps({**base, **info}))
    return path


# ----------------------------------------------------------------------------------------------- 1. the lock


def test_a_second_trainer_on_a_live_run_dir_refuses_in_one_line_and_touches_nothing(
    cache_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [*FAST_DEMO, "data.batch_size=8", "train.max_steps=5000", "ckpt.every_n_steps=0", f"hydra.run.dir={run_dir}"]
    first = _start(args, cache_dir)
    try:
        _wait_for_step(first, run_dir, 2)
        lease = json.loads((run_dir / run_lock.LOCK_FILE).read_text())
        assert lease["pid"] == first.pid and lease["host"] == socket.gethostname()
        hydra_before = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        second = run_cli([*args, "train.seed=7"], cache_dir, timeout=DEADLINE_S)
        assert first.poll() is None, "the first run ended before the second started; nothing was tested"
        assert second.returncode == EXIT_BAD_INPUT, second.stderr[-3000:]
        output = second.stdout + second.stderr
        errors = _errors(output)
        assert len(errors) == 1 and "in use by another trainer" in errors[0] and f"pid {first.pid}" in errors[0], output
        assert "Traceback" not in output
        assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_before
        os.kill(first.pid, signal.SIGTERM)  # end the first run with a checkpoint at a step boundary
        out = _finish(first)
    finally:
        _kill_group(first)
    assert first.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = int(out.split("checkpoint written at step")[1].split()[0].strip(";"))
    assert _steps(run_dir) == list(range(1, stopped + 1)), "every step of the first run exactly once"
    assert not (run_dir / run_lock.LOCK_FILE).exists(), "the lease is released at the end"
    assert not (run_dir / ".hydra" / "overrides.yaml").read_text().count("seed=7")


def test_a_lease_left_by_a_dead_process_is_taken_over_with_a_warning(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_lease(run_dir, pid=_dead_pid())
    result = run_cli([*FAST_DEMO, "data.batch_size=8", "train.max_steps=2", f"hydra.run.dir={run_dir}"], cache_dir,
                     timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "taking over the lock" in output and "no longer running" in output
    assert _steps(run_dir) == [1, 2]
    assert not (run_dir / run_lock.LOCK_FILE).exists()


def test_lease_takeover_rules(tmp_path: Path, monkeypatch) -> None:
    # A live holder elsewhere with a fresh heartbeat keeps the directory.
    path = _write_lease(tmp_path / "a", host="other-node", pid=4242, slurm_job_id="77")
    with pytest.raises(run_lock.RunDirLocked, match="host other-node pid 4242, SLURM job 77"):
        run_lock.RunLock(tmp_path / "a", stale_after_s=60).acquire()
    # ... until its heartbeat is older than the timeout.
    old = time.time() - 120
    os.utime(path, (old, old))
    lock = run_lock.RunLock(tmp_path / "a", stale_after_s=60)
    lock.acquire()
    assert json.loads(path.read_text())["token"] == lock.identity["token"]
    lock.release()
    assert not path.exists()
    # A requeued SLURM job (same job id) takes its own lease over at once, even from a live-looking holder.
    _write_lease(tmp_path / "b", host="other-node", pid=4242, slurm_job_id="77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock = run_lock.RunLock(tmp_path / "b", stale_after_s=3600)
    lock.acquire()
    # Another trainer taking the lease over is noticed by the holder's heartbeat.
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    os.utime(lock.path, (old, old))
    thief = run_lock.RunLock(tmp_path / "b", stale_after_s=60)
    thief.acquire()
    assert not lock._still_mine() and thief._still_mine()
    lock.release()  # must not remove the new holder's lease
    assert thief._still_mine()
    thief.release()


# ----------------------------------------------------------------------------------------- 2. resume semantics

RESUME_RUN = [*FAST_DEMO, "data.batch_size=16", "train.max_steps=6", "ckpt.every_n_steps=3", "ckpt.keep_last=0",
              "optim.warmup_steps=4"]


def test_a_resume_takes_lr_weight_decay_and_betas_from_the_new_config_but_not_the_decay_rule(
    cache_dir: Path, tmp_path: Path
) -> None:
    old_run, new_run = tmp_path / "old", tmp_path / "new"
    first = run_cli([*RESUME_RUN, f"hydra.run.dir={old_run}"], cache_dir, timeout=DEADLINE_S)
    assert first.returncode == 0, first.stderr[-3000:]
    step3 = old_run / "checkpoints" / ckpt.step_dir_name(3)
    changed = ["optim.lr=1e-5", "optim.weight_decay=0.01", "optim.betas=[0.8,0.9]", "train.max_steps=8"]
    second = run_cli([*RESUME_RUN, *changed, f"ckpt.resume={step3}", f"hydra.run.dir={new_run}"], cache_dir,
                     timeout=DEADLINE_S)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    for line in ("optim.lr 0.003 -> 1e-05", "optim.weight_decay 0.1 -> 0.01", "optim.betas [0.9, 0.98] -> [0.8, 0.9]",
                 "train.max_steps 6 -> 8"):
        assert line in output, line
    logged = {m["step"]: m for m in read_metrics(new_run) if "loss" in m}
    assert sorted(logged) == [4, 5, 6, 7, 8]
    for step, record in logged.items():  # the new lr on the new schedule (warmup 4, cosine over 8 steps)
        assert record["lr"] == pytest.approx(1e-5 * cosine_with_warmup(step, 4, 8, 0.0), rel=1e-9)
    old_losses = train_losses(old_run)
    assert logged[4]["loss"] == old_losses[4]  # step 4 runs on step 3's weights: they came from the checkpoint
    assert logged[5]["loss"] != old_losses[5] and logged[6]["loss"] != old_losses[6]
    groups = ckpt.load_checkpoint(new_run / "checkpoints" / ckpt.step_dir_name(8))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in groups)

    # Another optim.no_decay regroups the tensors, so the saved moments would land on others: refused.
    regrouped = run_cli([*RESUME_RUN, "optim.no_decay=openclip", f"ckpt.resume={step3}",
                         f"hydra.run.dir={tmp_path / 'regrouped'}"], cache_dir, timeout=DEADLINE_S)
    refusal = regrouped.stdout + regrouped.stderr
    assert regrouped.returncode == 2 and "Traceback" not in refusal, refusal[-3000:]
    assert "optim.no_decay=openclip differs from the checkpoint's clip" in refusal
    assert not (tmp_path / "regrouped" / "checkpoints").exists() or not any((tmp_path / "regrouped" / "checkpoints").iterdir())


def _wandb_ids(run_dir: Path) -> set[str]:
    return {path.name.rsplit("-", 1)[-1] for path in (run_dir / "wandb").glob("offline-run-*")}


def _wandb_run_config(run_dir: Path) -> dict:
    """The config of the run dir's newest offline W&B run (one per process that logged to it)."""
    newest = max((run_dir / "wandb").glob("offline-run-*"))
    return wandb_config(read_wandb_records(next(newest.glob("*.wandb"))))


def test_a_constant_runs_checkpoint_branches_into_a_cooldown_as_a_new_run_and_a_rerun_keeps_the_branch(
    cache_dir: Path, tmp_path: Path
) -> None:
    const_run, branch = tmp_path / "const", tmp_path / "cooldown"
    base = [*FAST_DEMO, "data.batch_size=16", "ckpt.every_n_steps=2", "ckpt.keep_last=0", "optim.warmup_steps=2",
            "logger.wandb.mode=offline"]
    first = run_cli([*base, "optim.schedule=const", "train.max_steps=6", "ckpt.keep_last=1", "ckpt.keep_every_n_steps=4",
                     f"hydra.run.dir={const_run}"], cache_dir, timeout=DEADLINE_S)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(const_run / "checkpoints")] == [6, 4]  # the newest, and step 4 kept
    const_lrs = {m["step"]: m["lr"] for m in read_metrics(const_run) if "loss" in m}
    assert [const_lrs[step] for step in (2, 3, 4, 5, 6)] == pytest.approx([3e-3] * 5)  # after the warmup: lr
    const_metrics = (const_run / "metrics.jsonl").read_bytes()
    (const_id,) = _wandb_ids(const_run)

    branch_args = [*base, "optim.schedule=const-cooldown", "optim.cooldown_steps=3", "optim.min_lr_ratio=0.1",
                   "train.max_steps=7", f"ckpt.resume={const_run / 'checkpoints' / ckpt.step_dir_name(4)}",
                   f"hydra.run.dir={branch}"]
    second = run_cli(branch_args, cache_dir, timeout=DEADLINE_S)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "optim.schedule const -> const-cooldown" in output and "another run's checkpoint" in output
    assert "began the cooldown" not in output  # cooldown_steps spans exactly the steps left: no warning
    logged = {m["step"]: m for m in read_metrics(branch) if "loss" in m}
    assert sorted(logged) == [5, 6, 7]
    for step, record in logged.items():  # the cooldown over steps 4-7 of the new schedule, down to 0.1 x lr
        assert record["lr"] == pytest.approx(3e-3 * const_with_cooldown(step, 2, 7, 3, 0.1, 1.0), rel=1e-9)
    assert logged[7]["lr"] == pytest.approx(3e-4)
    assert logged[5]["loss"] == train_losses(const_run)[5]  # step 5 runs on step 4's weights and data position
    (branch_id,) = _wandb_ids(branch)
    assert branch_id != const_id  # its own W&B run, not steps appended to the constant run's
    step_4 = str((const_run / "checkpoints" / ckpt.step_dir_name(4)).resolve())
    link = {"checkpoint": step_4, "step": 4, "wandb_run_id": const_id}
    assert _wandb_run_config(branch)["branched_from"] == link  # the W&B run names what it branched off
    assert f"W&B run {const_id}" in output
    assert (const_run / "metrics.jsonl").read_bytes() == const_metrics and _wandb_ids(const_run) == {const_id}

    # A requeued branch job runs the same command: it keeps its own steps instead of starting over at step 4.
    again = run_cli(branch_args, cache_dir, timeout=DEADLINE_S)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "this run dir has its own: continuing from" in output and "nothing to train" in output
    assert _steps(branch) == [5, 6, 7] and not (branch / "checkpoints" / "abandoned").exists()
    assert [s for s, _ in ckpt.list_checkpoints(branch / "checkpoints")] == [7, 6]
    assert _wandb_ids(branch) == {branch_id}
    assert _wandb_run_config(branch)["branched_from"] == link  # kept through the branch's own resume


# ------------------------------------------------------------------------------------------- 3. one timeline


def test_resuming_an_older_checkpoint_retires_the_newer_ones_and_auto_continues_that_timeline(
    cache_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    base = [*FAST_DEMO, "data.batch_size=16", "ckpt.every_n_steps=2", "ckpt.keep_last=0", f"hydra.run.dir={run_dir}"]
    assert run_cli([*base, "train.max_steps=6"], cache_dir, timeout=DEADLINE_S).returncode == 0
    checkpoints = run_dir / "checkpoints"
    back = run_cli([*base, "train.max_steps=4", f"ckpt.resume={checkpoints / ckpt.step_dir_name(2)}"], cache_dir,
                   timeout=DEADLINE_S)
    assert back.returncode == 0, back.stderr[-3000:]
    abandoned = list((checkpoints / "abandoned").iterdir())
    assert len(abandoned) == 1
    assert sorted(p.name for p in abandoned[0].iterdir()) == ["metrics.jsonl", "step_000000004", "step_000000006"]
    assert [json.loads(line)["step"] for line in (abandoned[0] / "metrics.jsonl").read_text().splitlines()] == [3, 4, 5, 6]
    assert [s for s, _ in ckpt.list_checkpoints(checkpoints)] == [4, 2]
    again = run_cli([*base, "train.max_steps=6"], cache_dir, timeout=DEADLINE_S)  # ckpt.resume=auto
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 4" in again.stdout + again.stderr  # the chosen timeline's step 4, not the abandoned step 6
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert (checkpoints / ckpt.LATEST).resolve().name == ckpt.step_dir_name(6)


# ------------------------------------------------------------------------------------------------ 4. disk full


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount_point)], check=False,
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(mount_point: Path, leave_bytes: int) -> Path:
    filler = mount_point / "filler"
    stat = os.statvfs(mount_point)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_a_save_that_fills_the_disk_is_one_line_and_a_rerun_after_freeing_space_resumes(
    cache_dir: Path, small_tmpfs: Path
) -> None:
    run_dir = small_tmpfs / "run"
    base = [*FAST_DEMO, "data.batch_size=16", "ckpt.every_n_steps=2", "ckpt.keep_last=0", f"hydra.run.dir={run_dir}"]
    assert run_cli([*base, "train.max_steps=2"], cache_dir, timeout=DEADLINE_S).returncode == 0
    filler = _fill(small_tmpfs, leave_bytes=4 << 20)  # room for logs, not for another checkpoint
    for attempt in range(2):  # the second attempt resumes (truncating metrics.jsonl) on a disk still full
        full = run_cli([*base, "train.max_steps=4"], cache_dir, timeout=DEADLINE_S)
        output = full.stdout + full.stderr
        assert full.returncode == EXIT_DISK_FULL, output[-3000:]
        errors = _errors(output)
        assert len(errors) == 1 and "no space left" in errors[0] and ".tmp-step_000000004" in errors[0], errors
        assert "Traceback" not in output
        assert not list((run_dir / "checkpoints").glob(".tmp-step_*")), "the partial save is removed"
        assert (run_dir / "checkpoints" / ckpt.LATEST).resolve().name == ckpt.step_dir_name(2)
        assert ckpt.find_resumable(run_dir / "checkpoints").name == ckpt.step_dir_name(2)
    filler.unlink()
    rerun = run_cli([*base, "train.max_steps=4"], cache_dir, timeout=DEADLINE_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "at step 2" in rerun.stdout + rerun.stderr
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert ckpt.verify_checkpoint(run_dir / "checkpoints" / ckpt.step_dir_name(4)) == 4


# ------------------------------------------------------------------------------------------------- 5. SIGINT


def test_ctrl_c_checkpoints_after_the_step_exits_130_and_resumes(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*FAST_DEMO, "data.batch_size=8", "data.num_workers=2", "ckpt.every_n_steps=0", f"hydra.run.dir={run_dir}"]
    proc = _start([*args, "train.max_steps=5000"], cache_dir)
    try:
        _wait_for_step(proc, run_dir, 2)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the trainer and its loader workers
        out = _finish(proc)
    finally:
        _kill_group(proc)
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert "exited unexpectedly" not in out and "killed by signal" not in out, "a loader worker died"
    step = int(out.split("checkpoint written at step")[1].split()[0].strip(";"))
    saved = run_dir / "checkpoints" / ckpt.step_dir_name(step)
    assert ckpt.verify_checkpoint(saved) == step
    assert (run_dir / "checkpoints" / ckpt.LATEST).resolve() == saved.resolve()
    assert _logged_step(run_dir) == step

    result = run_cli([*args, f"train.max_steps={step + 2}"], cache_dir, timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {step}" in result.stdout + result.stderr
    assert _steps(run_dir) == list(range(1, step + 3))


def test_a_second_ctrl_c_exits_at_once_and_leaves_no_torn_checkpoint(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*FAST_DEMO, "data.batch_size=8", "ckpt.every_n_steps=2", "ckpt.keep_last=0", f"hydra.run.dir={run_dir}"]
    proc = _start([*args, "train.max_steps=5000"], cache_dir)
    try:
        _wait_for_step(proc, run_dir, 3)
        os.kill(proc.pid, signal.SIGINT)
        seen = []
        for line in proc.stdout:  # the first one has been taken (the step is finishing), then the second
            seen.append(line)
            if "SIGINT received" in line:
                os.kill(proc.pid, signal.SIGINT)
                break
        out = "".join(seen) + _finish(proc)
    finally:
        _kill_group(proc)
    assert proc.returncode == EXIT_INTERRUPTED, out[-3000:]
    assert "second SIGINT" in out and "Traceback" not in out
    checkpoints = run_dir / "checkpoints"
    for step, path in ckpt.list_checkpoints(checkpoints):
        assert ckpt.verify_checkpoint(path) == step  # every step directory is complete: none is torn
    newest = ckpt.find_resumable(checkpoints)
    assert newest is not None and (checkpoints / ckpt.LATEST).resolve() == newest.resolve()
    resumed_at = ckpt.verify_checkpoint(newest)
    result = run_cli([*args, f"train.max_steps={resumed_at + 1}"], cache_dir, timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _steps(run_dir) == list(range(1, resumed_at + 2))


# --------------------------------------------------------------------------------- 6. refusals, one line each


def _tiny_state() -> dict[str, torch.Tensor]:
    return clip_train.create_model("tiny").state_dict()


def _broken_safetensors(path: Path, kind: str) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _tiny_state().items()}, str(path))
    data = path.read_bytes()
    if kind == "header_past_end":
        data = struct.pack("<Q", len(data) * 4) + data[8:]
    elif kind == "garbage_header":
        (header_len,) = struct.unpack("<Q", data[:8])
        data = data[:8] + b"\x93" * header_len + data[8 + header_len:]
    else:  # truncated: the tensor data cut short
        data = data[: len(data) * 2 // 3]
    path.write_bytes(data)
    return path


def _nonfinite_weights(path: Path) -> Path:
    state = _tiny_state()
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    torch.save(state, path)
    return path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hf_dir_with_pickle_payload(root: Path, marker: Path) -> Path:
    """A Hugging Face CLIPModel directory whose pytorch_model.bin would run code when unpickled."""
    from clip_train.models.hf import HF_CONFIG_FILE, HF_TORCH_WEIGHTS_FILE, hf_config

    hf = root / "hf"
    hf.mkdir()
    model = clip_train.create_model("tiny")
    (hf / HF_CONFIG_FILE).write_text(json.dumps(hf_config(model.config)))
    state = dict(model.state_dict())
    state["payload"] = _Payload(marker)
    torch.save(state, hf / HF_TORCH_WEIGHTS_FILE)
    return hf


def _checkpoint_of(root: Path, model_state: dict) -> Path:
    return ckpt.write_checkpoint(root, 5, {"model": model_state, "model_config": {"name": "narrow"}})


# Through the training CLI (the other broken-safetensors kinds and non-finite pretrained weights are covered
# in-process below, through create_model, eval and export).
@pytest.mark.parametrize("case", ["header_past_end", "hf_pickle_payload", "other_architecture_checkpoint", "nonfinite_checkpoint",
                                  "unknown_key", "bad_type"])
def test_bad_files_and_keys_are_refused_in_one_line_before_anything_is_written(
    cache_dir: Path, tmp_path: Path, case: str
) -> None:
    if case in ("header_past_end", "garbage_header", "truncated"):
        overrides = [f"model.pretrained={_broken_safetensors(tmp_path / 'w.safetensors', case)}"]
        expect = {"header_past_end": "header claims", "garbage_header": "not valid JSON", "truncated": "truncated"}[case]
    elif case == "nonfinite_pretrained":
        overrides, expect = [f"model.pretrained={_nonfinite_weights(tmp_path / 'nan.pt')}"], "model.allow_nonfinite_weights"
    elif case == "other_architecture_checkpoint":
        narrow = {k: v[..., :1].clone() if v.dim() else v for k, v in _tiny_state().items()}
        overrides = [f"ckpt.resume={_checkpoint_of(tmp_path / 'other', narrow)}"]
        expect = "another architecture"
    elif case == "nonfinite_checkpoint":
        state = _tiny_state()
        state["logit_scale"] = torch.tensor(float("inf"))
        overrides, expect = [f"ckpt.resume={_checkpoint_of(tmp_path / 'nan', state)}"], "model.allow_nonfinite_weights"
    elif case == "hf_pickle_payload":
        marker = tmp_path / "pwned"
        overrides, expect = [f"model.pretrained={_hf_dir_with_pickle_payload(tmp_path, marker)}"], "unsafe"
    elif case == "unknown_key":
        overrides, expect = ["train.max_stepz=3"], "max_stepz"
    else:
        overrides, expect = ["train.max_steps=many"], "could not be converted to Integer"
    run_dir = tmp_path / "run"
    result = run_cli([*FAST_DEMO, "train.max_steps=2", *overrides, f"hydra.run.dir={run_dir}"], cache_dir,
                     timeout=DEADLINE_S)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_BAD_INPUT, output[-3000:]
    errors = _errors(output)
    assert len(errors) == 1 and expect in errors[0], errors
    assert "Traceback" not in output
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    if case in ("unknown_key", "bad_type"):
        assert not run_dir.exists(), "a config error is found before Hydra writes the run directory"
    if case == "hf_pickle_payload":
        assert "safetensors" in errors[0] and "weights_only" not in output
        assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("override, expect", [
    ("train.log_every_n_steps=0", "train.log_every_n_steps must be at least 1"),
    ("loss.temperature=0", "loss.temperature must be a positive number"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("data.num_workers=-3", "data.num_workers must be >= 0"),
    ("ckpt.every_n_steps=-1", "ckpt.every_n_steps must be >= 0 (0: save at the end only), got -1"),
    ("ckpt.keep_every_n_steps=-5", "ckpt.keep_every_n_steps must be >= 0 (0: keep none beyond keep_last), got -5"),
    ("ckpt.resume=/nonexistent/run/checkpoints/step_000000002", "does not exist"),
    ("train.lock_stale_after_s=0", "train.lock_stale_after_s"),
    ("data.batch_size=0", "data.batch_size is per rank and must be at least 1"),
    ("data.train_shards=null", "data.train_shards is not set; give a shard pattern"),
    ("model.pretrained=laion2b_s34b_b79k", "model.pretrained=laion2b_s34b_b79k: checkpoint not found"),
])
def test_bad_values_are_refused_in_one_line_before_hydra_writes_anything(
    tmp_path: Path, monkeypatch, capsys, override: str, expect: str
) -> None:
    # In-process (the same main() as `python -m clip_train`): the refusal comes before any heavy work.
    from clip_train import __main__ as cli

    run_dir = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    monkeypatch.setattr(sys, "argv", ["clip_train", *FAST_DEMO, override, f"hydra.run.dir={run_dir}"])
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.main()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert stopped.value.code == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    errors = _errors(captured.out + captured.err)
    assert len(errors) == 1 and expect in errors[0], errors
    assert "no manifest.json" not in errors[0]
    assert not run_dir.exists()


def test_non_finite_weights_load_only_with_the_flag_the_error_names(tmp_path: Path) -> None:
    path = _nonfinite_weights(tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"non-finite weights .* visual\.proj.*allow_nonfinite_weights=True"):
        clip_train.create_model("tiny", pretrained=path)
    model = clip_train.create_model("tiny", pretrained=path, allow_nonfinite_weights=True)
    assert torch.isnan(model.visual.proj).all()


@pytest.mark.parametrize("kind", ["header_past_end", "garbage_header", "truncated"])
def test_a_broken_safetensors_checkpoint_is_one_line_in_eval_and_export(
    cache_dir: Path, tmp_path: Path, capsys, kind: str
) -> None:
    from clip_train.eval.__main__ import main as eval_main
    from clip_train.export import main as export_main

    broken = _broken_safetensors(tmp_path / "model.safetensors", kind)
    os.environ.setdefault("CLIP_TRAIN_CACHE", str(cache_dir))
    assert eval_main(["zeroshot", "--checkpoint", str(broken), "--data", "demo"]) == EXIT_BAD_INPUT
    assert export_main([str(broken), "--format", "open_clip", "--out", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    errors = _errors(captured.out + captured.err)
    assert len(errors) == 2 and all(str(broken) in line for line in errors), errors
    assert "SafetensorError" not in captured.err and "Traceback" not in captured.err


def test_metrics_are_cut_in_place_after_the_resumed_step(tmp_path: Path) -> None:
    from clip_train.train.metrics import truncate_metrics_after

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)]
    path.write_text("".join(lines) + '{"step": 7, "lo')  # the last line torn by a kill
    inode = path.stat().st_ino
    truncate_metrics_after(path, 3)
    assert path.read_text() == "".join(lines[:3])
    assert path.stat().st_ino == inode, "cut in place (no new file: works on a full disk)"
    truncate_metrics_after(path, 5)
    assert path.read_text() == "".join(lines[:3])


def test_a_resume_from_a_config_saved_before_a_rename_lists_only_real_changes() -> None:
    from clip_train.train.resume import config_changes

    saved = {"data": {"shards_per_block": 4, "batch_size": 8}, "optim": {"lr": 0.003}}
    assert config_changes(saved, {"data": {"shuffle_shards": 4, "batch_size": 8}, "optim": {"lr": 0.003}}) == []
    assert config_changes(saved, {"data": {"shuffle_shards": 8, "batch_size": 8}, "optim": {"lr": 1e-05}}) == [
        "data.shuffle_shards 4 -> 8", "optim.lr 0.003 -> 1e-05"]
