"""OpenCLIP as the reference for the model zoo: its architectures built without downloads, and a parity check.

Shared by ``tests/test_zoo.py`` (``make test``) and ``python -m tests.zoo_parity`` (``make test-zoo``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import clip_train
from clip_train.models import get_model_config
from clip_train.models.factory import build_model
from clip_train.models.openclip_config import openclip_json, split_quickgelu, unsupported_fields

# A parity run never reaches the Hugging Face Hub: HF text towers whose config is not at hand fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BIG_MODEL_PARAMETERS = 1_500_000_000
"""Architectures above this are checked on the meta device only (a numeric run does not fit the CI budget)."""


def openclip_class(name: str) -> type[torch.nn.Module]:
    """The OpenCLIP model class its factory picks for ``name`` (CLIP, CustomTextCLIP or CoCa)."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if "multimodal_cfg" in cfg:
        return open_clip.CoCa
    if cfg.get("custom_text") or cfg.get("text_cfg", {}).get("hf_model_name"):
        return open_clip.CustomTextCLIP
    return open_clip.CLIP


def openclip_model(name: str, device: str = "cpu") -> torch.nn.Module:
    """OpenCLIP's own model for ``name`` with random weights, built as its factory does but on any device.

    ``open_clip.create_model`` moves the model at the end, which the meta device cannot do; building the
    class from the same JSON config gives the same modules and parameter names.
    """
    base, quick_gelu = split_quickgelu(name)
    cfg = copy.deepcopy(openclip_json(base))
    cfg["quick_gelu"] = cfg.get("quick_gelu", False) or quick_gelu
    cfg.pop("custom_text", None)
    cfg.get("vision_cfg", {}).pop("timm_model_pretrained", None)  # never download trunk weights
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name"):
        text["hf_model_pretrained"] = False
    with warnings.catch_warnings(), torch.device(device), _offline_hf_config(text.get("hf_model_name")):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            return openclip_class(base)(**cfg).eval()
        finally:
            logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _offline_hf_config(hf_model_name: str | None) -> Iterator[None]:
    """OpenCLIP fetches an HF text tower's config from the Hub (``AutoConfig.from_pretrained``); answer it with
    the config our loader builds offline (``hf_text.KNOWN_ARCHITECTURES``), so both sides build the tower from
    the same facts and nothing downloads."""
    if not hf_model_name:
        yield
        return
    import transformers

    from clip_train.models.hf_text import resolve_hf_config

    config = resolve_hf_config(hf_model_name)
    original = transformers.AutoConfig.__dict__["from_pretrained"]
    transformers.AutoConfig.from_pretrained = staticmethod(lambda *args, **kwargs: config)  # type: ignore[method-assign]
    try:
        yield
    finally:
        transformers.AutoConfig.from_pretrained = original


def openclip_decay_exemption() -> Callable[[str, torch.nn.Parameter], bool]:
    """The no-decay test OpenCLIP's training script applies to ``(name, parameter)``, read from its installed
    source (it is inline in ``main``), so a change to OpenCLIP's rule fails the tests rather than going unnoticed."""
    import open_clip_train.main

    source = inspect.getsource(open_clip_train.main.main)
    line = next(line for line in source.splitlines() if line.strip().startswith("exclude = lambda n, p:"))
    return eval(line.split("=", 1)[1].strip())  # OpenCLIP's own one-line lambda


def needs_other_branch(name: str) -> str | None:
    """Why ``name`` cannot be built faithfully by this build (a tower option it lacks), or None."""
    missing = unsupported_fields(name)
    if missing:
        part = "Hugging Face text tower (clip_train.models.hf_text)" if any(".hf_" in m for m in missing) else \
            "timm tower head variants (clip_train.models.timm_tower)"
        return f"needs the {part}: {', '.join(missing)}"
    if openclip_json(split_quickgelu(name)[0]).get("multimodal_cfg") is not None:
        try:
            import clip_train.models.coca  # noqa: F401
        except ImportError:
            return "needs CoCa's multimodal text decoder (clip_train.models.coca)"
    return None


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def ours_on_meta(name: str) -> torch.nn.Module:
    """Our model for ``name`` with shape-only tensors."""
    with torch.device("meta"):
        return build_model(get_model_config(name))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example_inputs(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the model's size and token rows that every pooling rule reads sensibly.

    Each row: a start id, random ids below the vocabulary's top, one end id (the highest id, and the
    config's ``eos_id``), then padding zeros; so argmax, eos, first and last pooling all find real tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    size = model.config.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    text = model.config.text
    vocab, length = text.vocab_size, text.context_length
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        used = min(length, 5 + 3 * row)
        tokens[row, :used] = torch.randint(3, vocab - 1, (used,), generator=generator)
        tokens[row, used - 1] = vocab - 1 if text.pool_type != "eos" else text.eos_id
    return images, tokens


@dataclass
class Parity:
    name: str
    parameters: int
    image_delta: float
    text_delta: float
    seconds: float


def finite_random_weights(model: torch.nn.Module, seed: int = 0) -> list[str]:
    """Give tensors that OpenCLIP's random init leaves uninitialised (``torch.empty``) finite values.

    OpenCLIP's CoCa never initialises ``text_decoder.text_projection``; whatever memory it got can hold
    NaN/inf, which our loader rightly refuses. Real checkpoints are trained, so only the harness needs this.
    Returns the names it filled.
    """
    generator = torch.Generator().manual_seed(seed)
    filled = []
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
                filled.append(key)
    return filled


def numeric_parity(name: str, workdir: Path) -> Parity:
    """Save OpenCLIP's random model, load it into ours by name, and compare normalised features (fp32, CPU).

    OpenCLIP's features are taken before ours is built and its model freed, so the peak memory is about two
    copies of the weights (model and loaded state dict), not three: the ~1.4B-parameter names fit 24 GB.
    """
    start = time.perf_counter()
    torch.manual_seed(0)
    reference = openclip_model(name)
    finite_random_weights(reference)
    images, tokens = example_inputs(ours_on_meta(name))
    with torch.no_grad():
        reference_image = reference.encode_image(images, normalize=True)
        reference_text = reference.encode_text(tokens, normalize=True)
    path = workdir / f"{name}.pt"
    torch.save(reference.state_dict(), path)
    del reference
    gc.collect()
    ours = clip_train.create_model(name, pretrained=path).eval()
    path.unlink()
    with torch.no_grad():
        image_delta = ours.encode_image(images, normalize=True) - reference_image
        text_delta = ours.encode_text(tokens, normalize=True) - reference_text
    parameters = parameter_count(ours)
    return Parity(name, parameters, float(image_delta.abs().max()), float(text_delta.abs().max()),
                  time.perf_counter() - start)
