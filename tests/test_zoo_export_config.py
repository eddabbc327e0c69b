"""What ``--format open_clip`` writes is OpenCLIP's own config: the model config of every zoo name, and the
tokenizer an HF-tokenized text tower needs (``open_clip.get_tokenizer('local-dir:OUT')``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("tokenizers")
from open_clip.coca_model import MultimodalCfg
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

import clip_train
from clip_train.export import main as export_main
from clip_train.models import create_model_from_config, get_model_config
from clip_train.models.openclip_config import split_quickgelu, to_openclip
from tests.test_hf_tokenizer import TEXTS, _wordpiece_dir
from tests.test_zoo_preprocess import small_siglip


def _with_defaults(section: dict, cls: type) -> dict:
    """``section`` over the defaults of OpenCLIP's config dataclass ``cls`` (what OpenCLIP builds from), as JSON."""
    full = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            full[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            full[f.name] = f.default_factory()
    full.update(section)
    return json.loads(json.dumps(full))  # tuples -> lists


def _normalised(doc: dict) -> dict:
    """OpenCLIP's model config filled with its defaults, differences OpenCLIP provably treats the same removed."""
    doc = json.loads(json.dumps(doc))
    coca = "multimodal_cfg" in doc
    vision = _with_defaults(doc.get("vision_cfg", {}), CLIPVisionCfg)
    text = _with_defaults(doc.get("text_cfg", {}), CLIPTextCfg)
    towers = [vision, text]
    out = {"embed_dim": doc["embed_dim"], "quick_gelu": bool(doc.get("quick_gelu", False)), "vision": vision,
           "text": text,
           # OpenCLIP builds CustomTextCLIP for any HF text tower whatever custom_text says (factory: is_hf_model),
           # and CoCa has its own class, which keeps the text tower under ``text.`` either way.
           "custom_text": bool(doc.get("custom_text")) or bool(text.get("hf_model_name")) or coca}
    if coca:
        out["multimodal"] = _with_defaults(doc["multimodal_cfg"], MultimodalCfg)
        towers.append(out["multimodal"])
        # OpenCLIP's CoCa unpacks (pooled, tokens) from both towers; our export says output_tokens so the
        # local-dir model returns them (without it OpenCLIP split the pooled batch), its own code assumes it.
        vision.pop("output_tokens"), text.pop("output_tokens")
    for tower in towers:
        # LayerNorm's default eps is 1e-5: norm_kwargs {'eps': 1e-5} builds the same layer as no norm_kwargs.
        if tower.get("norm_kwargs") in ({"eps": 1e-5}, None):
            tower["norm_kwargs"] = {}
    # Downloading pretrained trunk / HF weights: never in an export (the weights come with it), never here.
    vision.pop("timm_model_pretrained"), text.pop("hf_model_pretrained")
    return out


@pytest.mark.parametrize("chunk", range(4))
def test_to_openclip_gives_openclips_own_config_for_every_zoo_name(chunk: int) -> None:
    # OpenCLIP's shipped configs, read from its package: the reference is the JSON files themselves, whatever
    # add_model_config has registered in this process
    shipped = Path(open_clip.__file__).parent / "model_configs"
    names = sorted(p.stem for p in shipped.glob("*.json"))
    assert len(names) > 100 and set(names) <= set(open_clip.list_models())
    for name in names[chunk::4]:
        base, quick = split_quickgelu(name)
        reference = json.loads((shipped / f"{base}.json").read_text())
        reference["quick_gelu"] = bool(reference.get("quick_gelu")) or quick
        cfg = get_model_config(name)
        ours = to_openclip(cfg)
        assert _normalised(ours) == _normalised(reference), name
        # the logit bias is the one field export takes from the weights; its presence comes from the config
        assert (cfg.init_logit_bias is None) == (reference.get("init_logit_bias") is None), name
    # the tokenizer fields are among what is compared (they used to be dropped)
    assert to_openclip(get_model_config("ViT-L-14-CLIPA"))["text_cfg"]["tokenizer_kwargs"] == {"strip_sep_token": True}


def test_siglip_export_carries_its_tokenizer_to_openclip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tokenizer_dir = _wordpiece_dir(tmp_path)
    torch.manual_seed(0)
    model = create_model_from_config(small_siglip()).eval()
    weights = tmp_path / "weights.safetensors"
    from clip_train.export import export

    export(model, "safetensors", weights)
    out = tmp_path / "out"
    assert export_main([str(weights), "--format", "open_clip", "--out", str(out),
                        "--tokenizer", f"hf:{tokenizer_dir}"]) == 0
    text_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_tokenizer_name"] == "timm/ViT-B-16-SigLIP"
    assert text_cfg["tokenizer_kwargs"] == {"clean": "canonicalize"}

    theirs = open_clip.get_tokenizer(f"local-dir:{out}")
    ours = clip_train.get_tokenizer("ViT-B-16-SigLIP", tokenizer=f"hf:{tokenizer_dir}")
    assert type(theirs).__name__ == "HFTokenizer"  # not CLIP's BPE, which it silently fell back to before
    tokens = ours(TEXTS)
    assert tokens.shape == (len(TEXTS), 64)
    assert torch.equal(theirs(TEXTS), tokens)

    reference = open_clip.create_model(f"local-dir:{out}").eval()
    with torch.no_grad():
        assert (reference.encode_text(tokens, normalize=True) - model.encode_text(tokens, normalize=True)).abs().max() < 1e-4


def test_export_without_the_tokenizer_says_how_to_add_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = create_model_from_config(small_siglip()).eval()
    from clip_train.export import export

    export(model, "safetensors", tmp_path / "weights.safetensors")
    assert export_main([str(tmp_path / "weights.safetensors"), "--format", "open_clip", "--out",
                        str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer files" in err[0] and "--tokenizer hf:PATH" in err[0]
    assert (tmp_path / "out" / "open_clip_model.safetensors").is_file()
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    # a tokenizer that is not hf:PATH is refused in one line, exit 2
    assert export_main([str(tmp_path / "weights.safetensors"), "--format", "open_clip", "--out",
                        str(tmp_path / "out2"), "--tokenizer", str(tmp_path)]) == 2
    assert "hf:PATH" in capsys.readouterr().err


def test_export_of_a_run_takes_the_runs_tokenizer(tmp_path: Path) -> None:
    from clip_train.export import export, run_tokenizer

    tokenizer_dir = _wordpiece_dir(tmp_path)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(f"tokenizer: hf:{tokenizer_dir}\nmodel:\n  name: ViT-B-16-SigLIP\n")
    export(create_model_from_config(small_siglip()), "safetensors", run / "weights.safetensors")
    assert run_tokenizer(run / "weights.safetensors") == f"hf:{tokenizer_dir}"
    assert export_main([str(run / "weights.safetensors"), "--format", "open_clip", "--out", str(tmp_path / "out")]) == 0
    theirs = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'out'}")
    assert torch.equal(theirs(TEXTS), clip_train.get_tokenizer("ViT-B-16-SigLIP", tokenizer=f"hf:{tokenizer_dir}")(TEXTS))
