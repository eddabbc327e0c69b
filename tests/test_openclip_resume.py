"""Continuing an OpenCLIP run from its ``epoch_N.pt`` (``ckpt.resume=FILE``), against OpenCLIP's own code.

The exactness test trains an OpenCLIP model with OpenCLIP's optimizer groups (its rule read from its source)
and its loss, saves the checkpoint as its training script does, and checks that one more update here equals
one more update there. The end-to-end test continues a checkpoint written by ``open_clip_train.main`` itself
with the command ``python -m clip_train.from_openclip`` prints.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip_train.scheduler import cosine_lr

from clip_train.config import OptimConfig
from clip_train.from_openclip import translate
from clip_train.models import CLIP, get_model_config
from clip_train.models.openclip_config import to_openclip
from clip_train.models.pretrained import CheckpointError
from clip_train.train import checkpoint as ckpt_io
from clip_train.train.openclip_run import read_openclip_checkpoint, state_from_openclip
from clip_train.train.optim import apply_config_on_resume, build_optimizer, build_scheduler
from tests.cli_helpers import REPO, cli_env, read_metrics, run_to_completion
from tests.zoo_reference import openclip_decay_exemption

LR, WD, BETAS, EPS = 1e-3, 0.2, (0.9, 0.98), 1e-6


def _openclip_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW as ``open_clip_train.main`` builds it (the model wrapped in DDP, hence the "module." names)."""
    exclude = openclip_decay_exemption()
    named = [(f"module.{n}", p) for n, p in model.named_parameters()]
    return torch.optim.AdamW([
        {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": WD},
    ], lr=LR, betas=BETAS, eps=EPS)


def _update(model, optimizer, batch) -> None:
    images, tokens = batch
    image = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    optimizer.zero_grad()
    open_clip.ClipLoss()(image, text, model.logit_scale.exp()).backward()
    optimizer.step()


def _batch(seed: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, cfg.vision.image_size, cfg.vision.image_size, generator=generator)
    tokens = torch.zeros(8, cfg.text.context_length, dtype=torch.long)
    tokens[:, :6] = torch.randint(1, cfg.text.vocab_size - 1, (8, 6), generator=generator)
    tokens[:, 6] = cfg.text.vocab_size - 1  # the end token, where the text tower pools
    return images, tokens


def _loader_state(mode: str) -> dict:
    return {"version": 2, "mode": mode, "global_batch_size": 8, "epoch": 0, "batches_in_epoch": 0,
            "samples_seen": 0, "world_size": 1, "skipped_samples": 0, "skipped_shards": 0}


def _save_like_openclip(path: Path, epoch: int, model, optimizer) -> None:
    torch.save({"epoch": epoch, "name": "tiny", "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict()}, path)


@pytest.mark.parametrize("lock_text", [False, True], ids=["all-trained", "text-locked"])
def test_one_more_update_from_an_openclip_checkpoint_equals_openclips_own(tmp_path: Path, lock_text: bool) -> None:
    cfg = get_model_config("tiny")
    reference = open_clip.CLIP(**to_openclip(cfg))
    if lock_text:  # frozen tensors are left out of OpenCLIP's groups and of ours alike
        for name, param in reference.named_parameters():
            if not name.startswith(("visual.", "logit_scale")):
                param.requires_grad_(False)
    openclip_optimizer = _openclip_optimizer(reference)
    for seed in range(3):
        _update(reference, openclip_optimizer, _batch(seed, cfg))
    _save_like_openclip(tmp_path / "epoch_3.pt", 3, reference, openclip_optimizer)
    _update(reference, openclip_optimizer, _batch(99, cfg))  # OpenCLIP's next update

    ours = CLIP(cfg)  # other random weights: all of them must come from the file
    if lock_text:
        for name, param in ours.named_parameters():
            if not name.startswith(("visual.", "logit_scale")):
                param.requires_grad_(False)
    optim_cfg = OptimConfig(lr=LR, weight_decay=WD, betas=list(BETAS), eps=EPS, no_decay="openclip",
                            schedule="const", warmup_steps=0)
    optimizer = build_optimizer(ours, optim_cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps=100)
    state = state_from_openclip(
        tmp_path / "epoch_3.pt", read_openclip_checkpoint(tmp_path / "epoch_3.pt"), model=ours,
        optimizer=optimizer, scheduler=scheduler, scaler=torch.amp.GradScaler("cpu", enabled=False),
        loader_state=_loader_state("epoch"), steps_per_epoch=1,
    )
    ours.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    apply_config_on_resume(optimizer, scheduler, optim_cfg)
    assert state["train_state"]["step"] == 3 and state["per_rank"][0]["dataloader"]["epoch"] == 3
    _update(ours, optimizer, _batch(99, cfg))

    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        mine, other = param, theirs[name]
        if name.endswith("attn.in_proj_bias"):
            # The key bias (the middle third) gets a zero gradient in exact arithmetic (softmax ignores a shift),
            # so AdamW normalises rounding noise there; the query and value biases carry the comparison.
            third = mine.shape[0] // 3
            mine, other = torch.cat([mine[:third], mine[2 * third:]]), torch.cat([other[:third], other[2 * third:]])
        torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6, msg=lambda text, name=name: f"{name}: {text}")
    steps = {float(s["step"]) for s in optimizer.state_dict()["state"].values()}
    assert steps == {4.0}


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path: Path) -> None:
    cfg = get_model_config("tiny")
    reference = open_clip.CLIP(**to_openclip(cfg))
    openclip_optimizer = _openclip_optimizer(reference)
    _update(reference, openclip_optimizer, _batch(0, cfg))
    path = tmp_path / "epoch_1.pt"
    _save_like_openclip(path, 1, reference, openclip_optimizer)
    ours = CLIP(cfg)
    for name, param in ours.named_parameters():  # a run that locks the text tower the other did not
        if name.startswith("transformer."):
            param.requires_grad_(False)
    optim_cfg = OptimConfig(no_decay="openclip")
    optimizer = build_optimizer(ours, optim_cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps=10)
    arguments = {"model": ours, "optimizer": optimizer, "scheduler": scheduler,
                 "scaler": torch.amp.GradScaler("cpu", enabled=False), "loader_state": _loader_state("resampled")}
    with pytest.raises(CheckpointError, match=r"(no-decay|decayed) group holds \d+ tensors, this run trains \d+ such: lock the "
                                              r"towers as that run did"):
        state_from_openclip(path, read_openclip_checkpoint(path), steps_per_epoch=5, **arguments)
    for param in ours.parameters():
        param.requires_grad_(True)
    optimizer = build_optimizer(ours, optim_cfg, torch.device("cpu"))
    arguments.update(optimizer=optimizer, scheduler=build_scheduler(optimizer, optim_cfg, total_steps=10))
    with pytest.raises(CheckpointError, match=r"took 1 steps, more than epoch 1 x ckpt.openclip_steps_per_epoch=0"):
        state_from_openclip(path, read_openclip_checkpoint(path), steps_per_epoch=0, **arguments)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")  # weights alone: that is model.pretrained
    with pytest.raises(CheckpointError, match=r"lacks epoch, state_dict, optimizer\): .* model.pretrained=PATH$"):
        read_openclip_checkpoint(tmp_path / "weights.pt")


OPENCLIP_MAIN = """
import json, sys
from pathlib import Path
import open_clip
from clip_train.models import get_model_config
from clip_train.models.openclip_config import to_openclip
configs = Path(sys.argv[1])
configs.mkdir(exist_ok=True)
(configs / "tiny.json").write_text(json.dumps(to_openclip(get_model_config("tiny"))))
open_clip.add_model_config(configs)  # OpenCLIP's own way to register an architecture
from open_clip_train.main import main
main(sys.argv[2:])
"""


def test_a_run_of_openclips_training_script_continues_here_with_the_printed_command(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    from clip_train.data.demo import ensure_demo_data

    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIP_TRAIN_CACHE", str(cache))
    demo = ensure_demo_data(str(cache))
    common = ["--model", "tiny", "--train-num-samples", "400", "--batch-size", "100", "--warmup", "3", "--lr", "2e-3",
              "--precision", "fp32", "--device", "cpu", "--workers", "0", "--seed", "3", "--log-every-n-steps", "1"]
    # OpenCLIP's first epoch, by its own script (its synthetic data: its WebDataset reader does not run with
    # the installed webdataset); it writes logs/first/checkpoints/epoch_1.pt.
    first = run_to_completion([sys.executable, "-c", OPENCLIP_MAIN, str(tmp_path / "configs"), *common,
                               "--dataset-type", "synthetic", "--epochs", "1", "--logs", str(tmp_path / "logs"),
                               "--name", "first"], 300, cwd=tmp_path, env=cli_env(cache))
    assert first.returncode == 0, first.stderr[-3000:]
    epoch_file = tmp_path / "logs" / "first" / "checkpoints" / "epoch_1.pt"
    saved = torch.load(epoch_file, weights_only=True)

    # The same run for 2 epochs, resumed as OpenCLIP users do (--resume latest, same --logs/--name):
    # translated, then run as printed, in OpenCLIP's log dir.
    command = ["python", "-m", "open_clip_train.main", *common, "--train-data", demo.train_shards, "--epochs", "2",
               "--resume", "latest", "--logs", str(tmp_path / "logs"), "--name", "first"]
    translation = translate(command)
    assert translation.steps_per_epoch == 4
    assert {f"ckpt.resume='{epoch_file}'", "ckpt.openclip_steps_per_epoch=4"} <= set(translation.overrides)
    explicit = translate([str(epoch_file) if arg == "latest" else arg for arg in command])  # --resume FILE
    assert explicit.overrides == translation.overrides
    printed = [sys.executable, *shlex.split(translation.command)[1:]]
    result = run_to_completion(printed, 600, cwd=REPO, env=cli_env(cache))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "OpenCLIP's checkpoint after epoch 1" in output and "continue at step 4" in output
    run_dir = tmp_path / "logs" / "first"
    logged = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in logged] == [5, 6, 7, 8]  # epoch 2, on OpenCLIP's schedule over 2 epochs
    openclip_lr = cosine_lr(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.0), 2e-3, 3, 8)
    assert [m["lr"] for m in logged] == pytest.approx([openclip_lr(m["step"]) for m in logged], rel=1e-6)

    final = ckpt_io.load_checkpoint(ckpt_io.find_resumable(run_dir / "checkpoints"))
    openclip_steps = {float(s["step"]) for s in saved["optimizer"]["state"].values()}
    assert openclip_steps == {4.0}
    assert {float(s["step"]) for s in final["optimizer"]["state"].values()} == {8.0}  # its 4 updates, then ours
    assert final["train_state"]["step"] == 8

    # Requeued with the same command: the run continues from its own step 8, not again from epoch_1.pt.
    again = run_to_completion(printed, 600, cwd=REPO, env=cli_env(cache))
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resumed from" in again.stdout + again.stderr and "OpenCLIP's checkpoint" not in again.stdout + again.stderr
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == [5, 6, 7, 8]
    assert epoch_file.is_file()
