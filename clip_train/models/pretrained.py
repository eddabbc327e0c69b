"""Reading weights files safely and fitting them to a model.

Accepted without conversion: OpenAI releases (TorchScript archives or plain state dicts, fp16, carrying
``input_resolution``/``context_length``/``vocab_size``), OpenCLIP state dicts (.pt/.bin/.safetensors),
OpenCLIP training checkpoints (``{"epoch", "name", "state_dict": {"module.…"}, "optimizer", …}``) and
clip_train checkpoints. Nothing is ever unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from clip_train.errors import reason
from clip_train.models.config import ModelConfig
from clip_train.models.resize import resize_position_embeddings

log = logging.getLogger("clip_train")

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile add these to every key


def unwrapped_name(name: str) -> str:
    """A parameter or state-dict name without the prefixes DDP (``module.``) and torch.compile add."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.removeprefix(prefix)
    return name


class CheckpointError(ValueError):
    """A weights file that cannot be read safely or does not fit the model."""


@dataclass
class LoadedWeights:
    """A state dict read from disk, cleaned of wrappers, and what its layout says about the model."""

    state_dict: dict[str, torch.Tensor]
    openai_layout: bool
    """True for OpenAI's release layout, which implies QuickGELU activations."""
    model_config: dict | None = None
    """The architecture stored alongside the weights (clip_train checkpoints), if any."""
    openclip_model_cfg: dict | None = None
    """OpenCLIP's ``model_cfg`` from an ``open_clip_config.json`` beside (or around) the weights, if any."""
    openclip_config_folder: str | None = None
    """The name of that config's folder (the config itself names no model)."""
    architecture_name: str | None = None
    """The architecture name an OpenCLIP training checkpoint records (its ``name`` entry), if any."""


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


_SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit on the JSON header


def check_safetensors_file(path: Path) -> None:
    """Refuse, in one line, a ``.safetensors`` file whose header or data is cut short or garbage.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
    byte range, then the data; the safetensors library reports damage as a bare ``SafetensorError``.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"cannot read {path}: {size} bytes is too short for a safetensors file (truncated)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _SAFETENSORS_MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(
                f"cannot read {path}: its safetensors header claims {header_len} bytes but the file has {size}; "
                "it is truncated or not a safetensors file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        entries = [entry for key, entry in header.items() if key != "__metadata__"]  # AttributeError: not a dict
        ends = [int(entry["data_offsets"][1]) for entry in entries]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(
            f"cannot read {path}: its safetensors header is not valid JSON describing tensors (garbage, or not a "
            "safetensors file)"
        ) from None
    data_bytes = size - 8 - header_len
    if ends and max(ends) > data_bytes:
        raise CheckpointError(
            f"cannot read {path}: its tensors need {max(ends)} bytes of data but the file holds {data_bytes} "
            "(truncated)"
        )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    check_safetensors_file(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: one line, no traceback
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({reason(err)})") from None


def pickle_refusal(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """Why torch's safe loader (``weights_only``) refused ``path``, in one line that says what to do.

    It refuses three kinds of file, each with its own remedy: files that are no pickle at all (a README, an
    image), pickles of a protocol it has no reader for (``torch.save(..., pickle_protocol=4)``), and pickles
    that hold Python objects besides tensors, which are unsafe.
    """
    operand = re.search(r"Unsupported operand \d+", str(err))
    if operand is None:
        return unsafe_pickle_error(path, err)
    head = _pickle_head(path)
    if head[:1] != b"\x80":  # every pickle of protocol 2 or later, so every torch.save file, starts with PROTO
        return CheckpointError(f"cannot read {path}: it is not a weights file (it begins {head[:16]!r}); give an "
                               "OpenAI or OpenCLIP weights file (.pt, .bin, .safetensors) or a clip_train checkpoint")
    if len(head) > 1 and head[1] > 2:
        return CheckpointError(
            f"cannot read {path}: it was pickled with protocol {head[1]}, which torch's safe loader does not read; "
            "re-save its tensors with safetensors.torch.save_file(state_dict, 'model.safetensors') or with "
            "torch.save's default protocol"
        )
    return CheckpointError(f"cannot read {path}: torch's safe loader does not understand it ({operand.group(0)})")


def _pickle_head(path: Path) -> bytes:
    """The first bytes of the pickle in ``path``: the file itself, or the ``data.pkl`` of a torch.save zip."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is not None:
                    with archive.open(name) as pickled:
                        return pickled.read(64)
        with open(path, "rb") as file:
            return file.read(64)
    except (OSError, zipfile.BadZipFile):
        return b""


def unsafe_pickle_error(path: Path, err: BaseException) -> CheckpointError:
    """The refusal of a pickle that holds objects besides tensors: unsafe, and how to convert it safely."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f" ({found.group(1)})" if found else ""
    return CheckpointError(
        f"refusing to load {path}: it is unsafe, holding pickled Python objects{what} besides tensors, which "
        "would run code when loaded. If you trust its author, convert it once in an isolated environment: load "
        "it with the code that wrote it and save only the tensors with "
        "safetensors.torch.save_file(state_dict, 'model.safetensors'), then use that file"
    )


def _load_container(path: Path) -> object:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if _is_torchscript_archive(path):
        # TorchScript archives hold compiled graphs, read by TorchScript's own loader, not by Python's pickle.
        with warnings.catch_warnings():  # torch marks TorchScript deprecated; OpenAI's releases still use it
            warnings.simplefilter("ignore", FutureWarning)
            try:
                return torch.jit.load(str(path), map_location="cpu").state_dict()
            except RuntimeError as err:  # e.g. a zip dressed up as an archive around an ordinary pickle
                raise CheckpointError(
                    f"cannot read {path}: it looks like a TorchScript archive but is not a valid one ({reason(err)})"
                ) from None
    return read_tensor_pickle(path)


def read_tensor_pickle(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, and a one-line refusal otherwise."""
    try:
        with warnings.catch_warnings():  # our refusal names the protocol and the remedy; torch's warning first adds noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle_refusal(path, err) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"cannot read {path}: the file is truncated or not a weights file ({reason(err)})") from None


def read_weights(path: str | os.PathLike) -> LoadedWeights:
    """Read a weights file of any supported layout into a plain, prefix-free state dict."""
    path = Path(path)
    if path.is_dir():
        return _read_weights_dir(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained weights not found: {path} (give a local file or an exported directory)")
    obj = _load_container(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")

    model_config = _safetensors_model_config(path) if path.suffix == ".safetensors" else None
    architecture_name = None
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # OpenCLIP training checkpoint
        architecture_name = obj["name"] if isinstance(obj.get("name"), str) else None
        obj = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], dict):  # clip_train checkpoint
        model_config = obj.get("model_config")
        obj = obj["model"]
    elif "model_config" in obj and (path.parent / "sharded").is_dir():  # clip_train FSDP checkpoint
        from clip_train.train.sharded_checkpoint import read_sharded_model_state  # only this case needs DCP

        model_config = obj["model_config"]
        obj = read_sharded_model_state(path.parent)

    openai_layout = all(k in obj for k in OPENAI_EXTRA_KEYS)
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if key in OPENAI_EXTRA_KEYS:
            continue
        key = unwrapped_name(key)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key] = value
    openclip_model_cfg = _openclip_config_beside(path)
    return LoadedWeights(state_dict=state_dict, openai_layout=openai_layout, model_config=model_config,
                         openclip_model_cfg=openclip_model_cfg, architecture_name=architecture_name,
                         openclip_config_folder=path.resolve().parent.name if openclip_model_cfg is not None else None)


def _openclip_config_beside(path: Path) -> dict | None:
    """``model_cfg`` of an ``open_clip_config.json`` in the weights file's directory (OpenCLIP's hub layout)."""
    return read_open_clip_config(path.parent)


def read_open_clip_config(folder: Path) -> dict | None:
    """``model_cfg`` of ``folder/open_clip_config.json``, with its ``preprocess_cfg``; None without one."""
    import json

    config_file = folder / "open_clip_config.json"
    if not config_file.is_file():
        return None
    try:
        doc = json.loads(config_file.read_text())
        model_cfg = doc.get("model_cfg")
    except (json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{config_file} is not OpenCLIP's config JSON ({err}); fix or remove it") from None
    if isinstance(model_cfg, dict) and isinstance(doc.get("preprocess_cfg"), dict):
        model_cfg = {**model_cfg, "preprocess_cfg": doc["preprocess_cfg"]}  # the translator reads mean, std, ...
    return model_cfg if isinstance(model_cfg, dict) else None


def _safetensors_model_config(path: Path) -> dict | None:
    """The architecture ``python -m clip_train.export --format safetensors`` stores in the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("clip_train_model_config")
    return json.loads(raw) if raw else None


def _read_weights_dir(path: Path) -> LoadedWeights:
    """A Hugging Face ``CLIPModel`` directory, or an OpenCLIP ``local-dir`` export (``open_clip_config.json``)."""
    import dataclasses

    from clip_train.models.hf import HFConversionError, is_hf_dir, read_hf_dir

    if is_hf_dir(path):
        for file in sorted(path.glob("*.safetensors")):
            check_safetensors_file(file)
        try:
            state_dict, cfg = read_hf_dir(path)
        except HFConversionError as err:
            raise CheckpointError(f"{path}: {err}") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"cannot read the weights in {path}: {reason(err)}") from None
        # The config states the activation; ``openai_layout`` is what makes create_model honour QuickGELU.
        return LoadedWeights(state_dict=state_dict, openai_layout=cfg.quick_gelu, model_config=dataclasses.asdict(cfg))
    openclip_config = path / "open_clip_config.json"
    if openclip_config.is_file():
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                return read_weights(path / name)  # the config beside it is read there
        raise CheckpointError(f"{path} has open_clip_config.json but no open_clip_model.safetensors or .bin")
    raise CheckpointError(
        f"{path} is a directory without a Hugging Face CLIP config.json or open_clip_config.json; "
        "give a weights file, or a directory saved by CLIPModel.save_pretrained or clip_train.export"
    )


def _text_embedding_key(cfg: ModelConfig) -> str:
    return "text.token_embedding.weight" if cfg.custom_text else "token_embedding.weight"


@cache
def _architecture_shapes(name: str) -> tuple[ModelConfig, dict[str, tuple[int, ...]]] | None:
    """The config and state-dict shapes of a named architecture (built on the meta device), or None when this
    build lacks one of its tower options and so cannot stand for it."""
    from clip_train.models.factory import build_model
    from clip_train.models.openclip_config import openclip_model_names, split_quickgelu, unsupported_fields
    from clip_train.models.registry import get_model_config

    base, _ = split_quickgelu(name)
    if base in openclip_model_names() and unsupported_fields(name):
        return None
    cfg = get_model_config(name)
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except (ImportError, ValueError, RuntimeError):
        return None
    return cfg, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _config_differences(configs: list[ModelConfig]) -> list[str]:
    """Dotted field names whose values differ between ``configs`` (``vision.head_width``, ``quick_gelu``)."""
    import dataclasses

    def flat(value: object, prefix: str = "") -> dict[str, object]:
        if dataclasses.is_dataclass(value):
            out: dict[str, object] = {}
            for f in dataclasses.fields(value):
                out.update(flat(getattr(value, f.name), f"{prefix}{f.name}."))
            return out
        return {prefix[:-1]: value}

    flats = [flat(c) for c in configs]
    keys = sorted({k for f in flats for k in f if k != "name"})
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def matching_architectures(state_dict: dict[str, torch.Tensor]) -> list[ModelConfig]:
    """Every named architecture (``list_models()``) whose state-dict key names and shapes equal ``state_dict``'s."""
    from clip_train.models.registry import list_models

    wanted = {k: tuple(v.shape) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    from clip_train.models.registry import get_model_config

    matches = []
    for name in list_models():
        try:
            cfg = get_model_config(name)
        except ValueError:  # needs a tower option this build lacks: it cannot stand for the weights
            continue
        key = _text_embedding_key(cfg)
        if not getattr(cfg.text, "hf_model_name", None) and wanted.get(key) != (cfg.text.vocab_size, cfg.text.width):
            continue  # the token embedding already rules it out: no need to build the model
        entry = _architecture_shapes(name)
        if entry is None:
            continue
        cfg, shapes = entry
        key = _text_embedding_key(cfg)
        if key in shapes and wanted.get(key) != shapes[key]:  # cheap first test: the token embedding
            continue
        expected = {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
        if cfg.init_logit_bias is None and "logit_bias" in wanted:  # a SigLIP-trained CLIP keeps its bias
            expected = {**expected, "logit_bias": ()}
        if expected == wanted:
            matches.append(copy.deepcopy(cfg))
    return matches


def config_from_state_dict(state_dict: dict[str, torch.Tensor], quick_gelu: bool | None = None) -> ModelConfig:
    """The one named architecture whose key names and shapes the state dict has; refused when not exactly one.

    Facts weights cannot show (head count, activation, pooling) are never guessed: when the matching names
    differ in any of them, the error lists the candidates and asks for the name. ``quick_gelu`` states the
    activation when the source is known (OpenAI's releases imply QuickGELU).
    """
    import dataclasses

    candidates = matching_architectures(state_dict)
    if quick_gelu is not None:
        for cfg in candidates:
            cfg.quick_gelu = quick_gelu
    distinct: list[ModelConfig] = []
    for cfg in candidates:
        if not any(dataclasses.replace(cfg, name="") == dataclasses.replace(d, name="") for d in distinct):
            distinct.append(cfg)
    if not distinct:
        raise CheckpointError(
            f"cannot infer the architecture: no known architecture has these {len(state_dict)} key names and shapes "
            "(see `python -m clip_train.models`); pass the model name explicitly"
        )
    if len(distinct) > 1:
        names = ", ".join(c.name for c in candidates)
        raise CheckpointError(
            f"cannot infer the architecture: the weights fit {names}, which differ in "
            f"{', '.join(_config_differences(distinct))} (not visible in weights); pass the model name explicitly, "
            f"e.g. create_model({candidates[0].name!r}, pretrained=...) or model.name=... with model=openclip"
        )
    return distinct[0]


def _name_from_folder(cfg: ModelConfig, folder: str | None) -> str:
    """A name for a model built from an ``open_clip_config.json``: its folder's (``hf download ORG/NAME
    --local-dir NAME`` gives ``NAME``), unless that names another architecture, whose tokenizer settings
    lookups by name would then pick up; ``open_clip_config`` then, as when there is no folder name."""
    from clip_train.models.registry import get_model_config

    if not folder:
        return "open_clip_config"
    try:
        known = get_model_config(folder)
    except ValueError:  # no model has this name
        return folder
    same = (known.embed_dim, known.vision, known.text) == (cfg.embed_dim, cfg.vision, cfg.text)
    return folder if same else "open_clip_config"


def resolve_architecture(weights: LoadedWeights) -> ModelConfig:
    """The architecture of weights loaded without a name: stored metadata first, then a unique match."""
    from omegaconf import OmegaConf

    from clip_train.models.openclip_config import translate
    from clip_train.models.registry import get_model_config

    if weights.model_config:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), weights.model_config))  # type: ignore[return-value]
    if weights.openclip_model_cfg is not None:
        cfg, missing = translate(weights.openclip_model_cfg, "open_clip_config")
        if missing:
            raise CheckpointError(f"open_clip_config.json needs tower options this build lacks: {', '.join(missing)}")
        cfg.name = _name_from_folder(cfg, weights.openclip_config_folder)
        return cfg
    if weights.architecture_name:
        try:
            cfg = get_model_config(weights.architecture_name)
        except ValueError:
            pass  # a custom OpenCLIP config: fall back to matching the weights
        else:
            return cfg
    return config_from_state_dict(weights.state_dict, quick_gelu=True if weights.openai_layout else None)


def _summarise(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def fit_problems(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Missing and unexpected keys and shape mismatches of ``state_dict`` against a model's ``expected`` one."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_summarise(mismatched)}")
    return problems


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf (the run that wrote them diverged), naming the tensors and the opt-out."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{source} holds non-finite weights (NaN or Inf) in {len(bad)} of {len(state_dict)} tensors: "
            f"{_summarise(bad)}; the run that wrote it had diverged. Use an earlier checkpoint, or set "
            "model.allow_nonfinite_weights=true (create_model(..., allow_nonfinite_weights=True)) to load them anyway"
        )


def load_weights_into(model: nn.Module, weights: LoadedWeights, source: str = "state dict",
                      allow_nonfinite: bool = False, resize_positions: bool = False) -> None:
    """Copy ``weights`` into ``model`` strictly, casting to the model's dtypes.

    With ``resize_positions`` (pretrained weights, not a run's checkpoint), positional embeddings made for
    another image size or context length are interpolated to the model's first (see ``resize``), each
    logged. Raises ``CheckpointError`` naming every missing or unexpected key and every shape mismatch, and
    (unless ``allow_nonfinite``) every tensor holding NaN or Inf.
    """
    expected = model.state_dict()
    state_dict = dict(weights.state_dict)
    # BatchNorm's counter is bookkeeping, not a weight; some exports drop it. A SigLIP model started from
    # CLIP weights keeps its freshly initialised logit_bias.
    for key, value in expected.items():
        if (key.endswith("num_batches_tracked") or key == "logit_bias") and key not in state_dict:
            state_dict[key] = value
    if resize_positions:
        lines = resize_position_embeddings(state_dict, expected)
        resize_tower = getattr(getattr(model, "visual", None), "resize_pretrained_positions", None)
        if resize_tower is not None:  # a tower whose own position table needs its own rule (timm trunks)
            lines += resize_tower(state_dict)
        for line in lines:
            log.info("%s: %s", source, line)
    problems = fit_problems(expected, state_dict)
    if problems:
        raise CheckpointError(
            f"{source} does not fit model {getattr(model, 'config', None) and model.config.name!s}: "
            + "; ".join(problems)
            + " — pick the architecture the weights were trained with, or pass name=None to infer it"
        )
    if not allow_nonfinite:
        check_finite(state_dict, source)
    cast = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True)
