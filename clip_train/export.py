"""``python -m clip_train.export CKPT --format open_clip|hf|safetensors --out PATH``: take a model elsewhere.

Formats:

- ``safetensors``: one file, the state dict in OpenAI's key layout (which OpenCLIP shares), with the
  architecture as JSON in the file's metadata. ``clip_train.create_model(pretrained=FILE)`` and
  ``open_clip.create_model("ViT-B-16", pretrained=FILE)`` read it.
- ``open_clip``: a directory OpenCLIP loads by itself, for every architecture of its zoo (the config is
  written back through ``clip_train.models.openclip_config``): ``open_clip_config.json`` (model config and the
  model's preprocessing: mean, std, interpolation, resize mode), ``open_clip_model.safetensors``, ``<name>.json``
  (the bare model config, for ``open_clip.add_model_config``) and, for a model whose text tower reads a Hugging
  Face tokenizer (SigLIP, CLIPA, multilingual towers), that tokenizer's files, from ``--tokenizer hf:PATH`` or
  the run's ``tokenizer=`` (``open_clip.get_tokenizer("local-dir:OUT")`` reads them there). Load it with
  ``open_clip.create_model("local-dir:OUT")``, or register the architecture and load the weights by name::

      open_clip.add_model_config("OUT/tiny.json")
      open_clip.create_model("tiny", pretrained="OUT/open_clip_model.safetensors")

- ``hf``: a ``transformers.CLIPModel`` directory (``config.json``, ``model.safetensors``) with a matching
  ``CLIPProcessor`` (``preprocessor_config.json``, CLIP's BPE as ``vocab.json``/``merges.txt``, tokenizer
  config). ViT image towers only: transformers has no ModifiedResNet.

All files are written directly (no OpenCLIP or transformers import), as fp32 unless ``--dtype`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from clip_train.models import CLIP, CheckpointError
from clip_train.models.config import ModelConfig
from clip_train.models.hf import HFConversionError, check_convertible, hf_config, to_hf_state_dict
from clip_train.models.openclip_config import to_openclip
from clip_train.tokenizer import (
    HF_PREFIX,
    NUM_MERGES,
    get_model_tokenizer,
    get_tokenizer,
    model_tokenizer_need,
)

FORMATS = ("open_clip", "hf", "safetensors")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONFIG_METADATA_KEY = "clip_train_model_config"
OPENCLIP_CONFIG_FILE = "open_clip_config.json"
OPENCLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
HF_START, HF_END = "<|startoftext|>", "<|endoftext|>"
_TRAINING_ONLY = ("pretrained", "grad_checkpointing", "patch_dropout", "lock_image", "lock_image_unlocked_groups",
                  "lock_text", "lock_text_unlocked_groups")


class ExportError(ValueError):
    """A model that cannot be written in the asked format, or an output path that cannot be used."""


def _weights(model: CLIP, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU, floating tensors cast to ``dtype``, every tensor its own storage."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous().clone()
    return out


def architecture(cfg: ModelConfig) -> dict:
    """The architecture fields of ``cfg`` as plain JSON (training-time options such as locking dropped)."""
    doc = dataclasses.asdict(cfg)
    for key in _TRAINING_ONLY:
        doc.pop(key, None)
    return doc


def export_safetensors(model: CLIP, out: Path, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write the state dict (OpenAI/OpenCLIP layout) to ``out`` with the architecture in the metadata."""
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out} must end in .safetensors for --format safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(architecture(model.config))}
    save_file(_weights(model, dtype), str(out), metadata=metadata)
    return [out]


def open_clip_model_config(model: CLIP) -> dict:
    """OpenCLIP's ``model_cfg`` for this architecture (see ``clip_train.models.openclip_config.to_openclip``)."""
    model_cfg = to_openclip(model.config)
    if model.logit_bias is not None:  # SigLIP: OpenCLIP creates the parameter only when given an initial value
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    return model_cfg


def open_clip_preprocess_config(model: CLIP) -> dict:
    """OpenCLIP's ``preprocess_cfg`` for the model: its size and its own mean, std, interpolation, resize mode."""
    pre = model.config.preprocessing
    return {"size": model.config.vision.image_size, "mode": "RGB", "mean": list(pre.mean), "std": list(pre.std),
            "interpolation": pre.interpolation, "resize_mode": pre.resize_mode}


def export_open_clip(model: CLIP, out: Path, dtype: torch.dtype = torch.float32,
                     tokenizer: str | None = None) -> list[Path]:
    """Write an OpenCLIP ``local-dir`` model: config JSON, weights, the bare model config by name, and the
    HF tokenizer's files when the text tower needs one and ``tokenizer`` (``hf:PATH``) gives it."""
    model_cfg = open_clip_model_config(model)
    hf_tokenizer = _hf_tokenizer_for(model, tokenizer)
    if hf_tokenizer is not None and not model_cfg["text_cfg"].get("hf_tokenizer_name"):
        # The run tokenized with an HF tokenizer the architecture does not name: say so, or OpenCLIP uses CLIP BPE.
        model_cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer[len(HF_PREFIX):]
    out.mkdir(parents=True, exist_ok=True)
    files = [out / OPENCLIP_CONFIG_FILE, out / OPENCLIP_WEIGHTS_FILE, out / f"{_file_stem(model.config.name)}.json"]
    files[0].write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": open_clip_preprocess_config(model)},
                                   indent=2))
    save_file(_weights(model, dtype), str(files[1]), metadata={"format": "pt"})
    files[2].write_text(json.dumps(model_cfg, indent=2))
    if hf_tokenizer is not None:
        before = set(out.iterdir())
        hf_tokenizer.tokenizer.save_pretrained(str(out))
        files += sorted(set(out.iterdir()) - before)
    if getattr(model.visual, "resized_trunk", False):
        _note_resized_timm_trunk(model, files)
    if hf_tokenizer is None and model_tokenizer_need(model.config):
        print(f"clip_train.export: note: {out} has no tokenizer files, but {model.config.name} reads the Hugging Face "
              f"tokenizer {model_tokenizer_need(model.config)!r}, so open_clip.get_tokenizer('local-dir:{out}') "
              f"cannot load one; export again with --tokenizer hf:PATH (a local directory of its files)",
              file=sys.stderr)
    return files


def _note_resized_timm_trunk(model: CLIP, files: list[Path]) -> None:
    """OpenCLIP builds a timm trunk at timm's size and loads weights before ``force_image_size`` resizes it,
    so its ``local-dir:`` load refuses a resized trunk's weights: say how OpenCLIP reads them instead."""
    size, (height, width) = model.config.vision.image_size, model.visual.timm_image_size
    print(f"clip_train.export: note: OpenCLIP builds {model.config.vision.timm_model_name} at timm's {height}x{width} "
          f"and resizes it only after loading weights, so open_clip.create_model('local-dir:{files[0].parent}') "
          f"refuses these {size}-pixel weights; load them with open_clip.add_model_config('{files[2]}'), "
          f"model = open_clip.create_model('{files[2].stem}', force_image_size={size}), "
          f"model.load_state_dict(safetensors.torch.load_file('{files[1]}'))", file=sys.stderr)


def _hf_tokenizer_for(model: CLIP, tokenizer: str | None):  # -> clip_train.tokenizer.HFTokenizer | None
    """The HF tokenizer ``tokenizer`` (``hf:PATH``) names, loaded as the model uses it (None when not given)."""
    if tokenizer is None:
        return None
    if not tokenizer.startswith(HF_PREFIX):
        raise ExportError(f"--tokenizer {tokenizer!r}: give hf:PATH, a local Hugging Face tokenizer directory")
    try:
        return get_model_tokenizer(model.config, tokenizer)
    except (OSError, ValueError, ImportError) as err:
        raise ExportError(f"{err} (the tokenizer an open_clip export carries; --tokenizer hf:PATH sets it)") from None


def run_tokenizer(source: str | Path) -> str | None:
    """The ``tokenizer=`` setting of the training run ``source`` belongs to (its ``.hydra/config.yaml``, found
    from the run dir, its ``checkpoints/`` or a step directory), or None (not a run, or CLIP's BPE)."""
    path = Path(source).expanduser().resolve()
    for folder in [path, *path.parents][:4]:
        saved = folder / ".hydra" / "config.yaml"
        if saved.is_file():
            import yaml

            value = (yaml.safe_load(saved.read_text()) or {}).get("tokenizer")
            return str(value) if value else None
    return None


def _file_stem(name: str) -> str:
    """An architecture name usable as a file name (OpenCLIP registers a config under its file stem)."""
    return name.replace("/", "-") or "model"


def _hf_tokenizer_files(out: Path, context_length: int) -> list[Path]:
    """CLIP's BPE in the files transformers' ``CLIPTokenizer`` reads (same ids as ``clip_train.tokenizer``)."""
    tokenizer = get_tokenizer(context_length=context_length)
    vocab = dict(tokenizer.encoder)
    vocab[HF_START] = vocab.pop(next(k for k, v in vocab.items() if v == tokenizer.sot_token_id))
    vocab[HF_END] = vocab.pop(next(k for k, v in vocab.items() if v == tokenizer.eot_token_id))
    merges = sorted(tokenizer.merge_ranks, key=tokenizer.merge_ranks.get)
    if len(merges) != NUM_MERGES:
        raise ExportError(f"tokenizer has {len(merges)} merges, expected {NUM_MERGES}")
    specials = {"bos_token": HF_START, "eos_token": HF_END, "unk_token": HF_END, "pad_token": HF_END}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(specials, indent=2),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
                                             "model_max_length": context_length, "do_lower_case": True,
                                             "errors": "replace", **specials}, indent=2),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in files]


def export_hf(model: CLIP, out: Path, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write a ``transformers.CLIPModel`` directory with its processor files."""
    check_convertible(model.config)
    hf_weights = to_hf_state_dict(_weights(model, dtype), model.config)
    out.mkdir(parents=True, exist_ok=True)
    size = model.config.vision.image_size
    pre = model.config.preprocessing
    config = hf_config(model.config, logit_scale=float(model.logit_scale.detach()))
    config["dtype"] = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": PIL_RESAMPLE[pre.interpolation],  # as clip_train's eval transform
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
        "do_convert_rgb": True,
    }
    if pre.resize_mode == "squash":  # the whole image to size x size, no crop (CLIPImageProcessor's height/width)
        preprocessor["size"] = {"height": size, "width": size}
        preprocessor["do_center_crop"] = False
    files = [out / "config.json", out / "model.safetensors", out / "preprocessor_config.json"]
    files[0].write_text(json.dumps(config, indent=2))
    save_file(hf_weights, str(files[1]), metadata={"format": "pt"})
    files[2].write_text(json.dumps(preprocessor, indent=2))
    return files + _hf_tokenizer_files(out, model.config.text.context_length)


EXPORTERS = {"safetensors": export_safetensors, "open_clip": export_open_clip, "hf": export_hf}
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL's filter numbers, as preprocessor_config.json's "resample"


def export(model: CLIP, fmt: str, out: str | Path, dtype: str = "fp32", tokenizer: str | None = None) -> list[Path]:
    """Write ``model`` in format ``fmt`` to ``out``; returns the files written. ``tokenizer`` (``hf:PATH``)
    is the HF tokenizer an ``open_clip`` export carries for text towers that need one."""
    if fmt not in EXPORTERS:
        raise ExportError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    if fmt != "safetensors" and out.is_file():
        raise ExportError(f"--out {out} is a file; --format {fmt} writes a directory")
    if fmt == "open_clip":
        return export_open_clip(model, out, DTYPES[dtype], tokenizer=tokenizer)
    return EXPORTERS[fmt](model, out, DTYPES[dtype])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.export",
        description="Export a clip_train checkpoint (or any weights clip_train reads) for OpenCLIP or transformers.",
    )
    parser.add_argument("checkpoint", help="run dir, checkpoints dir, step dir, state.pt, or a weights file/dir")
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--out", required=True, help="output directory (open_clip, hf) or .safetensors file")
    parser.add_argument("--model", default=None,
                        help="architecture name, for weights files that do not record it (e.g. ViT-B-16-quickgelu)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the written weights")
    parser.add_argument("--tokenizer", default=None,
                        help="hf:PATH, the local Hugging Face tokenizer an open_clip export carries for text towers "
                             "that need one (SigLIP, CLIPA, multilingual); default: the run's tokenizer= setting")
    args = parser.parse_args(argv)
    from clip_train.load import load_model

    try:
        model = load_model(args.checkpoint, name=args.model)
        tokenizer = args.tokenizer or run_tokenizer(args.checkpoint)
        files = export(model, args.format, args.out, args.dtype, tokenizer=tokenizer)
    except (CheckpointError, ExportError, HFConversionError) as err:
        print(f"clip_train.export: error: {err}", file=sys.stderr)
        return 2
    for file in files:
        print(file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
