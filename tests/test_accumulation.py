"""Feature-cached gradient accumulation gives the full-batch gradient, not an average of small batches."""

from __future__ import annotations

import pytest
import torch

import clip_train
from clip_train.loss import ClipLoss
from clip_train.train.step import forward_backward


def gradients(accum_steps: int, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = clip_train.create_model("tiny").double()
    loss_fn = ClipLoss(implementation="exact")

    def loss(image_features, text_features, logit_scale, direct_grads):
        return loss_fn(image_features, text_features, logit_scale if direct_grads else logit_scale.detach())

    value = forward_backward(model, loss, images.double(), tokens, accum_steps=accum_steps)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["loss"] = value
    return grads


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulated_gradients_equal_the_full_batch(accum_steps: int) -> None:
    images = torch.randn(8, 3, 32, 32)
    tokens = clip_train.get_tokenizer("tiny")([f"caption number {i}" for i in range(8)])
    full = gradients(1, images, tokens)
    accumulated = gradients(accum_steps, images, tokens)
    assert full.keys() == accumulated.keys()
    assert "logit_scale" in full
    for name in full:
        assert torch.allclose(full[name], accumulated[name], rtol=1e-7, atol=1e-10), name


def test_averaging_small_batch_losses_would_differ() -> None:
    """Guards the test above: the naive alternative really gives another gradient."""
    images = torch.randn(8, 3, 32, 32)
    tokens = clip_train.get_tokenizer("tiny")([f"caption number {i}" for i in range(8)])
    full = gradients(1, images, tokens)
    torch.manual_seed(0)
    model = clip_train.create_model("tiny").double()
    loss_fn = ClipLoss(implementation="exact")
    for part in range(2):
        sl = slice(4 * part, 4 * part + 4)
        image_features, text_features, scale = model(images[sl].double(), tokens[sl])
        (loss_fn(image_features, text_features, scale) / 2).backward()
    assert not torch.allclose(full["text_projection"], model.text_projection.grad)
