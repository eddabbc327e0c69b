"""Loading OpenAI and OpenCLIP weights without conversion, checked against OpenCLIP's own implementation."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import clip_train
from clip_train.models import CheckpointError

TOLERANCE = 1e-4


def reference_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval()


def batch_for(model: torch.nn.Module, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=generator)
    tokens = clip_train.get_tokenizer()(["a diagram of a cat", "two dogs playing in the snow at dusk"][:n])
    return images, tokens


def assert_same_features(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    images, tokens = batch_for(reference)
    with torch.no_grad():
        for method in ("encode_image", "encode_text"):
            ours_out = getattr(ours.eval(), method)(images if method == "encode_image" else tokens)
            ref_out = getattr(reference, method)(images if method == "encode_image" else tokens)
            assert ours_out.shape == ref_out.shape
            diff = (ours_out - ref_out).abs().max().item()
            assert diff < TOLERANCE, f"{method}: max abs difference {diff:.2e}"


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32", "ViT-B-16"])
def test_openclip_state_dict_gives_identical_features(name: str, tmp_path: Path) -> None:
    reference = reference_model(name)
    path = tmp_path / f"{name}.pt"
    torch.save(reference.state_dict(), path)
    assert_same_features(clip_train.create_model(name, pretrained=path), reference)


def test_a_new_image_size_and_context_length_interpolate_positions_as_openclip_does(tmp_path: Path) -> None:
    """Fine-tuning at another resolution: the same file and sizes give OpenCLIP's model, position for position."""
    path = tmp_path / "ViT-B-32.pt"
    torch.save(reference_model("ViT-B-32").state_dict(), path)
    reference = open_clip.create_model("ViT-B-32", pretrained=str(path), force_image_size=320,
                                       force_context_length=40).eval()
    ours = clip_train.create_model("ViT-B-32", pretrained=path, force_image_size=320, force_context_length=40)
    assert ours.image_size == 320 and ours.visual.positional_embedding.shape == (101, 768)  # 10x10 + class
    for key in ("visual.positional_embedding", "positional_embedding"):
        assert torch.equal(ours.state_dict()[key], reference.state_dict()[key]), key
    images = torch.randn(2, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    tokens = clip_train.get_tokenizer(context_length=40)(["a diagram of a cat", "two dogs in the snow"])
    with torch.no_grad():
        assert (ours.encode_image(images) - reference.encode_image(images)).abs().max() < TOLERANCE
        assert (ours.encode_text(tokens) - reference.encode_text(tokens)).abs().max() < TOLERANCE


def test_a_training_run_takes_pretrained_weights_at_another_image_size(tmp_path: Path, caplog) -> None:
    from clip_train.models import create_model_from_config
    from clip_train.models.registry import get_model_config

    source = clip_train.create_model("tiny")  # 32 pixels, 8-pixel patches: a 4x4 grid
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    cfg = get_model_config("tiny")
    cfg.vision.image_size, cfg.pretrained = 48, str(path)
    with caplog.at_level("INFO", logger="clip_train"):
        model = create_model_from_config(cfg)
    assert "visual.positional_embedding resized from a 4x4 to a 6x6 patch grid (bicubic)" in caplog.text
    grid = model.visual.positional_embedding.detach()
    assert grid.shape == (37, source.visual.positional_embedding.shape[1])
    assert torch.equal(grid[0], source.visual.positional_embedding[0])  # the class token's row is kept
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight)  # every other weight as loaded
    assert model.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, source.config.embed_dim)


def test_a_resnet_takes_pretrained_weights_at_another_image_size(tmp_path: Path, caplog) -> None:
    """OpenCLIP refuses this file; the attention pool's grid is resized like a ViT's, its mean-token row kept."""
    import dataclasses

    import torch.nn.functional as F

    from clip_train.models import create_model_from_config
    from clip_train.models.config import ModelConfig, TextConfig, VisionConfig

    small = ModelConfig(name="rn-small", embed_dim=32,
                        vision=VisionConfig(image_size=64, layers=[1, 1, 1, 1], width=8, patch_size=None),
                        text=TextConfig(context_length=16, width=32, heads=1, layers=1))
    torch.manual_seed(0)
    source = create_model_from_config(small)  # 64 pixels: a 2x2 final feature map
    path = tmp_path / "rn.pt"
    torch.save(source.state_dict(), path)
    bigger = dataclasses.replace(small, pretrained=str(path),
                                 vision=dataclasses.replace(small.vision, image_size=96))
    with caplog.at_level("INFO", logger="clip_train"):
        model = create_model_from_config(bigger)
    key = "visual.attnpool.positional_embedding"
    assert f"{key} resized from a 2x2 to a 3x3 feature-map grid (bicubic)" in caplog.text
    source_state, model_state = source.state_dict(), model.state_dict()
    old, new = source_state[key], model_state[key]
    assert new.shape == (10, old.shape[1]) and torch.equal(new[0], old[0])  # the mean token's row is kept
    grid = old[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)  # row-major over the feature map, as the pool reads it
    grid = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(new[1:], grid.permute(0, 2, 3, 1).reshape(9, -1))
    assert all(torch.equal(value, source_state[name])
               for name, value in model_state.items() if name != key)  # every other weight as loaded
    assert model.encode_image(torch.randn(1, 3, 96, 96)).shape == (1, 32)


def test_a_timm_vit_takes_pretrained_weights_at_another_image_size_as_openclip_does(
    tmp_path: Path, caplog, open_clip_registry
) -> None:
    """A 224-pixel file of a timm ViT tower fine-tunes at 64 pixels: the trunk's position table is resampled
    by timm's rule, so OpenCLIP's create_model(pretrained=..., force_image_size=64) gives the same model."""
    import dataclasses

    from clip_train.models import create_model_from_config
    from clip_train.models.config import ModelConfig, TextConfig, VisionConfig
    from clip_train.models.openclip_config import to_openclip

    cfg = ModelConfig(name="timm-vit-tiny", embed_dim=32,
                      vision=VisionConfig(image_size=224, patch_size=None, timm_model_name="vit_tiny_patch16_224",
                                          timm_pool="token", timm_proj="linear"),
                      text=TextConfig(context_length=16, width=32, heads=1, layers=1))
    (tmp_path / "timm-vit-tiny.json").write_text(json.dumps(to_openclip(cfg)))
    open_clip.add_model_config(tmp_path / "timm-vit-tiny.json")
    torch.manual_seed(0)
    path = tmp_path / "timm-vit-tiny.pt"
    torch.save(open_clip.create_model("timm-vit-tiny").state_dict(), path)
    reference = open_clip.create_model("timm-vit-tiny", pretrained=str(path), force_image_size=64).eval()
    with caplog.at_level("INFO", logger="clip_train"):
        ours = create_model_from_config(dataclasses.replace(cfg, pretrained=str(path), force_image_size=64)).eval()
    assert "visual.trunk.pos_embed resized from a 14x14 to a 4x4 patch grid (bicubic)" in caplog.text
    expected = reference.state_dict()
    assert ours.visual.trunk.pos_embed.shape == (1, 1 + 4 * 4, 192)
    assert all(torch.equal(value, expected[key]) for key, value in ours.state_dict().items())
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours.encode_image(images) - reference.encode_image(images)).abs().max() < TOLERANCE


def test_position_shapes_that_cannot_be_interpolated_are_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    state = clip_train.create_model("tiny").state_dict()
    state["visual.positional_embedding"] = state["visual.positional_embedding"][:-1]  # 15 patches: no square grid
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"visual.positional_embedding \(file \(16, \d+\), model \(17,"):
        clip_train.create_model("tiny", pretrained=path)
    with pytest.raises(ValueError, match="model.force_image_size=0: give a whole number"):
        clip_train.create_model("tiny", force_image_size=0)


def test_openclip_safetensors_and_bin_files_load(tmp_path: Path) -> None:
    reference = reference_model("ViT-B-32")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    for file in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        assert_same_features(clip_train.create_model("ViT-B-32", pretrained=tmp_path / file), reference)


def test_openclip_training_checkpoint_loads(tmp_path: Path) -> None:
    reference = reference_model("RN50")
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    checkpoint = {
        "epoch": 3,
        "name": "rn50-run",
        "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "epoch_3.pt")
    assert_same_features(clip_train.create_model("RN50", pretrained=tmp_path / "epoch_3.pt"), reference)


def openai_release_state_dict(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What OpenAI's release holds: fp16 weights plus three integer entries."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    size = reference.visual.image_size
    state["input_resolution"] = torch.tensor(size[0] if isinstance(size, (tuple, list)) else size)
    state["context_length"] = torch.tensor(reference.context_length)
    state["vocab_size"] = torch.tensor(reference.vocab_size)
    return state


def reference_with_fp16_weights(name: str) -> torch.nn.Module:
    reference = reference_model(name)
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return reference


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_openai_fp16_state_dict_selects_quickgelu_and_matches(name: str, tmp_path: Path) -> None:
    reference = reference_with_fp16_weights(f"{name}-quickgelu")
    torch.save(openai_release_state_dict(reference), tmp_path / f"{name}.pt")
    # The plain name asks for GELU, but OpenAI's layout says QuickGELU; the file wins, as OpenCLIP does.
    model = clip_train.create_model(name, pretrained=tmp_path / f"{name}.pt")
    assert model.config.quick_gelu
    assert model.logit_scale.dtype == torch.float32
    assert_same_features(model, reference)


class _Holder(torch.nn.Module):
    pass


def torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> None:
    """A real TorchScript archive whose state dict is ``state``, as OpenAI's JIT release files are."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        module.register_buffer(leaf, value)
    scripted = torch.jit.script(root)
    torch.jit.save(scripted, str(path))


def test_openai_torchscript_archive_loads_and_infers_the_architecture(tmp_path: Path) -> None:
    reference = reference_with_fp16_weights("ViT-B-32-quickgelu")
    torchscript_archive(openai_release_state_dict(reference), tmp_path / "ViT-B-32.pt")
    model = clip_train.create_model(None, pretrained=tmp_path / "ViT-B-32.pt")
    assert model.config.quick_gelu
    assert model.config.vision.patch_size == 32
    assert_same_features(model, reference)


def test_missing_and_mismatched_keys_are_named(tmp_path: Path) -> None:
    state = clip_train.create_model("tiny").state_dict()
    del state["ln_final.bias"]
    state["visual.proj"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        clip_train.create_model("tiny", pretrained=tmp_path / "bad.pt")
    message = str(err.value)
    assert "ln_final.bias" in message and "extra.weight" in message and "visual.proj" in message
    assert "\n" not in message


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save(clip_train.create_model("tiny").state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        clip_train.create_model("ViT-B-32", pretrained=tmp_path / "tiny.pt")


def test_truncated_file_is_refused_in_one_line(tmp_path: Path) -> None:
    torch.save(clip_train.create_model("tiny").state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a weights file"):
        clip_train.create_model("tiny", pretrained=tmp_path / "cut.pt")


class _Payload:
    """Unpickling this object would create a file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = clip_train.create_model("tiny").state_dict()
    state["payload"] = _Payload(str(marker))
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        clip_train.create_model("tiny", pretrained=tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"# CLIP weights\nsee the release page\n", b"\x89PNG\r\n\x1a\n" + bytes(64),
                                     b'{"visual.proj": [1, 2]}'])
def test_a_file_that_is_no_pickle_is_called_not_a_weights_file_not_unsafe(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "weights.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="it is not a weights file") as refused:
        clip_train.create_model("tiny", pretrained=tmp_path / "weights.pt")
    assert "unsafe" not in str(refused.value) and "\n" not in str(refused.value)


def test_tensors_pickled_with_a_newer_protocol_are_named_with_the_remedy(tmp_path: Path) -> None:
    # torch's weights_only reader has no FRAME opcode, so it refuses protocol 4 even when only tensors are inside.
    torch.save(clip_train.create_model("tiny").state_dict(), tmp_path / "p4.pt", pickle_protocol=4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of the protocol before refusing it
            torch.load(tmp_path / "p4.pt", weights_only=True)
    except pickle.UnpicklingError:
        refusal = "pickled with protocol 4.*safetensors.torch.save_file"
        with pytest.raises(CheckpointError, match=refusal) as refused, warnings.catch_warnings():
            warnings.simplefilter("error")  # our one line comes without torch's warning before it
            clip_train.create_model("tiny", pretrained=tmp_path / "p4.pt")
        assert "unsafe" not in str(refused.value)
    else:  # a torch whose safe reader learnt protocol 4 simply loads it
        model = clip_train.create_model("tiny", pretrained=tmp_path / "p4.pt")
        assert torch.equal(model.logit_scale, torch.load(tmp_path / "p4.pt", weights_only=True)["logit_scale"])


@pytest.mark.parametrize("name, pretrained", [("ViT-B-32", "openai"), ("ViT-B-16", "laion2b_s34b_b79k"),
                                              ("ViT-B-32", "hf-hub:timm/vit_base_patch32_clip_224.openai"),
                                              ("hf-hub:timm/vit_base_patch32_clip_224.openai", None)])
def test_openclip_tags_and_hub_names_say_we_download_nothing_and_how_to_fetch_them(
    tmp_path: Path, monkeypatch, name: str, pretrained: str | None
) -> None:
    monkeypatch.chdir(tmp_path)  # a tag is tried as a relative path first
    with pytest.raises(ValueError, match="reads local files only .*downloads nothing.*hf download") as refused:
        clip_train.create_model(name, pretrained=pretrained)
    if "hf-hub:" in f"{name}{pretrained}":
        assert "hf download timm/vit_base_patch32_clip_224.openai --local-dir DIR" in str(refused.value)
        assert "create_model('local-dir:DIR')" in str(refused.value)


def test_a_downloaded_hub_directory_loads_with_its_architecture_from_open_clip_config(tmp_path: Path) -> None:
    # The layout `hf download` gives for OpenCLIP's hub models: weights beside open_clip_config.json.
    reference = open_clip.create_model("RN50", pretrained=None).eval()
    folder = tmp_path / "RN50"  # `hf download ... --local-dir RN50`
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors")
    config = {"model_cfg": open_clip.get_model_config("RN50"),
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    model = clip_train.create_model(pretrained=folder).eval()
    assert model.config.name == "RN50"  # the folder names the model when it holds that architecture...
    misnamed = folder.rename(tmp_path / "ViT-B-32")
    assert clip_train.create_model(pretrained=misnamed).config.name == "open_clip_config"  # ...and only then
    image, text = torch.randn(1, 3, 224, 224), open_clip.get_tokenizer("RN50")(["a photo of a dog"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), reference.encode_image(image), rtol=0, atol=1e-4)
        torch.testing.assert_close(model.encode_text(text), reference.encode_text(text), rtol=0, atol=1e-5)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found: .*nope.pt"):
        clip_train.create_model("tiny", pretrained=tmp_path / "nope.pt")
