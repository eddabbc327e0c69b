"""Parameter groups, the LR schedules (checked against OpenCLIP's) and StableAdamW."""

from __future__ import annotations

import math

import pytest
import torch

import clip_train
from clip_train.config import ConfigError, OptimConfig, TrainConfig, validate, validate_values
from clip_train.train.optim import (
    StableAdamW,
    build_optimizer,
    build_scheduler,
    cooldown_begun_before,
    cosine_with_warmup,
    ignored_cooldown,
    parameter_groups,
)


def test_no_weight_decay_on_gains_biases_embeddings_and_temperature() -> None:
    model = clip_train.create_model("tiny")
    decay, no_decay = parameter_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in decayed
    assert "text_projection" in decayed and "visual.proj" in decayed
    for skipped in ("logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
                    "visual.positional_embedding", "ln_final.weight", "ln_final.bias", "visual.conv1.weight"):
        if skipped == "visual.conv1.weight":
            assert skipped in decayed  # conv kernels are weight matrices
        else:
            assert skipped not in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_openclips_rule_decays_the_embeddings_and_an_unknown_rule_is_named() -> None:
    model = clip_train.create_model("tiny")
    decay, exempt = parameter_groups(model, 0.2, no_decay="openclip")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"} <= decayed
    assert {"logit_scale", "visual.class_embedding", "ln_final.weight", "visual.ln_pre.bias"}.isdisjoint(decayed)
    assert len(decayed) + len(exempt["params"]) == len(list(model.parameters()))
    cfg = TrainConfig()
    cfg.optim.no_decay = "timm"
    with pytest.raises(ConfigError, match=r"^optim.no_decay='timm' is not one of clip, openclip$"):
        validate(cfg, 1, "cpu")


def test_frozen_parameters_get_no_optimizer_state() -> None:
    model = clip_train.create_model("tiny")
    model.logit_scale.requires_grad_(False)
    groups = parameter_groups(model, 0.2)
    assert all(p is not model.logit_scale for g in groups for p in g["params"])


def test_schedule_warms_up_linearly_then_follows_a_cosine() -> None:
    assert cosine_with_warmup(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 10, 100, 0.1) == pytest.approx(0.1)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=1.0, warmup_steps=2), torch.device("cpu"))
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1.0, warmup_steps=2), total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])


def _lr_per_update(cfg: OptimConfig, total_steps: int) -> list[float]:
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _open_clip_lr_per_update(make_scheduler, total_steps: int, **kwargs) -> list[float]:
    """OpenCLIP's training script calls its scheduler with the 0-based update index before each update."""
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.0)
    adjust = make_scheduler(optimizer, steps=total_steps, **kwargs)
    return [adjust(step) for step in range(total_steps)]


@pytest.mark.parametrize(("power", "end_ratio"), [(1.0, 0.0), (0.5, 0.1), (2.0, 0.0)])
def test_const_cooldown_gives_openclips_lr_at_every_update(power: float, end_ratio: float) -> None:
    scheduler = pytest.importorskip("open_clip_train.scheduler")
    cfg = OptimConfig(lr=3e-3, warmup_steps=5, schedule="const-cooldown", cooldown_steps=8,
                      cooldown_power=power, min_lr_ratio=end_ratio)
    ours = _lr_per_update(cfg, 30)
    theirs = _open_clip_lr_per_update(scheduler.const_lr_cooldown, 30, base_lr=3e-3, warmup_length=5,
                                      cooldown_steps=8, cooldown_power=power, cooldown_end_lr=3e-3 * end_ratio)
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert ours[5:22] == pytest.approx([3e-3] * 17) and ours[-1] < 3e-3  # constant, then the cooldown


def test_cosine_and_const_give_openclips_lr_at_every_update() -> None:
    scheduler = pytest.importorskip("open_clip_train.scheduler")
    cosine = _lr_per_update(OptimConfig(lr=1e-3, warmup_steps=4), 25)
    assert cosine == pytest.approx(_open_clip_lr_per_update(scheduler.cosine_lr, 25, base_lr=1e-3, warmup_length=4))
    const = _lr_per_update(OptimConfig(lr=1e-3, warmup_steps=4, schedule="const"), 25)
    assert const == pytest.approx(_open_clip_lr_per_update(scheduler.const_lr, 25, base_lr=1e-3, warmup_length=4))


def _validate_optim(max_steps: int = 100, **optim) -> None:
    cfg = TrainConfig()
    cfg.train.max_steps = max_steps
    cfg.optim = OptimConfig(**optim)
    validate_values(cfg)


def test_schedule_settings_that_cannot_run_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"optim.schedule='linear' is not a schedule: use one of cosine, const, "
                                          r"const-cooldown"):
        _validate_optim(schedule="linear")
    with pytest.raises(ConfigError, match=r"between 1 and 90 \(the steps after the warmup: train.max_steps=100 "
                                          r"- optim.warmup_steps=10\), got 0"):
        _validate_optim(schedule="const-cooldown", warmup_steps=10)
    with pytest.raises(ConfigError, match="between 1 and 90"):
        _validate_optim(schedule="const-cooldown", warmup_steps=10, cooldown_steps=91)
    with pytest.raises(ConfigError, match="optim.cooldown_power must be a positive number"):
        _validate_optim(schedule="const-cooldown", warmup_steps=10, cooldown_steps=5, cooldown_power=0.0)
    _validate_optim(schedule="const-cooldown", warmup_steps=10, cooldown_steps=90)
    # A sweep over schedules may carry cooldown_steps into its cosine points: warned about, not refused.
    _validate_optim(schedule="cosine", cooldown_steps=20)
    assert ignored_cooldown(OptimConfig(cooldown_steps=20)) == (
        "optim.cooldown_steps=20 is ignored by optim.schedule=cosine (set optim.schedule=const-cooldown for a cooldown)"
    )
    assert ignored_cooldown(OptimConfig(schedule="const-cooldown", cooldown_steps=20)) is None


def test_stable_adamw_matches_adamw_when_updates_are_unclipped() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3).double(), torch.nn.Linear(4, 3).double()
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    opt_b = StableAdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    x = torch.randn(8, 4, dtype=torch.float64)
    # The first step is the largest relative to v_hat (RMS = 1 exactly), so nothing is clipped.
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(x).square().sum().backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-10)


def test_stable_adamw_shrinks_the_step_after_a_gradient_spike() -> None:
    param = torch.nn.Parameter(torch.zeros(100))
    opt = StableAdamW([param], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(20):
        param.grad = torch.full((100,), 1e-3)
        opt.step()
    before = param.detach().clone()
    param.grad = torch.full((100,), 10.0)  # 10,000x the usual gradient
    opt.step()
    plain_adam_step = 0.1 * 1.0  # Adam's update saturates at ~lr per coordinate
    assert (before - param.detach()).abs().max() < 0.5 * plain_adam_step
    assert not math.isnan(param.sum().item())


def test_a_resume_inside_the_cooldown_is_warned_about_with_the_cooldown_that_would_fit() -> None:
    cfg = OptimConfig(schedule="const-cooldown", warmup_steps=10, cooldown_steps=400)
    assert cooldown_begun_before(cfg, total_steps=1000, resumed_step=600) is None  # the cooldown starts at 600
    assert cooldown_begun_before(cfg, total_steps=1000, resumed_step=1000) is None  # nothing left to train
    assert cooldown_begun_before(OptimConfig(cooldown_steps=400), 1000, 800) is None  # cosine: no cooldown
    assert cooldown_begun_before(cfg, total_steps=1000, resumed_step=800) == (
        "optim.cooldown_steps=400 began the cooldown at step 600, before the resumed step 800: the LR starts at "
        "0.5 x optim.lr; for a whole cooldown from here set optim.cooldown_steps=200"
    )
