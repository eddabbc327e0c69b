"""CoCa: the multimodal decoder, the whole model and its loss against OpenCLIP's, and caption generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
from open_clip.loss import CoCaLoss as OpenClipCoCaLoss  # noqa: E402
from open_clip.transformer import MultimodalTransformer  # noqa: E402

from clip_train.loss import CocaLoss  # noqa: E402
from clip_train.models.coca import MultimodalDecoder  # noqa: E402

# ------------------------------------------------------------------------------------------------ decoder


def test_decoder_keys_and_outputs_equal_open_clips() -> None:
    reference = MultimodalTransformer(width=32, layers=2, heads=4, context_length=12, output_dim=50).eval()
    torch.nn.init.normal_(reference.text_projection, std=0.2)  # OpenCLIP leaves it uninitialised
    ours = MultimodalDecoder(width=32, layers=2, heads=4, vocab_size=50, context_length=12).eval()
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours.load_state_dict(reference.state_dict())

    image_tokens, text_tokens = torch.randn(3, 7, 32), torch.randn(3, 11, 32)
    expected = reference(image_tokens, text_tokens)
    got = ours(image_tokens, text_tokens)
    assert got.shape == (3, 11, 50)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_decoder_is_causal_and_reads_the_image() -> None:
    decoder = MultimodalDecoder(width=16, layers=1, heads=2, vocab_size=20, context_length=8).eval()
    image, text = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    logits = decoder(image, text)
    later_changed = text.clone()
    later_changed[:, 4:] += 1.0
    # Positions before the change cannot see it; positions at and after it do.
    torch.testing.assert_close(decoder(image, later_changed)[:, :4], logits[:, :4])
    assert not torch.allclose(decoder(image, later_changed)[:, 4:], logits[:, 4:])
    assert not torch.allclose(decoder(image + 1.0, text), logits)
    with pytest.raises(ValueError, match="at most 8 tokens"):
        decoder(image, torch.randn(2, 9, 16))


# ------------------------------------------------------------------------------------------------ loss


def _loss_inputs(batch: int = 6, dim: int = 16, length: int = 9, vocab: int = 30) -> tuple[torch.Tensor, ...]:
    image = F.normalize(torch.randn(batch, dim, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(batch, length, vocab, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(1, vocab, (batch, length))
    for row in range(batch):  # captions of different lengths: the tail is padding
        labels[row, 3 + row % (length - 3) :] = 0
    return image, text, scale, logits, labels


@pytest.mark.parametrize("weights", [(2.0, 1.0), (1.0, 0.0), (0.5, 3.0)])
def test_coca_loss_equals_open_clips_value_and_gradients(weights: tuple[float, float]) -> None:
    caption_weight, clip_weight = weights
    image, text, scale, logits, labels = _loss_inputs()
    ours = CocaLoss(caption_loss_weight=caption_weight, clip_loss_weight=clip_weight)
    reference = OpenClipCoCaLoss(caption_loss_weight=caption_weight, clip_loss_weight=clip_weight)

    expected = reference(image, text, logits, labels, scale, output_dict=True)
    terms = ours.terms(image, text, scale, logits, labels)
    for name in ("contrastive_loss", "caption_loss"):
        torch.testing.assert_close(terms[name].double(), expected[name].double(), rtol=1e-12, atol=1e-12)

    inputs = [image, text, scale, logits] if clip_weight else [logits]
    expected_grads = torch.autograd.grad(sum(expected.values()), inputs)
    got_grads = torch.autograd.grad(ours(image, text, scale, logits, labels), inputs)
    for got, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_coca_loss_defaults_are_open_clips_training_defaults_and_padding_is_ignored() -> None:
    loss = CocaLoss()
    assert (loss.caption_loss_weight, loss.clip_loss_weight, loss.pad_id) == (2.0, 1.0, 0)
    image, text, scale, logits, labels = _loss_inputs()
    before = loss(image, text, scale, logits, labels)
    shifted = logits.detach().clone()
    shifted[labels == 0] += torch.randn_like(shifted[labels == 0]) * 10  # only padded positions change
    assert loss(image, text, scale, shifted, labels).item() == pytest.approx(before.item(), rel=1e-12)
    with pytest.raises(ValueError, match="do not match labels"):
        loss(image, text, scale, logits, labels[:, :-1])
