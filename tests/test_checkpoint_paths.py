"""One checkpoint-path resolver: a run dir, ``checkpoints/latest``, a step directory or a file are accepted by
``create_model``, ``model.pretrained``, ``python -m clip_train.export``, ``eval --checkpoint`` and
``ckpt.resume`` alike."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import clip_train
from clip_train.checkpoint_paths import resolve_training_checkpoint, resolve_weights
from clip_train.eval.__main__ import main as eval_main
from clip_train.export import main as export_main
from clip_train.models import CheckpointError, create_model_from_config, get_model_config
from clip_train.train import checkpoint as ckpt_io
from tests.cli_helpers import FAST_DEMO, run_cli, train_losses

FORMS = ("run_dir", "latest", "step_dir", "state_file")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir with two checkpoints (steps 1 and 2; ``latest`` -> 2) of a perturbed tiny model."""
    torch.manual_seed(0)
    models = {}
    root = tmp_path_factory.mktemp("run")
    for step in (1, 2):
        model = clip_train.create_model("tiny").eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        ckpt_io.write_checkpoint(root / "checkpoints", step, {"model": model.state_dict(),
                                                              "model_config": dataclasses.asdict(model.config)})
        models[step] = model
    return root, models[2]


def _path(root: Path, form: str) -> Path:
    step_dir = root / "checkpoints" / ckpt_io.step_dir_name(2)
    return {"run_dir": root, "latest": root / "checkpoints" / ckpt_io.LATEST, "step_dir": step_dir,
            "state_file": step_dir / ckpt_io.STATE_FILE}[form]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("form", FORMS)
def test_create_model_and_model_pretrained_accept_every_form(run, form) -> None:
    root, newest = run
    _same_weights(clip_train.create_model("tiny", pretrained=_path(root, form)), newest)
    _same_weights(clip_train.create_model(pretrained=str(_path(root, form))), newest)  # architecture recorded
    cfg = dataclasses.replace(get_model_config("tiny"), pretrained=str(_path(root, form)))
    _same_weights(create_model_from_config(cfg), newest)  # the training config's model.pretrained


@pytest.mark.parametrize("form", FORMS)
def test_export_accepts_every_form(run, form, tmp_path) -> None:
    root, newest = run
    out = tmp_path / "model.safetensors"
    assert export_main([str(_path(root, form)), "--format", "safetensors", "--out", str(out)]) == 0
    exported = load_file(str(out))
    expected = newest.state_dict()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_eval_checkpoint_accepts_every_form(run, tmp_path, capsys) -> None:
    root, _ = run
    rng = np.random.default_rng(0)
    for name in ("dark", "light"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8) + (150 if name == "light" else 0)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    results = []
    for form in FORMS:
        assert eval_main(["zeroshot", "--checkpoint", str(_path(root, form)), "--data", str(tmp_path / "images"),
                          "--templates", "simple", "--no-progress"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert len({(r["top1"], json.dumps(r["per_class_top1"])) for r in results}) == 1


def test_resolver_refusals_are_one_line(run, tmp_path) -> None:
    root, newest = run
    weights = tmp_path / "weights.pt"
    torch.save(newest.state_dict(), weights)
    assert resolve_weights(weights) == weights  # a plain weights file is itself
    with pytest.raises(CheckpointError, match="model.pretrained=PATH"):
        resolve_training_checkpoint(weights)  # weights alone cannot resume a run
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_weights(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        resolve_training_checkpoint(tmp_path / "nothing")
    for form in ("run_dir", "latest", "step_dir", "state_file"):
        assert resolve_training_checkpoint(_path(root, form)) == _path(root, "step_dir").resolve()


def test_resume_from_checkpoints_latest_of_another_run(tmp_path) -> None:
    cache = tmp_path / "cache"
    first, second = tmp_path / "first", tmp_path / "second"
    args = [*FAST_DEMO, "data.batch_size=8", "ckpt.every_n_steps=0"]
    result = run_cli([*args, "train.max_steps=2", f"hydra.run.dir={first}"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    latest = first / "checkpoints" / ckpt_io.LATEST
    result = run_cli([*args, "train.max_steps=3", f"ckpt.resume={latest}", f"hydra.run.dir={second}"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stdout + result.stderr
    assert list(train_losses(second)) == [3]
