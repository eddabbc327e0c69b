"""The tokenizer's bounded path (cut text and overlong words before BPE) gives the unbounded ids.

``ClipTokenizer.__call__`` only needs each caption's first ``context_length - 2`` tokens, so it merges only
a head of a very long text or word. These tests pin that the ids do not change: against the tokenizer's own
unbounded ``encode`` and bit-exact against OpenCLIP's tokenizer, on varied real text and on long words.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
from importlib import resources

import open_clip
import pytest
import torch

from clip_train.tokenizer import ClipTokenizer, get_tokenizer


def _real_words(limit: int = 20000) -> list[str]:
    """Words of the installed packages' descriptions: real English (and code) found on any machine."""
    words: list[str] = []
    for dist in importlib.metadata.distributions():
        text = str(dist.metadata.get_payload() or dist.metadata.get("Description") or "")
        words.extend(text.split())
        if len(words) >= limit:
            break
    return words[:limit]


def _templates() -> list[str]:
    lines = []
    for name in ("templates_openai.txt", "templates_simple.txt"):
        text = resources.files("clip_train.assets").joinpath(name).read_text()
        lines.extend(line.strip() for line in text.splitlines() if "{}" in line)
    return lines


def _varied_captions(n: int, seed: int = 0) -> list[str]:
    """Templates filled with runs of real words, free word runs, and some very long texts (over the cut)."""
    rng = random.Random(seed)
    words, templates = _real_words(), _templates()
    extras = ["&amp;", "&quot;", "Crème", "café", "東京タワー", "🎉🥳", "don't", "it's", "1234567", "3.14",
              "#hashtag", "www.example.com/path?q=1", "ÉCOLE", "cafÃ©", "\t", "\n", "  "]
    captions = []
    for i in range(n):
        pool = words + extras * 20
        run = " ".join(rng.choice(pool) for _ in range(rng.choice([1, 2, 5, 12, 40, 120])))
        if i % 3 == 0:
            captions.append(rng.choice(templates).replace("{}", run))
        elif i % 60 == 1:  # longer than TEXT_CUT_CHARS: the head path
            captions.append(" ".join(rng.choice(pool) for _ in range(rng.choice([800, 1500]))))
        else:
            captions.append(run)
    return captions


def _long_words(seed: int = 1) -> list[str]:
    """Words longer than the word cut: joined real words, random letters, repeats, CJK, accents."""
    rng = random.Random(seed)
    real = [w for w in _real_words() if w.isalpha()]
    out = []
    for length in (257, 400, 1000, 2000):
        out.append("".join(rng.choice(real) for _ in range(length))[:length])
        out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)))
        out.append("".join(rng.choice("qxzjkvwy") for _ in range(length)))
        out.append("ab" * (length // 2) + "c")
        out.append("".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(length // 3)))
        out.append("".join(rng.choice("éèàüößñç") for _ in range(length // 2)))
    out += ["x" * 5000, "a" * 4999, "ab" * 2500]
    return out


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


def _unbounded(tokenizer: ClipTokenizer, texts: list[str], context: int,
               full: list[list[int]] | None = None) -> torch.Tensor:
    """What the tokenizer gave before the bound: the whole text merged (or ``full``), then truncated."""
    out = torch.zeros(len(texts), context, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = full[row] if full is not None else tokenizer.encode(text)
        ids = [tokenizer.sot_token_id, *ids][: context - 1] + [tokenizer.eot_token_id]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def test_varied_captions_equal_unbounded_and_openclip(ours, reference) -> None:
    captions = _varied_captions(1200)
    assert sum(len(c) > 4096 for c in captions) >= 15, "the sample must exercise the text cut"
    bounded = ours(captions)
    assert torch.equal(bounded, _unbounded(ours, captions, 77))
    theirs = reference(captions)
    mismatched = [c[:80] for c, a, b in zip(captions, bounded, theirs) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} captions differ from OpenCLIP, e.g. {mismatched[:3]}"


def test_long_words_keep_their_first_tokens(ours, reference) -> None:
    words = _long_words()
    # Alone, and after a few words followed by more text: the budget left differs.
    texts = words + [f"a photo of {w} and more" for w in words]
    full = [ours.encode(t) for t in texts]
    bounded = ours(texts)
    assert torch.equal(bounded, _unbounded(ours, texts, 77, full))
    assert torch.equal(bounded, reference(texts))
    assert torch.equal(ours(texts, context_length=16), _unbounded(ours, texts, 16, full))


def test_encode_max_tokens_is_a_prefix_of_encode(ours) -> None:
    for text in _varied_captions(200, seed=5) + _long_words(seed=7)[:6]:
        full = ours.encode(text)
        for budget in (1, 5, 75):
            assert ours.encode(text, max_tokens=budget) == full[:budget]


def test_every_merge_uses_only_symbols_of_earlier_merges(ours) -> None:
    """What makes the heap BPE equal to the pass-by-pass one (see ``ClipTokenizer._bpe_heap``)."""
    made = {s for s in ours.byte_encoder.values()} | {s + "</w>" for s in ours.byte_encoder.values()}
    for (left, right), _ in sorted(ours.merge_ranks.items(), key=lambda item: item[1]):
        assert left in made and right in made, (left, right)
        made.add(left + right)


def test_heap_bpe_equals_pass_by_pass_bpe(ours) -> None:
    rng = random.Random(3)
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "qxzj", "ab", "éèü東京", "aeiourst", "0123456789!?"]
    for _ in range(1500):
        alphabet = rng.choice(alphabets)
        word = "".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 3, 7, 20, 90])))
        symbols = "".join(ours.byte_encoder[b] for b in word.encode())
        for final in (True, False):
            assert ours._bpe_heap(symbols, final) == ours._bpe(symbols, final), (word, final)


def test_benchmark_prints_milliseconds_per_case_as_the_last_json_line(capsys) -> None:
    from clip_train.bench import tokenizer as bench

    bench.main(["--repeats", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["benchmark"] == "tokenizer"
    assert set(report["ms"]) == {"typical_caption", "one_word_1mb", "words_1mb", "one_word_20k"}
    assert all(ms > 0 for ms in report["ms"].values())
