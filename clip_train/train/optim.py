"""Optimizers and the learning-rate schedules.

AdamW decays weight matrices only: gains, biases, embeddings and the temperature are excluded, as in CLIP
(or, with ``optim.no_decay=openclip``, what OpenCLIP's training script excludes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from clip_train.config import LR_SCHEDULES, NO_DECAY_RULES, OptimConfig
from clip_train.models.pretrained import unwrapped_name


def openclip_exempt(name: str, param: nn.Parameter) -> bool:
    """OpenCLIP's training script: under 2-D, or a name that contains bn, ln, bias or logit_scale."""
    return param.ndim < 2 or any(part in name for part in ("bn", "ln", "bias", "logit_scale"))


def parameter_groups(model: nn.Module, weight_decay: float, no_decay: str = "clip") -> list[dict]:
    """Two AdamW groups: the decayed tensors, then those the ``no_decay`` rule exempts (``optim.no_decay``).

    ``clip``: every tensor under 2-D and those named by ``no_weight_decay()`` (embeddings, temperature).
    ``openclip``: OpenCLIP's rule, by name (parameter names here are OpenCLIP's, so the groups hold the
    same tensors as an OpenCLIP run's).
    """
    if no_decay not in NO_DECAY_RULES:
        raise ValueError(f"optim.no_decay={no_decay!r}: use one of {', '.join(NO_DECAY_RULES)}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, exempt = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # locked towers and frozen temperatures get no optimizer state at all
        clean_name = unwrapped_name(name)
        if no_decay == "openclip":
            exempted = openclip_exempt(clean_name, param)
        else:
            exempted = param.ndim < 2 or clean_name in skip
        (exempt if exempted else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": exempt, "weight_decay": 0.0},
    ]


class StableAdamW(torch.optim.Optimizer):
    """AdamW with AdaFactor-style update clipping (Wortsman et al. 2023, "Stable and low-precision training").

    Each tensor's step size is divided by ``max(1, RMS(g**2 / v_hat))``: when the current gradient is much
    larger than the second-moment estimate predicts (the cause of CLIP's loss spikes), the update shrinks.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                v_hat = exp_avg_sq / (1 - beta2**step)
                # Tensor arithmetic throughout: no .item(), so the step never waits on the device.
                rms = (grad.square() / v_hat.clamp(min=group["eps"] ** 2)).mean().sqrt()
                lr = group["lr"] / rms.clamp(min=1.0)
                param.mul_(1 - lr * group["weight_decay"])
                param.sub_(lr * (exp_avg / (1 - beta1**step)) / (v_hat.sqrt() + group["eps"]))
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay, cfg.no_decay)
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "stable_adamw":
        return StableAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    # The fused kernel does the whole update in one launch per group (CUDA, and CPU since torch 2.4).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=True)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear from 1/warmup to 1 over the warmup, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def const_with_cooldown(
    step: int, warmup_steps: int, total_steps: int, cooldown_steps: int, min_ratio: float, power: float
) -> float:
    """LR multiplier: the same warmup, then 1 until the last ``cooldown_steps`` steps, which decay it to
    ``min_ratio`` as ``(1 - progress) ** power`` (1: linear). ``cooldown_steps=0`` is a constant schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    cooldown_start = total_steps - cooldown_steps
    if cooldown_steps <= 0 or step < cooldown_start:
        return 1.0
    progress = min(1.0, (step - cooldown_start) / cooldown_steps)
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress) ** power


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The schedule ``optim.schedule`` names, as a function of the step (``LambdaLR``'s lambda)."""
    # Plain closures, not partials: LambdaLR's state_dict then stores nothing of them (a function is rebuilt
    # from the new config on resume), as it always has.
    warmup, min_ratio = min(cfg.warmup_steps, total_steps), cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return lambda step: cosine_with_warmup(step, warmup, total_steps, min_ratio)
    if cfg.schedule in ("const", "const-cooldown"):
        cooldown, power = (cfg.cooldown_steps if cfg.schedule == "const-cooldown" else 0), cfg.cooldown_power
        return lambda step: const_with_cooldown(step, warmup, total_steps, cooldown, min_ratio, power)
    raise ValueError(f"optim.schedule={cfg.schedule!r}: use one of {', '.join(LR_SCHEDULES)}")


def ignored_cooldown(cfg: OptimConfig) -> str | None:
    """A warning line when ``cooldown_steps`` is set for a schedule that has no cooldown."""
    if cfg.schedule == "const-cooldown" or cfg.cooldown_steps == 0:
        return None
    return (f"optim.cooldown_steps={cfg.cooldown_steps} is ignored by optim.schedule={cfg.schedule} (set "
            "optim.schedule=const-cooldown for a cooldown)")


def cooldown_begun_before(cfg: OptimConfig, total_steps: int, resumed_step: int) -> str | None:
    """A warning line when a resume lands inside the cooldown: the LR then starts part-way down, which a
    branch off a constant run rarely means (its cooldown usually spans exactly the steps left)."""
    if cfg.schedule != "const-cooldown" or resumed_step >= total_steps:
        return None
    start = total_steps - cfg.cooldown_steps
    if resumed_step <= start:
        return None
    factor = lr_multiplier(cfg, total_steps)(resumed_step)
    return (f"optim.cooldown_steps={cfg.cooldown_steps} began the cooldown at step {start}, before the resumed step "
            f"{resumed_step}: the LR starts at {factor:.3g} x optim.lr; for a whole cooldown from here set "
            f"optim.cooldown_steps={total_steps - resumed_step}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_multiplier(cfg, total_steps))


def apply_config_on_resume(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, cfg: OptimConfig) -> None:
    """After loading a checkpoint's optimizer and schedule: put the *new* config's hyperparameters back.

    ``load_state_dict`` restores the saved param groups (lr, betas, eps, weight decay) and the saved
    schedule's base lr, so without this a resumed run would silently keep the old values. The moments and
    step counts stay as loaded; the schedule's lambda was built from the new config (warmup, shape,
    ``train.max_steps``), so only its base lr and the current lr need setting, at the loaded step.
    """
    betas = (cfg.betas[0], cfg.betas[1])
    for index, group in enumerate(optimizer.param_groups):
        group["betas"] = betas
        group["eps"] = cfg.eps
        # parameter_groups() puts the decayed matrices first; the second group is never decayed.
        group["weight_decay"] = cfg.weight_decay if index == 0 else 0.0
        group["initial_lr"] = cfg.lr
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    step = scheduler.last_epoch
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
