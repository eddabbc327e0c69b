"""``clip_train.load.load_model``: every kind of checkpoint a run leaves, and clear errors for the rest."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed.checkpoint as dcp

import clip_train
from clip_train.load import load_model
from clip_train.models import CheckpointError
from clip_train.train import checkpoint as ckpt_io
from clip_train.train import torch_compat


def _model():
    torch.manual_seed(0)
    model = clip_train.create_model("tiny").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def _same(a, b) -> None:
    images = torch.randn(2, 3, 32, 32)
    tokens = clip_train.get_tokenizer("tiny")(["a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))


def test_loads_run_dir_step_dir_and_state_file(tmp_path):
    model = _model()
    state = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}
    step_dir = ckpt_io.write_checkpoint(tmp_path / "run" / "checkpoints", 4, state)
    for source in (tmp_path / "run", tmp_path / "run" / "checkpoints", step_dir, step_dir / "state.pt"):
        _same(model, load_model(source))


@pytest.mark.parametrize("dcp_load_takes_no_dist", [True, False], ids=["dcp.load", "torch-2.4-loader"])
def test_loads_an_fsdp_sharded_checkpoint(tmp_path, monkeypatch, dcp_load_takes_no_dist):
    """An FSDP run keeps the weights as DCP shards in sharded/ and only the config in state.pt; a torch
    older than 2.5 (whose dcp.load cannot be told to read in one process) loads it too."""
    if dcp_load_takes_no_dist and not torch_compat.DCP_LOAD_TAKES_NO_DIST:
        pytest.skip(f"torch {torch.__version__}'s dcp.load takes no no_dist")
    monkeypatch.setattr(torch_compat, "DCP_LOAD_TAKES_NO_DIST", dcp_load_takes_no_dist)
    model = _model()
    root = tmp_path / "run" / "checkpoints"
    tmp = ckpt_io.start_checkpoint(root, 9)
    dcp.save({"model": model.state_dict()}, checkpoint_id=tmp / "sharded")  # one writer holds every shard
    torch.save({"model_config": dataclasses.asdict(model.config)}, tmp / ckpt_io.STATE_FILE)
    ckpt_io.commit_checkpoint(root, 9, tmp)
    _same(model, load_model(tmp_path / "run"))


def test_damaged_or_missing_checkpoints_are_refused(tmp_path):
    model = _model()
    step_dir = ckpt_io.write_checkpoint(tmp_path / "checkpoints", 1, {"model": model.state_dict(),
                                                                      "model_config": dataclasses.asdict(model.config)})
    with open(step_dir / "state.pt", "r+b") as f:  # flip bytes: the manifest's SHA-256 no longer matches
        f.seek(100)
        f.write(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(step_dir)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path / "empty")
