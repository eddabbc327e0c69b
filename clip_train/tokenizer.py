"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), giving the same ids as OpenAI's and OpenCLIP's.

Text is cleaned (ftfy, HTML entities unescaped twice, whitespace collapsed, lower-cased), split by CLIP's
regex, mapped byte by byte onto printable unicode symbols, merged with the vendored BPE merges, and
wrapped in start/end tokens inside a fixed context.
"""

from __future__ import annotations

import gzip
import heapq
import html
import string
from functools import lru_cache
from importlib import resources
from itertools import pairwise
from pathlib import Path

import ftfy
import regex
import torch

from clip_train.errors import reason
from clip_train.models.registry import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, hub_name_message

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


# ---------------------------------------------------------------------------------------------------------
# Hugging Face / SentencePiece tokenizers, for text towers that were trained with one (SigLIP, XLM-RoBERTa,
# mT5, NLLB, MetaCLIP 2, CLIPA). They load from local files only: ``hf:PATH``.
# ---------------------------------------------------------------------------------------------------------

HF_PREFIX = "hf:"
"""``get_tokenizer('hf:PATH')`` / ``tokenizer=hf:PATH``: a local Hugging Face tokenizer directory (or tokenizer.json)."""
HF_CLEAN_MODES = ("whitespace", "lower", "canonicalize")


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def hf_clean_text(text: str, mode: str = "whitespace") -> str:
    """OpenCLIP's cleaning before an HF tokenizer: mojibake fixed, HTML unescaped twice, whitespace collapsed;
    ``lower`` also lower-cases; ``canonicalize`` (SigLIP) also turns ``_`` into spaces and drops ASCII
    punctuation, then lower-cases."""
    if mode not in HF_CLEAN_MODES:
        raise ValueError(f"tokenizer clean={mode!r} is not one of {HF_CLEAN_MODES}")
    text = _basic_clean(text)
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    elif mode == "lower":
        text = text.lower()
    return " ".join(text.split())


class HFTokenizer:
    """Callable Hugging Face tokenizer: ``str | list[str] -> LongTensor[N, context_length]``.

    Rows are cleaned (``hf_clean_text``), tokenized with the tokenizer's own special tokens, truncated to
    ``context_length`` and padded with its pad token, as OpenCLIP's ``HFTokenizer`` does.

    Args:
        path: a local directory holding the tokenizer's files (``tokenizer.json``, or SentencePiece
            ``*.model`` with ``tokenizer_config.json``), or a ``tokenizer.json`` file. Nothing downloads.
        context_length: tokens per row.
        clean: ``whitespace`` (default), ``lower`` or ``canonicalize``.
        strip_sep_token: replace the separator token by padding id 0 (OpenCLIP's CLIPA models).
        language: source language for tokenizers that take one (NLLB: ``eng_Latn``, ...).
    """

    def __init__(
        self,
        path: str,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        language: str | None = None,
    ) -> None:
        if clean not in HF_CLEAN_MODES:
            raise ValueError(f"tokenizer clean={clean!r} is not one of {HF_CLEAN_MODES}")
        self.path = path
        self.context_length = context_length
        self.clean = clean
        self.strip_sep_token = strip_sep_token
        self.tokenizer = _load_hf_tokenizer(path)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                f"tokenizer {HF_PREFIX}{path} names no padding token; add \"pad_token\" to its tokenizer_config.json"
            )
        if language is not None:
            self.set_language(language)

    def set_language(self, language: str) -> None:
        """Select the source language (NLLB-style tokenizers prefix a language token)."""
        set_lang = getattr(self.tokenizer, "set_src_lang_special_tokens", None)
        if not callable(set_lang):
            raise ValueError(f"tokenizer {HF_PREFIX}{self.path} takes no language")  # noqa: TRY004 - a config error, reported in one line
        set_lang(language)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        cleaned = [hf_clean_text(t, self.clean) for t in texts]
        ids = self.tokenizer(
            cleaned, max_length=context_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids.long()
        if self.strip_sep_token and self.tokenizer.sep_token_id is not None:
            ids = ids.masked_fill(ids == self.tokenizer.sep_token_id, 0)
        return ids


def _load_hf_tokenizer(path: str):  # -> transformers.PreTrainedTokenizerBase
    """An HF tokenizer from local files only; one line naming the problem otherwise."""
    location = Path(path).expanduser()
    if not location.exists():
        raise FileNotFoundError(
            f"tokenizer {HF_PREFIX}{path}: no such file or directory (give a local Hugging Face tokenizer directory)"
        )
    try:
        import transformers
    except ImportError as err:
        raise ImportError("HF tokenizers need transformers: pip install 'clip-train[hf]'") from err
    if location.is_file():
        if location.suffix != ".json":
            raise ValueError(f"tokenizer {HF_PREFIX}{path}: a single file must be a tokenizer.json; else give its directory")
        return transformers.PreTrainedTokenizerFast(tokenizer_file=str(location))
    try:
        return transformers.AutoTokenizer.from_pretrained(str(location), local_files_only=True)
    except Exception as err:  # for unusable files transformers raises more than OSError and ValueError
        bare = location / "tokenizer.json"
        if bare.is_file() and not (location / "tokenizer_config.json").is_file():
            # transformers 4 finds no class to pick for a directory holding only a tokenizer.json; 5 loads it,
            # with the same ids as the file itself gives.
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(bare))
        why = reason(err)
        if not isinstance(err, (OSError, ValueError)) and why != type(err).__name__:  # a failure inside transformers
            why = f"{type(err).__name__}: {why}"
        raise ValueError(f"tokenizer {HF_PREFIX}{path} could not be loaded: {why}") from err


def _openclip_text_cfg(name: str) -> dict | None:
    """The ``text_cfg`` of OpenCLIP's JSON model config for ``name`` (``-quickgelu`` stripped), if there is one.

    Read from the configs vendored with the translator when present, else from an installed open_clip.
    """
    try:
        from clip_train.models import openclip_config  # the vendored configs and their translator
    except ImportError:
        openclip_config = None
    base = name.removesuffix("-quickgelu")
    if openclip_config is not None:
        for candidate in (name, base):
            try:
                return openclip_config.openclip_json(candidate).get("text_cfg", {})
            except KeyError:
                continue
        return None
    import importlib.util
    import json

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    config_dir = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    for candidate in (name, base):
        path = config_dir / f"{candidate}.json"
        if path.is_file():
            return json.loads(path.read_text()).get("text_cfg", {})
    return None


def required_hf_tokenizer(name: str | None) -> str | None:
    """The Hugging Face tokenizer model ``name``'s text tower was trained with (OpenCLIP's
    ``hf_tokenizer_name``, e.g. ``xlm-roberta-base``), or None when CLIP's BPE serves it."""
    if not name:
        return None
    text_cfg = _openclip_text_cfg(name) or {}
    return text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name") or None


def model_tokenizer_need(model_cfg) -> str | None:  # model_cfg: clip_train.models.config.ModelConfig
    """The HF tokenizer a model config's text tower needs: the one its config names (``text.hf_tokenizer_name``,
    carried by checkpoints and exports), else its OpenCLIP name's, else its HF text model's."""
    text = model_cfg.text
    return (getattr(text, "hf_tokenizer_name", None) or required_hf_tokenizer(model_cfg.name)
            or getattr(text, "hf_model_name", None) or None)


def get_model_tokenizer(model_cfg, tokenizer: str | None = None) -> ClipTokenizer | HFTokenizer:
    """The tokenizer for a built model's config (any name; context length from the config), as the training
    app, the eval CLI and export use it; ``tokenizer`` is ``hf:PATH`` or None. An HF tokenizer takes the
    config's ``text.tokenizer_kwargs`` (else its OpenCLIP name's)."""
    needed = model_tokenizer_need(model_cfg)
    if tokenizer is None and needed:
        raise ValueError(missing_tokenizer_message(model_cfg.name, needed))
    if tokenizer is None or not tokenizer.startswith(HF_PREFIX):
        return get_tokenizer(model_cfg.name, model_cfg.text.context_length, tokenizer=tokenizer)
    options = getattr(model_cfg.text, "tokenizer_kwargs", None) or (_openclip_text_cfg(model_cfg.name) or {}).get(
        "tokenizer_kwargs") or {}
    return HFTokenizer(tokenizer[len(HF_PREFIX):], context_length=model_cfg.text.context_length, **dict(options))


def missing_tokenizer_message(name: str, needed: str) -> str:
    """One line: which tokenizer ``name`` needs and how to pass it."""
    return (
        f"model {name} needs the Hugging Face tokenizer {needed!r}, which is not downloaded: pass a local "
        f"directory with its files as tokenizer=hf:PATH (Python: get_tokenizer({name!r}, tokenizer='hf:PATH'))"
    )


def get_tokenizer(
    name: str | None = None, context_length: int | None = None, tokenizer: str | None = None
) -> ClipTokenizer | HFTokenizer:
    """The tokenizer for model ``name``, or CLIP's default 77-token BPE.

    Args:
        name: a model name (its context length and tokenizer options), or ``hf:PATH`` for a local Hugging
            Face tokenizer on its own.
        context_length: tokens per row; defaults to the model's (77 without a model).
        tokenizer: ``hf:PATH`` to use a local Hugging Face tokenizer for model ``name``; models whose text
            tower needs one (SigLIP, XLM-RoBERTa, mT5, NLLB, ...) refuse to fall back to CLIP's BPE.

    CLIP BPE tokenizers are cached per context length: building one reads 48,894 merges.
    """
    if name is not None and name.startswith(HF_PREFIX):
        name, tokenizer = None, name
    if name is not None and name.startswith(HF_HUB_PREFIX):
        raise ValueError(hub_name_message(name.removeprefix(HF_HUB_PREFIX)))
    if tokenizer is not None and not tokenizer.startswith(HF_PREFIX):
        raise ValueError(f"tokenizer={tokenizer!r}: use hf:PATH (a local Hugging Face tokenizer), or leave it unset")
    if name is not None and name.startswith(LOCAL_DIR_PREFIX):
        # OpenCLIP's local-dir:DIR: DIR's open_clip_config.json stands in for the model name's config, and
        # a text tower with hf_tokenizer_name reads its tokenizer from DIR itself.
        folder = Path(name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
        text_cfg = _local_dir_text_cfg(folder)
        if tokenizer is None and text_cfg.get("hf_tokenizer_name"):
            tokenizer = f"{HF_PREFIX}{folder}"
        if context_length is None:
            context_length = int(text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH))
        name = None
    else:
        text_cfg = _openclip_text_cfg(name) if name else None
    needed = required_hf_tokenizer(name)
    if tokenizer is None and needed:
        raise ValueError(missing_tokenizer_message(name, needed))  # type: ignore[arg-type]
    if context_length is None:
        context_length = _model_context_length(name, text_cfg)
    if tokenizer is None:
        return _cached_tokenizer(context_length)
    options = dict((text_cfg or {}).get("tokenizer_kwargs") or {})  # OpenCLIP's per-model options (clean, ...)
    return HFTokenizer(tokenizer[len(HF_PREFIX) :], context_length=context_length, **options)


def _local_dir_text_cfg(folder: Path) -> dict:
    """The ``text_cfg`` of ``folder/open_clip_config.json`` (an OpenCLIP export, or a hub repository fetched
    with ``hf download``)."""
    from clip_train.models.pretrained import read_open_clip_config

    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{LOCAL_DIR_PREFIX}{folder}: no open_clip_config.json there (an OpenCLIP "
                                "export or a hub download holds one)")
    text_cfg = (read_open_clip_config(folder) or {}).get("text_cfg") or {}
    if not isinstance(text_cfg, dict):
        raise ValueError(  # noqa: TRY004 - bad input: the CLIs report ValueErrors in one line
            f"{config} is not OpenCLIP's config JSON (its text_cfg is no mapping); fix or re-export it")
    return text_cfg


def _model_context_length(name: str | None, text_cfg: dict | None) -> int:
    """Tokens per row of model ``name``: our registry's, else its OpenCLIP config's, else 77."""
    if name is None:
        return DEFAULT_CONTEXT_LENGTH
    from clip_train.models.registry import get_model_config

    try:
        return get_model_config(name).text.context_length
    except (KeyError, ValueError):
        if text_cfg is None:
            raise
        return int(text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH))

