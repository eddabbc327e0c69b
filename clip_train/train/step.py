"""Forward and backward of one contrastive batch, with feature-cached gradient accumulation.

The regions carry ``torch.profiler.record_function`` labels (``forward``, ``loss``, ``backward``), so a
profiler trace of a training step (``train.profile``) names them; outside a profiler they cost microseconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from clip_train.train.precision import autocast
from clip_train.train.timing import LapLabels

LossFn = Callable[..., torch.Tensor]
"""``loss_fn(image_features, text_features, logit_scale, direct_grads, *extra)``: with ``direct_grads`` false the
loss must detach the parameters it reads directly (temperature, SigLIP bias), whose gradient is taken once.
``extra`` is whatever the model returns after its first three outputs (CoCa: caption logits and labels)."""


def forward_backward(
    model: nn.Module,
    loss_fn: LossFn,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    accum_steps: int = 1,
    precision: str = "fp32",
    scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    plain_model: nn.Module | None = None,
) -> torch.Tensor:
    """Loss over the whole batch and its gradients (accumulated into ``.grad``), returned detached.

    ``model`` is what runs with gradients (DDP-wrapped in distributed runs); ``plain_model`` (default:
    ``model``) computes the cached features. With ``accum_steps = K`` > 1, every sub-batch's features are
    first computed without gradients; then each sub-batch is recomputed with gradients and the loss is
    taken over the *whole* batch, the other sub-batches entering through their cached features. The
    gradient is therefore that of the full-batch loss (not an average of K small-batch losses) while only
    one sub-batch's activations are held at a time.
    """
    device = images.device
    plain_model = plain_model or model
    labels = LapLabels()
    if accum_steps == 1:
        labels.begin("forward")
        with autocast(precision, device):
            image_features, text_features, logit_scale, *extra = model(images, tokens)
        labels.begin("loss")
        loss = loss_fn(image_features, text_features, logit_scale, True, *extra)
        labels.begin("backward")
        scale_loss(loss).backward()
        labels.end()
        return loss.detach()

    labels.begin("forward")
    image_chunks, token_chunks = images.chunk(accum_steps), tokens.chunk(accum_steps)
    with torch.no_grad(), autocast(precision, device):
        cached = [plain_model(i, t)[:2] for i, t in zip(image_chunks, token_chunks)]
    cached_images = [c[0] for c in cached]
    cached_texts = [c[1] for c in cached]
    loss_value = torch.zeros((), device=device)
    for k in range(accum_steps):
        last = k == accum_steps - 1
        # DDP all-reduces gradients only after the last sub-batch.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            labels.begin("forward")
            with autocast(precision, device):
                image_k, text_k, logit_scale = model(image_chunks[k], token_chunks[k])
            labels.begin("loss")
            all_images = torch.cat(cached_images[:k] + [image_k] + cached_images[k + 1 :])
            all_texts = torch.cat(cached_texts[:k] + [text_k] + cached_texts[k + 1 :])
            # The temperature's (and SigLIP bias's) gradient comes from the loss itself, not through the
            # features: take it in one sub-batch only, or it would be counted accum_steps times.
            loss = loss_fn(all_images, all_texts, logit_scale, k == 0)
            labels.begin("backward")
            scale_loss(loss).backward()
            labels.end()
        if k == 0:
            loss_value = loss.detach()
    return loss_value


def step_unless_nonfinite(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor
) -> torch.Tensor:
    """``optimizer.step()`` unless the loss or the gradient norm is non-finite; returns the 0-d flag (1. = skipped).

    Optimizers whose kernel takes a ``found_inf`` tensor (``fused=True`` AdamW, our default) get the flag
    on the device and skip the update there, parameters, moments and step count alike, so the step never
    waits for the host. Other optimizers (StableAdamW) need the flag on the host: one sync per step.
    """
    bad = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).to(torch.float32)
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = bad  # the attribute GradScaler sets for the same kernels
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(bad):
        optimizer.step()
    return bad


class NonFiniteSteps:
    """Counts skipped (non-finite) steps on the device, so recording them costs no host sync.

    ``update(bad)`` takes each step's flag from ``step_unless_nonfinite``; ``drain()`` (one host sync, for
    logging or checkpointing) returns the steps skipped since the last drain, the current run of
    consecutive skipped steps, and the longest run seen since the last drain.
    """

    def __init__(self, device: torch.device | str, consecutive: int = 0) -> None:
        # [skipped since the last drain, current consecutive run, longest run since the last drain]
        self._counts = torch.tensor([0.0, float(consecutive), float(consecutive)], device=device)

    def update(self, bad: torch.Tensor) -> None:
        skipped, run, longest = self._counts.unbind()
        run = (run + 1) * bad  # back to 0 after a good step
        self._counts = torch.stack([skipped + bad, run, torch.maximum(longest, run)])

    def drain(self) -> tuple[int, int, int]:
        skipped, run, longest = (int(v) for v in self._counts.tolist())
        self._counts = torch.tensor([0.0, float(run), float(run)], device=self._counts.device)
        return skipped, run, longest
