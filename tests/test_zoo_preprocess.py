"""Per-model image preprocessing against OpenCLIP: its pretrained configs' mean, std, interpolation and resize
mode reach our config, our eval transform, our device normalisation and our exports."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip")
from open_clip.pretrained import get_pretrained_cfg
from open_clip.transform import image_transform

from clip_train.data.decode import SampleDecoder
from clip_train.data.transforms import OPENAI_MEAN, OPENAI_STD, normalize_on_device
from clip_train.models import create_model_from_config, get_model_config
from clip_train.models.config import ModelConfig
from clip_train.models.openclip_config import PREPROCESS_FILE

DEFAULTS = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}


def _openclip_facts(name: str, tag: str) -> dict:
    """One pretrained config's preprocessing, unset keys as OpenCLIP's PreprocessCfg fills them."""
    cfg = get_pretrained_cfg(name, tag)
    return {key: tuple(cfg[key]) if key in ("mean", "std") and cfg.get(key) else cfg.get(key) or default
            for key, default in DEFAULTS.items()}


def _photo(width: int = 300, height: int = 200) -> Image.Image:
    """A smooth non-square RGB image with detail in every channel (so resampling filters matter)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([127 + 120 * np.sin(x / 7.0), 127 + 120 * np.cos(y / 5.0), 255 * (x + y) / (width + height)], -1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(cfg: ModelConfig, image: Image.Image) -> torch.Tensor:
    """Our eval decoder's uint8 ``[3, S, S]``, resized as the model says."""
    pre = cfg.preprocessing
    decoder = SampleDecoder(cfg.vision.image_size, train=False, resize_mode=pre.resize_mode,
                            interpolation=pre.interpolation)
    return torch.from_numpy(decoder.image({"png": _png(image)}, None).copy()).permute(2, 0, 1)


def _ours(cfg: ModelConfig, image: Image.Image) -> torch.Tensor:
    """Our eval path: decode + resize as the model says (uint8), then the device normalisation."""
    pre = cfg.preprocessing
    return normalize_on_device(_pixels(cfg, image)[None], mean=pre.mean, std=pre.std)[0]


def test_every_pretrained_name_gets_openclips_preprocessing_where_its_tags_agree() -> None:
    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    disagreeing = set(json.loads(PREPROCESS_FILE.read_text())["disagreeing"])
    assert {"ViT-L-14", "ViT-H-14"} <= disagreeing  # laion2b_s32b_b82k normalises with 0.5; dfn5b squashes
    differ = 0
    for name, name_tags in tags.items():
        facts = {json.dumps(_openclip_facts(name, t), sort_keys=True) for t in name_tags}
        expected = json.loads(facts.pop()) if len(facts) == 1 else dict(DEFAULTS)
        assert (name in disagreeing) == (len(facts) > 0), name
        pre = get_model_config(name).preprocessing
        got = {"mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation,
               "resize_mode": pre.resize_mode}
        assert got == {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in expected.items()}, name
        differ += got != {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                          "resize_mode": "shortest"}
    assert differ == 51  # SigLIP(2), nllb-siglip, PE-Core, MobileCLIP(2), CLIPA, the squashing worldwide/378 names
    # OpenAI's nine and names without a pretrained tag keep OpenAI's preprocessing
    assert get_model_config("ViT-B-16").preprocessing.mean == OPENAI_MEAN
    assert get_model_config("ViT-L-16").preprocessing.resize_mode == "shortest"


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "MobileCLIP-S1", "ViT-L-14-CLIPA"])
def test_our_eval_transform_equals_openclips_for_the_pretrained_config(name: str) -> None:
    cfg = get_model_config(name)
    tag = next(t for n, t in open_clip.list_pretrained() if n == name)
    facts = _openclip_facts(name, tag)
    size = cfg.vision.image_size
    reference = image_transform(size, is_train=False, mean=facts["mean"], std=facts["std"],
                                interpolation=facts["interpolation"], resize_mode=facts["resize_mode"])
    one_level = 1 / 255 / min(facts["std"])  # one uint8 step after normalisation
    # odd sizes, landscape and portrait, downscaled and upscaled: torchvision's rounding of the resized side
    # and of the crop offset matters here
    for image in (_photo(301, 203), _photo(203, 301), _photo(100, 90)):
        ours, theirs = _ours(cfg, image), reference(image)
        assert ours.shape == theirs.shape == (3, size, size)
        if facts["resize_mode"] == "squash":
            # both resize the whole image with PIL's filter: the same pixels, up to float rounding
            assert (ours - theirs).abs().max() < 1e-5
        else:
            # OpenCLIP resizes the shorter side then crops; we resample the box that crop keeps in one pass
            # (PIL's filter still reads past it): the same pixels up to a rare one-level rounding difference
            assert (ours - theirs).abs().max() <= one_level + 1e-5
            assert (ours - theirs).abs().mean() < 0.01 * one_level
    # and OpenAI's statistics on the same pixels would be far off: the test tells them apart
    wrong = normalize_on_device(_pixels(cfg, image)[None])[0]  # (the last image)
    assert (wrong - theirs).abs().max() > 10 * one_level


def test_device_normalisation_uses_the_models_mean_and_std() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.125, 1.0)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalize_on_device(images, mean=mean, std=std), expected, atol=1e-5)
    siglip = get_model_config("ViT-B-16-SigLIP").preprocessing
    assert torch.allclose(normalize_on_device(images, mean=siglip.mean, std=siglip.std), images.float() / 127.5 - 1,
                          atol=1e-5)
    # the default stays OpenAI's, and a cached pair of statistics never leaks into another's
    assert not torch.allclose(normalize_on_device(images), expected, atol=1e-3)


def test_the_app_takes_the_names_preprocessing_and_the_users_overrides(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from clip_train.config import register_configs

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        named = compose("train", overrides=["model=openclip", "model.name=ViT-B-16-SigLIP"])
        overridden = compose("train", overrides=["model=openclip", "model.name=ViT-B-16-SigLIP",
                                                 "model.image_mean=[0.1,0.2,0.3]", "model.image_resize_mode=shortest",
                                                 "model.image_interpolation=bilinear"])
        default = compose("train", overrides=[])
        bad = compose("train", overrides=["model.image_resize_mode=crop"])
    pre = OmegaConf.to_object(named).model.preprocessing
    assert (pre.mean, pre.std, pre.interpolation, pre.resize_mode) == ((0.5,) * 3, (0.5,) * 3, "bicubic", "squash")
    pre = OmegaConf.to_object(overridden).model.preprocessing
    assert (pre.mean, pre.std, pre.interpolation, pre.resize_mode) == ((0.1, 0.2, 0.3), (0.5,) * 3, "bilinear",
                                                                       "shortest")
    assert OmegaConf.to_object(default).model.preprocessing.mean == OPENAI_MEAN
    with pytest.raises(ValueError, match="image_resize_mode='crop'"):
        OmegaConf.to_object(bad)


def small_siglip() -> ModelConfig:
    """ViT-B-16-SigLIP's config (name, preprocessing, tokenizer, bidirectional text tower with last-token pooling,
    timm trunk with a MAP head and no projection, logit bias) with towers a few MB in size: timm's
    ``vit_tiny_patch16_224`` trunk (192 wide) and a one-block text tower, so exports take a second, not thirty."""
    cfg = get_model_config("ViT-B-16-SigLIP")
    cfg.vision.timm_model_name = "vit_tiny_patch16_224"
    cfg.embed_dim = 192  # timm_proj none: the pooled trunk feature is the embedding
    cfg.text.width, cfg.text.heads, cfg.text.layers = 64, 2, 1
    return cfg


def test_exports_carry_the_models_preprocessing(tmp_path: Path) -> None:
    from transformers import CLIPImageProcessor

    from clip_train.export import export

    torch.manual_seed(0)
    model = create_model_from_config(small_siglip()).eval()
    export(model, "open_clip", tmp_path / "oc")
    written = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert written == {"size": 224, "mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                       "resize_mode": "squash"}
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    loaded = reference.visual.preprocess_cfg
    assert (tuple(loaded["mean"]), tuple(loaded["std"]), loaded["resize_mode"]) == ((0.5,) * 3, (0.5,) * 3, "squash")
    image = _photo()
    assert (preprocess(image) - _ours(model.config, image)).abs().max() < 1e-5
    images = _ours(model.config, image)[None]
    with torch.no_grad():
        assert (reference.encode_image(images) - model.encode_image(images)).abs().max() < 1e-4

    # and back into clip_train: from the open_clip directory's preprocess_cfg and a safetensors file's metadata
    import clip_train

    assert clip_train.create_model(None, pretrained=tmp_path / "oc").config.preprocessing == model.config.preprocessing
    export(model, "safetensors", tmp_path / "m.safetensors")
    assert clip_train.create_model(None, pretrained=tmp_path / "m.safetensors").config.preprocessing == \
        model.config.preprocessing

    # Hugging Face: CLIPImageProcessor reads the model's statistics, filter and (squash) resize
    tiny = get_model_config("tiny")
    tiny.image_mean, tiny.image_std, tiny.image_interpolation, tiny.image_resize_mode = [0.5] * 3, [0.5] * 3, \
        "bilinear", "squash"
    tiny_model = create_model_from_config(tiny).eval()
    export(tiny_model, "hf", tmp_path / "hf")
    processor = CLIPImageProcessor.from_pretrained(str(tmp_path / "hf"))
    assert list(processor.image_mean) == [0.5] * 3 and processor.resample == Image.Resampling.BILINEAR
    pixels = processor(images=image, return_tensors="pt").pixel_values[0]
    assert (pixels - _ours(tiny, image)).abs().max() <= 1 / 255 / 0.5 + 1e-5


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16-SigLIP"])  # shortest + bicubic + OpenAI's; squash + 0.5
def test_get_preprocess_gives_openclips_preprocess_tensors_from_python(tmp_path: Path, name: str) -> None:
    import clip_train

    tag = next(t for n, t in open_clip.list_pretrained() if n == name)
    facts = _openclip_facts(name, tag)
    size = get_model_config(name).vision.image_size
    reference = image_transform(size, is_train=False, mean=facts["mean"], std=facts["std"],
                                interpolation=facts["interpolation"], resize_mode=facts["resize_mode"])
    preprocess = clip_train.get_preprocess(name)
    one_level = 1 / 255 / min(facts["std"])
    photos = [_photo(301, 203), _photo(203, 301)]
    for photo in photos:
        ours, theirs = preprocess(photo), reference(photo)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (3, size, size)
        assert (ours - theirs).abs().max() <= one_level + 1e-5
    (tmp_path / "a.png").write_bytes(_png(photos[0]))
    batch = preprocess([tmp_path / "a.png", photos[1]])  # paths and PIL images alike
    assert torch.equal(batch, torch.stack([preprocess(photos[0]), preprocess(photos[1])]))
    with pytest.raises(FileNotFoundError, match="image not found: .*missing.png"):
        preprocess(str(tmp_path / "missing.png"))


def test_get_preprocess_takes_a_model_and_follows_its_config() -> None:
    import clip_train

    for name in ("tiny", "coca_tiny"):
        model = clip_train.create_model(name)
        preprocess = clip_train.get_preprocess(model)
        assert preprocess.image_size == model.image_size and preprocess.preprocessing == model.config.preprocessing
        with torch.no_grad():  # what a user does next: the features of a photo
            assert model.encode_image(preprocess([_photo()]), normalize=True).shape[0] == 1


def test_create_model_and_transforms_returns_openclips_three_with_the_training_crop() -> None:
    import clip_train

    model, preprocess_train, preprocess_val = clip_train.create_model_and_transforms("tiny")
    assert isinstance(model, clip_train.CLIP) and preprocess_val == clip_train.get_preprocess(model)
    assert preprocess_train.is_train and not preprocess_val.is_train
    assert (preprocess_train.train_crop_scale, preprocess_train.train_crop_ratio) == ((0.9, 1.0), (3 / 4, 4 / 3))
    # With the whole image as the only crop (area 100%, a square photo), OpenCLIP's training transform is
    # deterministic too: the pixels agree up to one rounding level.
    size = 224
    whole = clip_train.get_preprocess("ViT-B-32", train=True, crop_scale=(1.0, 1.0))
    reference = image_transform(size, is_train=True, mean=OPENAI_MEAN, std=OPENAI_STD, aug_cfg={"scale": (1.0, 1.0)})
    photo = _photo(257, 257)
    assert (whole(photo) - reference(photo)).abs().max() <= 1 / 255 / min(OPENAI_STD) + 1e-5
    # The default crop is random, and reproducible from a seed (a square photo: a 3:2 one leaves no random crop
    # of 90% of its area within 4:3, and torchvision's rule then takes the centred one).
    square = _photo(300, 300)
    seeded = [clip_train.get_preprocess("ViT-B-32", train=True, seed=3)(square) for _ in range(2)]
    assert torch.equal(*seeded)
    draws = clip_train.get_preprocess("ViT-B-32", train=True, seed=3)
    assert not torch.equal(draws(square), draws(square))
    with pytest.raises(ValueError, match=r"crop_scale=\[0.5, 1.5\]: give \[min, max\] with 0 < min <= max <= 1"):
        clip_train.get_preprocess("tiny", train=True, crop_scale=(0.5, 1.5))
