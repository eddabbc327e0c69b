"""CoCa: the multimodal decoder, the whole model and its loss against OpenCLIP's, and caption generation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
from open_clip.coca_model import CoCa as OpenClipCoCa
from open_clip.loss import CoCaLoss as OpenClipCoCaLoss
from open_clip.transformer import MultimodalTransformer

import clip_train
from clip_train.generate import END_OF_TEXT_ID, START_OF_TEXT_ID, generate
from clip_train.load import load_model
from clip_train.loss import CocaLoss
from clip_train.models import config_from_state_dict
from clip_train.models.coca import CoCa, MultimodalDecoder
from clip_train.models.config import ModelConfig, MultimodalConfig, TextConfig, VisionConfig
from tests.cli_helpers import FAST_DEMO, REPO, cli_env, read_metrics, run_cli, train_losses

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


# ------------------------------------------------------------------------------------------------ whole model

# Two small CoCa shapes, written both as OpenCLIP's config dicts and as our ModelConfig: with the attentional
# pooler (as coca_ViT-B-32 / -L-14) and without it (as coca_base: the decoder reads the patch tokens).
TINY_OPEN_CLIP = {
    "attn_pool": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16, "attentional_pool": True,
                        "attn_pooler_queries": 9, "attn_pooler_heads": 4, "output_tokens": True},
        "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2, "embed_cls": True,
                      "output_tokens": True},
        "multimodal_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2},
    },
    # Our registry's coca_tiny, as OpenCLIP would be told it: loaded below by name with create_model.
    "coca_tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "attentional_pool": True,
                        "attn_pooler_queries": 9, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2, "attn_pooler_heads": 2},
    },
    "patch_tokens_quickgelu": {
        "embed_dim": 24,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16, "output_tokens": True},
        "text_cfg": {"context_length": 10, "vocab_size": 90, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
                      "output_tokens": True},
        "multimodal_cfg": {"context_length": 10, "vocab_size": 90, "width": 32, "heads": 4, "layers": 2},
    },
}
TINY_OURS = {
    "attn_pool": ModelConfig(
        name="tiny_attn_pool", embed_dim=32, custom_text=True,
        vision=VisionConfig(image_size=32, layers=[2], width=48, patch_size=8, head_width=16, attentional_pool=True,
                            attn_pooler_queries=9, attn_pooler_heads=4),
        text=TextConfig(context_length=12, vocab_size=100, width=32, heads=4, layers=2, embed_cls=True),
        multimodal=MultimodalConfig(context_length=12, vocab_size=100, width=32, heads=4, layers=2),
    ),
    "patch_tokens_quickgelu": ModelConfig(
        name="tiny_patch_tokens", embed_dim=24, custom_text=True, quick_gelu=True,
        vision=VisionConfig(image_size=32, layers=[1], width=32, patch_size=16, head_width=16),
        text=TextConfig(context_length=10, vocab_size=90, width=32, heads=2, layers=1, embed_cls=True),
        multimodal=MultimodalConfig(context_length=10, vocab_size=90, width=32, heads=4, layers=2),
    ),
}


def _padded_captions(batch: int, length: int, vocab: int) -> torch.Tensor:
    """Random captions ``[sot-like id, words..., eot-like id, 0...]`` of different lengths."""
    text = torch.randint(3, vocab - 1, (batch, length))
    for row in range(batch):
        end = 3 + row * 2 % (length - 3)
        text[row, 0], text[row, end], text[row, end + 1 :] = 1, vocab - 1, 0
    return text


@pytest.mark.parametrize("shape", sorted(TINY_OPEN_CLIP))
def test_tiny_coca_equals_open_clips_on_the_same_weights(shape: str, tmp_path: Path) -> None:
    reference = OpenClipCoCa(**copy.deepcopy(TINY_OPEN_CLIP[shape])).eval()
    torch.nn.init.normal_(reference.text_decoder.text_projection, std=0.2)  # OpenCLIP leaves it uninitialised
    path = tmp_path / "open_clip_coca.pt"
    torch.save(reference.state_dict(), path)
    if shape == "coca_tiny":  # the public route: by name, from the file OpenCLIP saved
        ours = clip_train.create_model("coca_tiny", pretrained=path)
    else:
        ours = CoCa(TINY_OURS[shape])
        clip_train.models.pretrained.load_weights_into(ours, clip_train.models.read_weights(path))  # strict
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    ours.eval()

    cfg = TINY_OPEN_CLIP[shape]
    images = torch.randn(3, 3, 32, 32)
    text = _padded_captions(3, cfg["text_cfg"]["context_length"], cfg["text_cfg"].get("vocab_size", 49408))
    with torch.no_grad():
        expected = reference(images, text)
        got = ours(images, text)
        torch.testing.assert_close(got.image_features, expected["image_features"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got.text_features, expected["text_features"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got.caption_logits, expected["logits"], rtol=0, atol=1e-4)
        assert torch.equal(got.caption_labels, expected["labels"])
        torch.testing.assert_close(got.logit_scale, expected["logit_scale"])
        torch.testing.assert_close(ours.encode_image(images, normalize=True), reference.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(text, normalize=True), reference.encode_text(text), atol=1e-5, rtol=0)


def test_a_coca_state_dict_without_a_name_resolves_to_its_coca_architecture(tmp_path: Path) -> None:
    torch.save(clip_train.create_model("coca_tiny").state_dict(), tmp_path / "coca.pt")
    model = clip_train.create_model(None, pretrained=tmp_path / "coca.pt")  # the one name whose keys/shapes match
    assert isinstance(model, CoCa) and model.config.name == "coca_tiny"
    with torch.device("meta"):
        state_dict = CoCa(clip_train.models.get_model_config("coca_tiny")).state_dict()
    assert config_from_state_dict(state_dict).multimodal is not None


def test_coca_loss_and_model_go_together() -> None:
    from clip_train.config import ConfigError, TrainConfig, validate

    cfg = TrainConfig()
    cfg.model = clip_train.models.get_model_config("coca_tiny")
    cfg.train.precision = "fp32"
    with pytest.raises(ConfigError, match="train it with loss=coca"):
        validate(cfg, world_size=1, device_type="cpu")
    cfg.loss.name = "coca"
    validate(cfg, world_size=1, device_type="cpu")
    cfg.train.accum_steps = 2
    with pytest.raises(ConfigError, match="accum_steps=2"):
        validate(cfg, world_size=1, device_type="cpu")
    cfg.train.accum_steps = 1
    cfg.model = clip_train.models.get_model_config("tiny")
    with pytest.raises(ConfigError, match="has none"):
        validate(cfg, world_size=1, device_type="cpu")


# ------------------------------------------------------------------------------------------------ generation


def argmax_loop(model: CoCa, image: torch.Tensor, max_length: int) -> list[int]:
    """Greedy captioning written out with the model's teacher-forced forward: feed the caption so far plus
    a placeholder token, take the argmax of the last position's logits; close the caption at ``max_length``."""
    caption = [START_OF_TEXT_ID]
    with torch.no_grad():
        while len(caption) < max_length - 1:
            logits = model(image[None], torch.tensor([caption + [0]])).caption_logits[0, -1]
            caption.append(int(logits.argmax()))
            if caption[-1] == END_OF_TEXT_ID:
                return caption
    return caption + [END_OF_TEXT_ID]


def _strip_padding(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    return ids[: ids.index(END_OF_TEXT_ID) + 1]


def _check_well_formed(tokens: torch.Tensor, max_length: int) -> None:
    assert tokens.shape[1] <= max_length
    for row in tokens.tolist():
        assert row[0] == START_OF_TEXT_ID and row.count(END_OF_TEXT_ID) == 1
        end = row.index(END_OF_TEXT_ID)
        assert all(t == 0 for t in row[end + 1 :]) and START_OF_TEXT_ID not in row[1:]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained_run(cache_dir: Path, tmp_path_factory) -> Path:
    """A few steps of the digits demo with the tiny CoCa and loss=coca, under the Hydra app."""
    run_dir = tmp_path_factory.mktemp("coca_run")
    args = [*FAST_DEMO, "model=coca_tiny", "loss=coca", "train.max_steps=8", "data.batch_size=8",
            "optim.warmup_steps=2", "ckpt.every_n_steps=0", f"hydra.run.dir={run_dir}"]
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_loss_coca_trains_the_tiny_coca_under_the_app(trained_run: Path) -> None:
    losses = train_losses(trained_run)
    assert sorted(losses) == list(range(1, 9))
    # Captioning starts near 2 * ln(49408) = 21.6 plus the contrastive ln(8) = 2.1, and falls fast.
    assert 20 < losses[1] < 30
    assert losses[8] < losses[1] - 3
    for line in read_metrics(trained_run):  # both weighted terms are logged, and they add up to the loss
        assert line["contrastive_loss"] + line["caption_loss"] == pytest.approx(line["loss"], rel=1e-5)
        assert 0 < line["contrastive_loss"] < line["caption_loss"]


def test_greedy_equals_an_argmax_loop_and_beam_one_equals_greedy(trained_run: Path) -> None:
    model = load_model(trained_run)
    assert isinstance(model, CoCa)
    images = torch.randn(3, 3, 32, 32)
    greedy = generate(model, images, method="greedy", min_length=0, max_length=12)
    _check_well_formed(greedy, 12)
    for image, row in zip(images, greedy):
        assert _strip_padding(row) == argmax_loop(model, image, max_length=12)
    assert torch.equal(generate(model, images, method="beam", num_beams=1, min_length=0, max_length=12), greedy)

    beams = generate(model, images, method="beam", num_beams=4)
    _check_well_formed(beams, 16)
    assert model.training is False  # load_model's eval mode is kept
    tokenizer = clip_train.get_tokenizer(context_length=16)
    captions = [tokenizer.decode(row) for row in beams]
    assert all(caption.strip() for caption in captions), captions  # words, not just start/end tokens


def test_min_length_holds_back_the_end_token() -> None:
    torch.manual_seed(0)
    model = clip_train.create_model("coca_tiny").eval()
    with torch.no_grad():  # make the end token by far the most likely next token everywhere
        model.text_decoder.ln_final.bias.fill_(1.0)
        model.text_decoder.text_projection[:, END_OF_TEXT_ID] = 1.0
    images = torch.randn(2, 3, 32, 32)
    for method in ("greedy", "beam"):
        tokens = generate(model, images, method=method, num_beams=3, min_length=6)
        _check_well_formed(tokens, 16)
        assert [_strip_padding(row).index(END_OF_TEXT_ID) for row in tokens] == [6, 6]
    with pytest.raises(ValueError, match="needs a CoCa model"):
        generate(clip_train.create_model("tiny"), images)


def test_generate_cli_prints_a_caption_per_image_and_rejects_bad_input(trained_run: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    good = tmp_path / "digit.png"
    Image.fromarray((np.random.rand(40, 30, 3) * 255).astype("uint8")).save(good)
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    command = [sys.executable, "-m", "clip_train.generate", "--pretrained", str(trained_run)]
    env = cli_env(tmp_path)
    result = subprocess.run([*command, str(good), str(good)], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{good}\t") and line.split("\t")[1] for line in lines)
    result = subprocess.run([*command, str(bad)], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                            timeout=120)
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_compile_and_fsdp_units_include_the_decoder_blocks() -> None:
    from clip_train.train.parallelize import _units

    with torch.device("meta"):
        model = CoCa(clip_train.models.get_model_config("coca_tiny"))
    units = _units(model)
    for block in [*model.text.transformer.resblocks, *model.visual.transformer.resblocks,
                  *model.text_decoder.resblocks, *model.text_decoder.cross_attn]:
        assert any(unit is block for unit in units)


def test_coca_with_a_hugging_face_text_tower_equals_open_clips(tmp_path: Path) -> None:
    """coca_roberta-ViT-B-32's layout, tiny: a RoBERTa text tower from a local config.json feeds the decoder."""
    pytest.importorskip("clip_train.models.hf_text")  # the HF text towers (another part of issue 13)
    if "hf_config_dir" not in TextConfig.__dataclass_fields__:
        pytest.skip("TextConfig has no hf_config_dir yet")
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "roberta", "vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 40, "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0,
        "eos_token_id": 2, "layer_norm_eps": 1e-5,
    }))
    for pooler in ("mean_pooler", "cls_pooler"):
        reference = OpenClipCoCa(
            embed_dim=24,
            vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16, "output_tokens": True},
            text_cfg={"hf_model_name": str(tmp_path), "hf_tokenizer_name": str(tmp_path), "hf_proj_type": "linear",
                          "hf_pooler_type": pooler, "width": 32, "output_tokens": True, "hf_model_pretrained": False},
            multimodal_cfg={"context_length": 12, "width": 32, "heads": 2, "layers": 1},
        ).eval()
        torch.nn.init.normal_(reference.text_decoder.text_projection, std=0.2)
        cfg = ModelConfig(
            name="tiny_hf_coca", embed_dim=24, custom_text=True,
            vision=VisionConfig(image_size=32, layers=[1], width=32, patch_size=16, head_width=16),
            text=TextConfig(hf_model_name="roberta-base", hf_config_dir=str(tmp_path), hf_proj_type="linear",
                            hf_pooler_type=pooler, width=32, context_length=12),
            multimodal=MultimodalConfig(context_length=12, width=32, heads=2, layers=1),
        )
        ours = CoCa(cfg)
        ours.load_state_dict(reference.state_dict())  # strict: the same keys and shapes
        ours.eval()
        images, text = torch.randn(2, 3, 32, 32), torch.randint(3, 100, (2, 12))
        text[:, 0], text[0, 7], text[0, 8:] = 0, 2, 1  # <s> ... </s> <pad>...
        with torch.no_grad():
            expected, got = reference(images, text), ours(images, text)
        torch.testing.assert_close(got.image_features, expected["image_features"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got.text_features, expected["text_features"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got.caption_logits, expected["logits"], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ OpenCLIP's names

OFFLINE_COCA_NAMES = ["coca_ViT-B-32", "coca_ViT-L-14", "coca_base"]  # coca_roberta-ViT-B-32 needs the Hub for OpenCLIP


def test_every_coca_name_is_listed() -> None:
    assert {n for n in open_clip.list_models() if n.startswith("coca")} <= set(clip_train.models.list_models())
    assert set(OFFLINE_COCA_NAMES) < {n for n in open_clip.list_models() if n.startswith("coca")}


@pytest.mark.parametrize("name", OFFLINE_COCA_NAMES)
def test_real_size_coca_keys_and_shapes_equal_open_clips_on_the_meta_device(name: str) -> None:
    doc = copy.deepcopy(open_clip.get_model_config(name))
    doc.pop("custom_text")  # open_clip.create_model's switch to CoCa, not an argument of the class
    with torch.device("meta"):  # shapes only: OpenCLIP's create_model would initialise on the CPU first
        reference = OpenClipCoCa(**doc)
    cfg = clip_train.models.get_model_config(name)
    with torch.device("meta"):
        ours = CoCa(cfg)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    assert ours.text_decoder.context_length == reference.context_length == 76
    assert ours.pad_id == reference.pad_id


@pytest.mark.slow
def test_coca_vit_b_32_features_and_caption_logits_equal_open_clips() -> None:
    """The real coca_ViT-B-32 (253M parameters) on OpenCLIP's random weights: a few seconds on CPU."""
    torch.manual_seed(0)
    reference = open_clip.create_model("coca_ViT-B-32").eval()
    torch.nn.init.normal_(reference.text_decoder.text_projection, std=512**-0.5)  # left uninitialised by OpenCLIP
    ours = clip_train.create_model("coca_ViT-B-32")
    clip_train.models.pretrained.load_weights_into(
        ours, clip_train.models.pretrained.LoadedWeights(reference.state_dict(), openai_layout=False)
    )
    ours.eval()
    text = open_clip.get_tokenizer("coca_ViT-B-32")(["a photo of a cat on a mat"])
    assert torch.equal(text, clip_train.get_tokenizer(context_length=76)(["a photo of a cat on a mat"]))
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference(images, text), ours(images, text)
    torch.testing.assert_close(got.image_features, expected["image_features"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got.text_features, expected["text_features"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got.caption_logits, expected["logits"], rtol=0, atol=1e-4)


def test_locking_the_towers_freezes_the_attentional_pooler_and_leaves_the_decoder_trainable() -> None:
    from clip_train.models.lock import lock_image_tower, lock_text_tower

    model = clip_train.create_model("coca_tiny")
    lock_image_tower(model)
    lock_text_tower(model)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text_decoder", "logit_scale"}
