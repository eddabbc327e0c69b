"""Non-finite steps are skipped and counted on the device: no host sync in the training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clip_train.train.optim import StableAdamW
from clip_train.train.step import NonFiniteSteps, step_unless_nonfinite
from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli


def _forbid_host_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    def sync(*args: object, **kwargs: object) -> None:
        raise AssertionError("host synchronisation in the step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def _param_and_optimizer(fused: bool) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    param = torch.nn.Parameter(torch.ones(4))
    if fused:
        return param, torch.optim.AdamW([param], lr=0.1, weight_decay=0.1, fused=True)
    return param, StableAdamW([param], lr=0.1, weight_decay=0.1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_adamw", "stable_adamw"])
def test_nonfinite_step_changes_nothing_and_finite_step_updates(fused: bool) -> None:
    param, optimizer = _param_and_optimizer(fused)
    param.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    bad = step_unless_nonfinite(optimizer, torch.tensor(2.0), param.grad.norm())
    assert bad.item() == 1.0
    assert torch.equal(param.detach(), torch.ones(4))
    state = optimizer.state[param]
    assert not state or (float(state["step"]) == 0 and not state["exp_avg"].any())

    param.grad = torch.ones(4)
    bad = step_unless_nonfinite(optimizer, torch.tensor(float("inf")), param.grad.norm())  # bad loss alone
    assert bad.item() == 1.0 and torch.equal(param.detach(), torch.ones(4))

    bad = step_unless_nonfinite(optimizer, torch.tensor(2.0), param.grad.norm())
    assert bad.item() == 0.0
    assert (param.detach() < 1).all() and float(optimizer.state[param]["step"]) == 1
    assert not hasattr(optimizer, "found_inf")  # left as found, so a GradScaler can use the optimizer


def test_fused_adamw_step_and_counting_do_not_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    param, optimizer = _param_and_optimizer(fused=True)
    counts = NonFiniteSteps("cpu")
    param.grad = torch.full((4,), float("inf"))
    _forbid_host_syncs(monkeypatch)
    counts.update(step_unless_nonfinite(optimizer, torch.tensor(1.0), param.grad.norm()))
    monkeypatch.undo()
    assert counts.drain() == (1, 1, 1)


def test_counts_runs_of_bad_steps_across_drains() -> None:
    counts = NonFiniteSteps("cpu", consecutive=2)  # resumed in the middle of a bad run
    for flag in (1.0, 0.0, 1.0, 1.0):
        counts.update(torch.tensor(flag))
    assert counts.drain() == (3, 2, 3)  # skipped, current run, longest run (2 resumed + 1)
    counts.update(torch.tensor(1.0))
    assert counts.drain() == (1, 3, 3)  # the run continues across a drain
    counts.update(torch.tensor(0.0))
    assert counts.drain() == (0, 0, 3)  # longest since the last drain includes the run it started with
    assert counts.drain() == (0, 0, 0)


def test_trainer_skips_nonfinite_steps_and_stops_after_max_bad_steps(tmp_path: Path) -> None:
    # An infinite learning rate turns every weight non-finite in the first update; every later step's
    # loss is NaN, so its update is skipped, and the fifth skipped step in a row ends the run.
    run_dir = tmp_path / "run"
    args = [*FAST_DEMO, "optim.lr=inf", "optim.warmup_steps=0", "train.max_steps=20", "train.max_bad_steps=5",
            "ckpt.every_n_steps=0", f"hydra.run.dir={run_dir}"]  # fmt: skip
    result = run_cli(args, tmp_path / "cache", timeout=900)  # generous: tests share two cores
    assert result.returncode != 0
    assert "5 consecutive steps had a non-finite loss or gradient" in result.stdout + result.stderr
    logged = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]  # step 6 completes the run of 5 and stops
    assert [m["skipped_steps"] for m in logged] == [0, 1, 2, 3, 4]
