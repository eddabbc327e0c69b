"""Forward and backward of one contrastive batch, with feature-cached gradient accumulation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from clip_train.train.precision import autocast

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""``loss_fn(image_features, text_features, logit_scale, direct_grads)``: with ``direct_grads`` false the loss
must detach the parameters it reads directly (temperature, SigLIP bias), whose gradient is taken once."""


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
    if accum_steps == 1:
        with autocast(precision, device):
            image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale, True)
        scale_loss(loss).backward()
        return loss.detach()

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
            with autocast(precision, device):
                image_k, text_k, logit_scale = model(image_chunks[k], token_chunks[k])
            all_images = torch.cat(cached_images[:k] + [image_k] + cached_images[k + 1 :])
            all_texts = torch.cat(cached_texts[:k] + [text_k] + cached_texts[k + 1 :])
            # The temperature's (and SigLIP bias's) gradient comes from the loss itself, not through the
            # features: take it in one sub-batch only, or it would be counted accum_steps times.
            loss = loss_fn(all_images, all_texts, logit_scale, k == 0)
            scale_loss(loss).backward()
        if k == 0:
            loss_value = loss.detach()
    return loss_value
