"""Hugging Face tokenizers from local files (``hf:PATH``) against OpenCLIP's HFTokenizer on the same files.

Each test trains a small tokenizer with the ``tokenizers`` package on a few sentences and saves it to a
temporary directory, so the whole path (files -> transformers -> ids) runs for real and nothing downloads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import clip_train
from clip_train.tokenizer import ClipTokenizer, HFTokenizer

SENTENCES = [
    "a photo of a cat", "a photo of a dog.", "Two dogs play in the snow!", "A red car on a street corner",
    "un chat noir sur le canapé", "the_quick brown fox jumps over the lazy dog", "Ein Hund läuft im Park.",
]
TEXTS = [
    "A photo of a CAT",
    "  two   dogs\tplay in the\nsnow!!  ",
    "Caf&amp;eacute; &lt;b&gt;au lait&lt;/b&gt;",  # HTML escaped twice
    "the_quick brown fox, jumps; over the lazy dog... and a red car on a street corner in the snow again",
    "â€œmojibakeâ€\x9d quotes",
    "",
]


def _wordpiece_dir(tmp_path: Path) -> Path:
    """A BERT-style WordPiece tokenizer: [CLS] ... [SEP], padding with [PAD]=0, saved as tokenizer.json only."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
    )
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    out = tmp_path / "wordpiece"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return out


def _byte_bpe_dir(tmp_path: Path) -> Path:
    """A RoBERTa-style byte-level BPE: <s> ... </s>, <pad>=1, saved the way transformers saves a tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    out = tmp_path / "bpe"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", sep_token="</s>").save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["wordpiece", "byte_bpe"])
@pytest.mark.parametrize("context_length", [8, 32])
def test_hf_tokenizer_from_a_local_dir_gives_openclips_ids(tmp_path: Path, kind: str, context_length: int) -> None:
    path = _wordpiece_dir(tmp_path) if kind == "wordpiece" else _byte_bpe_dir(tmp_path)
    ours = clip_train.get_tokenizer(f"hf:{path}", context_length=context_length)
    theirs = open_clip_tokenizer.HFTokenizer(str(path), context_length=context_length)
    got = ours(TEXTS)
    assert isinstance(ours, HFTokenizer)
    assert got.dtype == torch.long and got.shape == (len(TEXTS), context_length)
    assert torch.equal(got, theirs(TEXTS))
    assert torch.equal(ours(TEXTS[0]), theirs(TEXTS[0]))
    # Padded with the tokenizer's own pad id, truncated rows keep the closing special token.
    pad = ours.tokenizer.pad_token_id
    assert (got[-1, 2:] == pad).all()
    closing = got[-1, 1].item()  # the empty caption is just the opening and closing special tokens
    assert got[3, -1].item() == closing != pad


@pytest.mark.parametrize("clean,strip_sep", [("canonicalize", False), ("lower", False), ("whitespace", True)])
def test_cleaning_options_equal_openclips(tmp_path: Path, clean: str, strip_sep: bool) -> None:
    path = _byte_bpe_dir(tmp_path)
    ours = HFTokenizer(str(path), context_length=16, clean=clean, strip_sep_token=strip_sep)
    theirs = open_clip_tokenizer.HFTokenizer(str(path), context_length=16, clean=clean, strip_sep_token=strip_sep)
    assert torch.equal(ours(TEXTS), theirs(TEXTS))
    sep = ours.tokenizer.sep_token_id
    assert (sep in ours(TEXTS)) != strip_sep


def test_model_name_brings_openclips_tokenizer_options(tmp_path: Path) -> None:
    # ViT-B-16-SigLIP: context 64, clean=canonicalize (from its OpenCLIP config); files from hf:PATH.
    path = _wordpiece_dir(tmp_path)
    ours = clip_train.get_tokenizer("ViT-B-16-SigLIP", tokenizer=f"hf:{path}")
    theirs = open_clip_tokenizer.HFTokenizer(str(path), context_length=64, clean="canonicalize")
    assert ours.context_length == 64 and ours.clean == "canonicalize"
    assert torch.equal(ours(TEXTS), theirs(TEXTS))


def test_local_dir_reads_the_tokenizer_its_open_clip_config_names_as_openclip_does(tmp_path: Path) -> None:
    # A hub download or an OpenCLIP export: open_clip_config.json beside the tokenizer's own files.
    import json

    folder = _byte_bpe_dir(tmp_path)
    text_cfg = {"hf_tokenizer_name": "org/some-tokenizer", "context_length": 24, "tokenizer_kwargs": {"clean": "canonicalize"}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 8, "text_cfg": text_cfg}}))
    ours = clip_train.get_tokenizer(f"local-dir:{folder}")
    theirs = pytest.importorskip("open_clip").get_tokenizer(f"local-dir:{folder}")
    assert isinstance(ours, HFTokenizer) and torch.equal(ours(TEXTS), theirs(TEXTS)) and ours(TEXTS).shape[1] == 24
    with pytest.raises(FileNotFoundError, match="no open_clip_config.json there"):
        clip_train.get_tokenizer(f"local-dir:{tmp_path / 'elsewhere'}")
    with pytest.raises(ValueError, match="downloads nothing.*hf download org/some-tokenizer --local-dir DIR.*local-dir:DIR"):
        clip_train.get_tokenizer("hf-hub:org/some-tokenizer")


@pytest.mark.parametrize(
    "name,needed",
    [("xlm-roberta-base-ViT-B-32", "xlm-roberta-base"), ("ViT-SO400M-14-SigLIP", "timm/ViT-B-16-SigLIP"),
     ("nllb-clip-base", "facebook/nllb-200-distilled-600M"), ("ViT-H-14-worldwide", "facebook/xlm-v-base")],
)
def test_a_model_needing_an_hf_tokenizer_without_one_fails_in_one_line(name: str, needed: str) -> None:
    with pytest.raises(ValueError) as err:
        clip_train.get_tokenizer(name)
    message = str(err.value)
    assert "\n" not in message
    assert repr(needed) in message and "tokenizer=hf:PATH" in message


def test_clip_bpe_models_keep_clip_bpe() -> None:
    tokenizer = clip_train.get_tokenizer("ViT-B-16")
    assert isinstance(tokenizer, ClipTokenizer)
    assert torch.equal(tokenizer(TEXTS[:2]), open_clip_tokenizer.SimpleTokenizer()(TEXTS[:2]))


def test_bad_hf_paths_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        clip_train.get_tokenizer(f"hf:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not be loaded") as err:
        clip_train.get_tokenizer(f"hf:{tmp_path / 'empty'}")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="use hf:PATH"):
        clip_train.get_tokenizer("ViT-B-16", tokenizer=str(tmp_path))


def test_a_dir_holding_only_tokenizer_json_loads_where_transformers_finds_no_class(tmp_path: Path, monkeypatch) -> None:
    """transformers 4 refuses such a directory ("Unrecognized model ... Should have a `model_type` key", then
    every model type it knows); transformers 5 loads it. Ours gives the same ids either way, and a directory
    that cannot load still fails in one short line."""
    import transformers

    path = _wordpiece_dir(tmp_path)
    expected = clip_train.get_tokenizer(f"hf:{path}", context_length=16)(TEXTS)  # this transformers' own way

    def refuse_as_transformers_4(name, **kwargs):
        raise ValueError(f"Unrecognized model in {name}. Should have a `model_type` key in its config.json, or "
                         f"contain one of the following strings in its name: {', '.join(['bert'] * 400)}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse_as_transformers_4)
    got = clip_train.get_tokenizer(f"hf:{path}", context_length=16)
    assert torch.equal(got(TEXTS), expected)
    assert got.tokenizer.pad_token_id == 0  # [PAD], from the file's padding settings
    (path / "tokenizer_config.json").write_text("{}")  # now transformers' refusal is the answer
    with pytest.raises(ValueError, match="could not be loaded: Unrecognized model") as refused:
        clip_train.get_tokenizer(f"hf:{path}")
    assert "\n" not in str(refused.value) and len(str(refused.value)) < len(str(path)) + 320


def test_the_app_key_selects_the_tokenizer_and_refuses_a_missing_one(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from clip_train.config import ConfigError, TrainConfig, register_configs, validate

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    path = _wordpiece_dir(tmp_path)
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("train", overrides=["model=timm", "model.name=ViT-B-16-SigLIP", f"tokenizer=hf:{path}"])
        missing = compose("train", overrides=["model=timm", "model.name=ViT-B-16-SigLIP"])
    typed: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(typed, world_size=1, device_type="cpu")
    assert typed.tokenizer == f"hf:{path}"
    tokenizer = clip_train.get_tokenizer(typed.model.name, typed.model.text.context_length, tokenizer=typed.tokenizer)
    assert tokenizer(["a photo of a cat"]).shape == (1, typed.model.text.context_length)
    with pytest.raises(ConfigError, match="tokenizer=hf:PATH"):
        validate(OmegaConf.to_object(missing), world_size=1, device_type="cpu")  # type: ignore[arg-type]


def test_a_model_config_with_an_hf_text_tower_needs_an_hf_tokenizer(tmp_path: Path) -> None:
    import dataclasses

    from clip_train.models.registry import get_model_config
    from clip_train.tokenizer import get_model_tokenizer

    tiny = get_model_config("tiny")
    cfg = dataclasses.replace(tiny, name="my-xlmr", text=dataclasses.replace(tiny.text, hf_model_name="xlm-roberta-base"))
    with pytest.raises(ValueError, match="'xlm-roberta-base'.*tokenizer=hf:PATH"):
        get_model_tokenizer(cfg)
    path = _byte_bpe_dir(tmp_path)
    tokenizer = get_model_tokenizer(cfg, f"hf:{path}")
    assert tokenizer(["a cat"]).shape == (1, tiny.text.context_length)
    assert isinstance(get_model_tokenizer(tiny), ClipTokenizer)
