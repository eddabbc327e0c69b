"""Exports load in OpenCLIP and transformers (dev dependencies) and give clip_train's features; HF import too."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

import clip_train
from clip_train.data.transforms import normalize_on_device
from clip_train.export import export
from clip_train.export import main as export_main
from clip_train.models.clip import CLIP
from clip_train.models.config import ModelConfig, TextConfig, VisionConfig
from clip_train.train.checkpoint import write_checkpoint

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
CAPTIONS = ["a photo of a cat", "the digit seven", "two dogs playing in the snow, at night"]


def _features(model, images, tokens):
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(tokens)
    return image, text


def _hf_features(model, images, tokens):
    with torch.no_grad():
        image = model.get_image_features(pixel_values=images)
        text = model.get_text_features(input_ids=tokens)
    # Some transformers versions return a model output rather than the projected tensor.
    return getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)


def _trained_like(model: CLIP) -> CLIP:
    """Perturb every weight so that zero biases, unit LayerNorm gains etc. cannot hide a mapping mistake."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    tokens = clip_train.get_tokenizer("tiny")(CAPTIONS + ["x"])
    return images, tokens


@pytest.mark.parametrize("name", ["tiny", "tiny-quickgelu"])
def test_hf_export_matches_in_transformers(tmp_path, inputs, name):
    torch.manual_seed(0)
    model = _trained_like(clip_train.create_model(name))
    export(model, "hf", tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.text_config.hidden_act == ("quick_gelu" if name.endswith("quickgelu") else "gelu")
    ours, theirs = _features(model, *inputs), _hf_features(hf, *inputs)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < TOL
    assert torch.allclose(hf.logit_scale.detach(), model.logit_scale.detach())


def test_hf_processor_matches_our_tokenizer_and_normalisation(tmp_path):
    model = clip_train.create_model("tiny")
    export(model, "hf", tmp_path / "hf")
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    ours = clip_train.get_tokenizer("tiny")(CAPTIONS)
    theirs = processor.tokenizer(CAPTIONS).input_ids
    for row, ids in zip(ours, theirs):
        assert row[: len(ids)].tolist() == ids  # ours pads with zeros after the end token
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    from PIL import Image

    hf_pixels = processor.image_processor(Image.fromarray(pixels), return_tensors="pt").pixel_values
    our_pixels = normalize_on_device(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    assert (hf_pixels - our_pixels).abs().max().item() < 1e-4


def _smooth_image(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([127 + 100 * np.sin(x / width * 3 * np.pi), 127 + 100 * np.cos(y / height * 2 * np.pi),
                     (x + y) / (width + height) * 255], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("size, fmt", [((96, 64), "PNG"), ((75, 130), "PNG"), ((640, 480), "JPEG")])
def test_hf_processor_resizes_and_crops_larger_images_like_our_eval_transform(tmp_path, size, fmt):
    import io

    from PIL import Image

    from clip_train.data.decode import SampleDecoder

    export(clip_train.create_model("tiny"), "hf", tmp_path / "hf")
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    buffer = io.BytesIO()
    Image.fromarray(_smooth_image(*size)).save(buffer, format=fmt)
    data = buffer.getvalue()
    hf_pixels = processor.image_processor(Image.open(io.BytesIO(data)), return_tensors="pt").pixel_values
    ours = SampleDecoder(32, train=False).image({fmt.lower().replace("jpeg", "jpg"): data}, None)
    our_pixels = normalize_on_device(torch.tensor(np.array(ours)).permute(2, 0, 1)[None])
    assert hf_pixels.shape == our_pixels.shape == (1, 3, 32, 32)
    diff = (hf_pixels - our_pixels).abs()
    level = 1 / 255 / 0.26  # one grey level after CLIP's normalisation, about 0.015
    if size == (96, 64):  # whole multiples of 32: the same sampling grid, rounding apart
        assert diff.max().item() < 1.01 * level
        return
    # Our eval crop is torchvision's (OpenCLIP's, OpenAI's): offset int(round(margin / 2)); transformers floors
    # it, so on an odd margin (75x130: 23 resized pixels) the two crops sit one resized pixel apart. Compare
    # with ours resampled from transformers' box: what is tested is the processor's size, filter and statistics.
    from clip_train.data.transforms import crop_resize

    width, height = size
    resized_long = int(32 * max(size) / min(size))
    start = (resized_long - 32) // 2 * max(size) / resized_long
    end = start + 32 * max(size) / resized_long
    box = (start, 0, end, height) if width >= height else (0, start, width, end)
    floor_pixels = crop_resize(Image.open(io.BytesIO(data)), box, 32)
    diff = (hf_pixels - normalize_on_device(torch.tensor(np.array(floor_pixels)).permute(2, 0, 1)[None])).abs()
    assert diff.max().item() < 1.01 * level  # the same pixels, rounding apart (JPEG too, draft decoding and all)


def test_open_clip_export_loads_by_dir_and_by_name(open_clip_registry, tmp_path, inputs):
    torch.manual_seed(0)
    model = _trained_like(clip_train.create_model("tiny"))
    files = export(model, "open_clip", tmp_path / "oc")
    assert {f.name for f in files} == {"open_clip_config.json", "open_clip_model.safetensors", "tiny.json"}
    ours = _features(model, *inputs)
    from_dir = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    open_clip.add_model_config(tmp_path / "oc" / "tiny.json")
    by_name = open_clip.create_model("tiny", pretrained=str(tmp_path / "oc" / "open_clip_model.safetensors")).eval()
    for oc_model in (from_dir, by_name):
        for a, b in zip(ours, _features(oc_model, *inputs)):
            assert (a - b).abs().max().item() < TOL
    # ...and back into clip_train from the directory, by either spelling, with OpenCLIP's tokenizer for it.
    for again in (clip_train.create_model(pretrained=tmp_path / "oc"), clip_train.create_model(f"local-dir:{tmp_path / 'oc'}"),
                  clip_train.create_model(pretrained=f"local-dir:{tmp_path / 'oc'}")):  # as CLIP_benchmark users write it
        for a, b in zip(ours, _features(again.eval(), *inputs)):
            assert (a - b).abs().max().item() < TOL
    captions = ["a photo of a cat", "two dogs playing in the snow, far too long for sixteen tokens of context"]
    ours_tok, theirs_tok = (clip_train.get_tokenizer(f"local-dir:{tmp_path / 'oc'}"),
                            open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}"))
    assert torch.equal(ours_tok(captions), theirs_tok(captions)) and ours_tok(captions).shape[1] == 16


def test_open_clip_export_of_a_timm_trunk_at_another_size_says_how_openclip_reads_it(
    open_clip_registry, tmp_path, capsys
):
    """OpenCLIP loads weights before force_image_size resizes a timm trunk: the note's recipe gives our features."""
    from safetensors.torch import load_file

    cfg = ModelConfig(name="timm-vit-64", embed_dim=32,
                      vision=VisionConfig(image_size=64, patch_size=None, timm_model_name="vit_tiny_patch16_224",
                                          timm_pool="token", timm_proj="linear"),
                      text=TextConfig(context_length=16, width=32, heads=1, layers=1))
    torch.manual_seed(0)
    model = _trained_like(CLIP(cfg))
    files = export(model, "open_clip", tmp_path / "oc")
    note = capsys.readouterr().err.strip()
    assert len(note.splitlines()) == 1 and "vit_tiny_patch16_224 at timm's 224x224" in note
    assert f"open_clip.add_model_config('{files[2]}')" in note
    assert "open_clip.create_model('timm-vit-64', force_image_size=64)" in note
    with pytest.raises(RuntimeError, match="size mismatch for visual.trunk.pos_embed"):  # what the note says
        open_clip.create_model(f"local-dir:{tmp_path / 'oc'}")
    open_clip.add_model_config(files[2])
    theirs = open_clip.create_model("timm-vit-64", force_image_size=64)
    theirs.load_state_dict(load_file(files[1]))
    images = torch.randn(2, 3, 64, 64)
    tokens = clip_train.get_tokenizer(context_length=16)(CAPTIONS[:2])
    ours = _features(model, images, tokens)
    for a, b in zip(ours, _features(theirs.eval(), images, tokens)):
        assert (a - b).abs().max().item() < TOL
    again = clip_train.create_model(pretrained=tmp_path / "oc").eval()  # and back, with no resize needed
    for a, b in zip(ours, _features(again, images, tokens)):
        assert torch.equal(a, b)


def _small_resnet() -> CLIP:
    cfg = ModelConfig(
        name="rn-test", embed_dim=32,
        vision=VisionConfig(image_size=64, layers=[1, 1, 1, 1], width=8, patch_size=None),
        text=TextConfig(context_length=16, width=64, heads=1, layers=1),
    )
    return _trained_like(CLIP(cfg))


def test_resnet_open_clip_export_matches_and_hf_refuses_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    model = _small_resnet()
    images = torch.randn(2, 3, 64, 64)
    tokens = clip_train.get_tokenizer(context_length=16)(CAPTIONS[:2])
    export(model, "open_clip", tmp_path / "oc")
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    for a, b in zip(_features(model, images, tokens), _features(oc_model, images, tokens)):
        assert (a - b).abs().max().item() < TOL

    export(model, "safetensors", tmp_path / "rn.safetensors")
    assert export_main([str(tmp_path / "rn.safetensors"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ModifiedResNet" in err and "--format open_clip" in err
    assert not (tmp_path / "hf").exists()


def test_safetensors_keeps_architecture_and_loads_in_open_clip(open_clip_registry, tmp_path, inputs):
    torch.manual_seed(0)
    model = _trained_like(clip_train.create_model("tiny-quickgelu"))
    export(model, "safetensors", tmp_path / "m.safetensors", dtype="fp32")
    again = clip_train.create_model(pretrained=tmp_path / "m.safetensors").eval()
    assert again.config.quick_gelu and again.config.name == "tiny-quickgelu"
    ours = _features(model, *inputs)
    for a, b in zip(ours, _features(again, *inputs)):
        assert torch.equal(a, b)
    export(model, "open_clip", tmp_path / "oc")  # registers the architecture under tiny-quickgelu.json
    open_clip.add_model_config(tmp_path / "oc" / "tiny-quickgelu.json")
    oc_model = open_clip.create_model("tiny-quickgelu", pretrained=str(tmp_path / "m.safetensors")).eval()
    for a, b in zip(ours, _features(oc_model, *inputs)):
        assert (a - b).abs().max().item() < TOL


def test_import_from_transformers_saved_clip(tmp_path, inputs):
    """Weights written by transformers itself (not by our exporter) load with create_model(pretrained=DIR)."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "max_position_embeddings": 16},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 3,
                           "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )
    hf = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(0.05 * torch.randn_like(param))
    hf.save_pretrained(tmp_path / "hf")
    model = clip_train.create_model(pretrained=tmp_path / "hf").eval()
    assert model.config.quick_gelu  # transformers' default activation
    assert model.config.vision.width // model.config.vision.head_width == 3
    for a, b in zip(_features(model, *inputs), _hf_features(hf, *inputs)):
        assert (a - b).abs().max().item() < TOL


def test_cli_exports_a_training_checkpoint(tmp_path, inputs, capsys):
    torch.manual_seed(0)
    model = _trained_like(clip_train.create_model("tiny"))
    state = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}
    write_checkpoint(tmp_path / "run" / "checkpoints", 7, state)
    assert export_main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert str(tmp_path / "hf" / "model.safetensors") in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    for a, b in zip(_features(model, *inputs), _hf_features(hf, *inputs)):
        assert (a - b).abs().max().item() < TOL
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["clip_train_model_name"] == "tiny"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err
    model = clip_train.create_model("tiny")
    export(model, "safetensors", tmp_path / "m.safetensors")
    assert export_main([str(tmp_path / "m.safetensors"), "--format", "safetensors", "--out",
                        str(tmp_path / "x.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_hf_directory_imports_by_name_and_a_wrong_name_is_refused(tmp_path, inputs):
    torch.manual_seed(0)
    model = _trained_like(clip_train.create_model("tiny"))
    export(model, "hf", tmp_path / "hf")
    named = clip_train.create_model("tiny", pretrained=tmp_path / "hf").eval()
    for a, b in zip(_features(model, *inputs), _features(named, *inputs)):
        assert (a - b).abs().max().item() < TOL
    with pytest.raises(clip_train.models.CheckpointError, match="shape|missing|unexpected"):
        clip_train.create_model("ViT-B-32", pretrained=tmp_path / "hf")
