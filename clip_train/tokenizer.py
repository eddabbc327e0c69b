"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), giving the same ids as OpenAI's and OpenCLIP's.

Text is cleaned (ftfy, HTML entities unescaped twice, whitespace collapsed, lower-cased), split by CLIP's
regex, mapped byte by byte onto printable unicode symbols, merged with the vendored BPE merges, and
wrapped in start/end tokens inside a fixed context.
"""

from __future__ import annotations

import gzip
import heapq
import html
from functools import lru_cache
from importlib import resources
from itertools import pairwise

import ftfy
import regex
import torch

DEFAULT_CONTEXT_LENGTH = 77
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary keeps the first 48,894 merges of the file
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# Bounds that keep a caption's cost independent of its length (see ``ClipTokenizer.encode``).
TEXT_CUT_CHARS = 4096  # longer texts are cleaned and split over a head that grows as needed
WORD_CUT_BYTES = 256  # longer words are merged over a head (BPE is up to quadratic in a word's length)
WORD_BYTES_PER_TOKEN = 8  # a word head's first size: this many bytes per token still needed, plus the margin
CUT_MARGIN_BYTES = 64  # tokens ending this close to a head's cut are dropped (no token is over 32 bytes)


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the others (controls, space, ...) are shifted to code points
    from 256 upwards, so every BPE symbol is a visible character and no byte is lost.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping  # insertion order (printable first) is the order of the vocabulary's first 256 entries


def clean_text(text: str) -> str:
    """Fix mojibake, unescape HTML entities (twice: captions are often double-escaped), collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Callable tokenizer: ``str | list[str] -> LongTensor[N, context_length]``, zero-padded.

    Rows longer than the context are truncated so that the end-of-text token stays last.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, bpe_path: str | None = None) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must leave room for the start and end tokens, got {context_length}")
        self.context_length = context_length
        merges = self._read_merges(bpe_path)
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_OF_TEXT, END_OF_TEXT]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: token for token, i in self.encoder.items()}
        self.merge_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = byte_symbols()
        self.byte_decoder = {s: b for b, s in self.byte_encoder.items()}
        self.sot_token_id = self.encoder[START_OF_TEXT]
        self.eot_token_id = self.encoder[END_OF_TEXT]
        self.vocab_size = len(vocab)
        # The special tokens come first so they are matched whole; the rest is CLIP's word splitter.
        self.pattern = regex.compile(
            rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
        self._word_cache: dict[str, list[int]] = {
            START_OF_TEXT: [self.sot_token_id],
            END_OF_TEXT: [self.eot_token_id],
        }

    @staticmethod
    def _read_merges(bpe_path: str | None) -> list[tuple[str, str]]:
        if bpe_path is None:
            raw = resources.files("clip_train.assets").joinpath(_BPE_FILE).read_bytes()
        else:
            with open(bpe_path, "rb") as f:
                raw = f.read()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{bpe_path or _BPE_FILE} is not CLIP's BPE merges file (expected {NUM_MERGES} merges)")
        return merges  # type: ignore[return-value]

    def _bpe(self, word: str, final: bool = True) -> list[str]:
        """Merge the symbols of one word, lowest-ranked pair first, until no known pair remains.

        ``final=False`` leaves the end-of-word marker off the last symbol: the symbols are a word's head
        and the word goes on after them.
        """
        parts = list(word[:-1]) + [word[-1] + "</w>"] if final else list(word)
        while len(parts) > 1:
            pairs = set(pairwise(parts))
            best = min(pairs, key=lambda p: self.merge_ranks.get(p, float("inf")))
            if best not in self.merge_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _bpe_heap(self, word: str, final: bool = True) -> list[str]:
        """The same merges as ``_bpe`` in O(n log n) rather than O(n^2): for long word heads.

        Symbols form a linked list and candidate pairs a heap ordered by (rank, position). ``_bpe`` merges
        every occurrence of the lowest-ranked pair left to right before looking again; popping by (rank,
        position) does the same because every pair a merge creates ranks above the merge itself (a merge
        only uses symbols made by earlier merges; checked for the whole file by the tests).
        """
        parts = list(word[:-1]) + [word[-1] + "</w>"] if final else list(word)
        n = len(parts)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, str, str]] = []
        ranks = self.merge_ranks

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                rank = ranks.get((parts[i], parts[j]))
                if rank is not None:
                    heapq.heappush(heap, (rank, i, parts[i], parts[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if parts[i] is not None else n
            if j >= n or parts[i] != left or parts[j] != right:
                continue  # stale: one side was merged since this pair was pushed
            parts[i] = left + right
            parts[j] = None  # type: ignore[call-overload]
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [p for p in parts if p is not None]

    def _encode_word(self, word: str, budget: int | None = None, open_end: bool = False) -> list[int]:
        """BPE ids of one word; with ``budget``, at most that many, and bounded work however long the word.

        BPE costs up to quadratic time in a word's length, so a word longer than ``WORD_CUT_BYTES`` (or one
        that the caller cut, ``open_end``) is merged only over its head: the head's tokens that end at least
        ``CUT_MARGIN_BYTES`` before the cut are the word's own first tokens (a merge reaches back from the
        cut by less than one token, and no token is longer than 32 bytes). The head doubles until it holds
        ``budget`` such tokens or is the whole word.
        """
        data = word.encode("utf-8")
        exact = budget is None or (not open_end and len(data) <= WORD_CUT_BYTES)
        if exact:
            ids = self._word_cache.get(word)
            if ids is None:
                ids = [self.encoder[p] for p in self._bpe("".join(self.byte_encoder[b] for b in data))]
                if len(self._word_cache) < 500_000:  # bounded: caption streams have a long tail of words
                    self._word_cache[word] = ids
            return ids if budget is None else ids[:budget]
        head = max(WORD_CUT_BYTES, WORD_BYTES_PER_TOKEN * budget + CUT_MARGIN_BYTES)
        while True:
            whole = head >= len(data) and not open_end
            symbols = "".join(self.byte_encoder[b] for b in data[:head])
            parts = self._bpe_heap(symbols, final=whole)
            if not whole:  # keep only the tokens the cut cannot have changed
                end, kept = 0, []
                for part in parts:
                    end += len(part)
                    if end > len(symbols) - CUT_MARGIN_BYTES:
                        break
                    kept.append(part)
                parts = kept
            if whole or len(parts) >= budget or head >= len(data):
                return [self.encoder[p] for p in parts[:budget]]
            head *= 2

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """BPE ids of ``text`` without start/end tokens; with ``max_tokens``, its first ``max_tokens`` ids.

        With ``max_tokens`` the work is bounded whatever the text: a text over ``TEXT_CUT_CHARS`` characters
        is cleaned and split only over a head (growing until it yields enough tokens) and overlong words are
        merged only over their heads (``_encode_word``), so a 1 MB caption costs about what a short one does.
        The ids are the same as without the bound for every text up to ``TEXT_CUT_CHARS`` characters whose
        words are at most ``WORD_CUT_BYTES`` long, and in practice for longer ones too (tested against
        unbounded BPE and OpenCLIP's tokenizer).
        """
        if max_tokens is None:
            ids: list[int] = []
            for word in self.pattern.findall(clean_text(text)):
                ids.extend(self._encode_word(word))
            return ids
        if max_tokens <= 0:
            return []
        chars = max(TEXT_CUT_CHARS, 64 * max_tokens)
        while True:
            cut = len(text) > chars
            words = self.pattern.findall(clean_text(text[:chars] if cut else text))
            ids = []
            for i, word in enumerate(words):
                if len(ids) >= max_tokens:
                    break
                # The head's last word may continue past the cut: only its safe tokens count.
                ids.extend(self._encode_word(word, max_tokens - len(ids), open_end=cut and i == len(words) - 1))
            if len(ids) >= max_tokens or not cut:
                return ids[:max_tokens]
            chars *= 4

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text from ids; special tokens and padding are dropped, word ends become spaces."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {0, self.sot_token_id, self.eot_token_id}
        symbols = "".join(self.decoder[i] for i in ids if i not in specials)
        words = [bytes(self.byte_decoder[c] for c in word) for word in symbols.split("</w>")]
        return b" ".join(words).decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text, max_tokens=context_length - 2), self.eot_token_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@lru_cache(maxsize=8)
def _cached_tokenizer(context_length: int) -> ClipTokenizer:
    return ClipTokenizer(context_length)


def get_tokenizer(name: str | None = None, context_length: int | None = None) -> ClipTokenizer:
    """The tokenizer for model ``name`` (its context length), or CLIP's default 77-token one.

    Tokenizers are cached per context length: building one reads 48,894 merges.
    """
    if context_length is None:
        if name is None:
            context_length = DEFAULT_CONTEXT_LENGTH
        else:
            from clip_train.models.registry import get_model_config

            context_length = get_model_config(name).text.context_length
    return _cached_tokenizer(context_length)
