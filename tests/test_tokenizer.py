"""The tokenizer must give exactly OpenCLIP's (and so OpenAI's) ids on any text."""

from __future__ import annotations

import importlib.metadata

import open_clip
import pytest
import torch

import clip_train
from clip_train.tokenizer import ClipTokenizer

EDGE_CASES = [
    "",
    "   \t\n  ",
    "a photo of a dog",
    "Tom &amp;amp; Jerry &lt;3 &quot;classic&quot;",
    "Crème brûlée at the café — naïve, ÉCOLE, Ångström",
    "party time 🎉🥳👩‍👩‍👧 👍🏽",
    "東京タワーの夜景 中文标题 한국어 문장",
    "Ünïcödé ﬁ ligature and mojibake: cafÃ©",
    "don't we'll they're I'm it's you've he'd",
    "numbers 1234567 and 3.14159, dates 2024-01-01",
    "punctuation!!! ??? ... --- *** ###",
    "word " * 1000,
    "x" * 5000,
    "<start_of_text> injected <end_of_text> tokens",
]


def real_english_lines(limit: int = 3000) -> list[str]:
    """Descriptions of the installed packages: thousands of lines of real English, found on any machine."""
    lines: list[str] = []
    for dist in importlib.metadata.distributions():
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        lines.extend(line.strip() for line in str(text).splitlines() if len(line.strip()) > 3)
        if len(lines) >= limit:
            break
    return lines[:limit]


@pytest.fixture(scope="module")
def reference() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-32")


def test_vocabulary_size_and_special_ids() -> None:
    tokenizer = clip_train.get_tokenizer()
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)


def test_thousands_of_real_lines_match_openclip(reference) -> None:
    lines = real_english_lines()
    assert len(lines) >= 2000, "expected package descriptions on the machine"
    ours = clip_train.get_tokenizer()(lines)
    theirs = reference(lines)
    mismatched = [line for line, a, b in zip(lines, ours, theirs) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} lines differ, e.g. {mismatched[:3]}"


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_cases_match_openclip(reference, text: str) -> None:
    assert torch.equal(clip_train.get_tokenizer()(text), reference(text))


def test_long_text_is_truncated_with_end_token_last() -> None:
    tokens = clip_train.get_tokenizer()("x" * 5000)
    assert tokens.shape == (1, 77)
    assert tokens[0, 0].item() == 49406 and tokens[0, -1].item() == 49407
    assert (tokens[0] != 0).all()


def test_model_context_length_and_padding() -> None:
    tokens = clip_train.get_tokenizer("tiny")(["a cat", "a much longer caption about two dogs"])
    assert tokens.shape == (2, 16)
    assert tokens[0, :4].tolist() == [49406, 320, 2368, 49407]
    assert (tokens[0, 4:] == 0).all()


def test_decode_inverts_encode_on_clean_text() -> None:
    tokenizer = ClipTokenizer()
    text = "a photo of the number seven written by hand"
    assert tokenizer.decode(tokenizer(text)[0]) == text


def test_tokenizer_pickles_for_dataloader_workers() -> None:
    import pickle

    tokenizer = clip_train.get_tokenizer()
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(clone("hello world"), tokenizer("hello world"))
