"""``python -m clip_train.from_openclip``: an OpenCLIP training command becomes the clip_train command that
trains the same run. OpenCLIP's own parser, loader length and schedulers are the reference."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip_train")
from open_clip_train.data import get_wds_dataset
from open_clip_train.params import parse_args
from open_clip_train.scheduler import const_lr_cooldown, cosine_lr

from clip_train.config import ConfigError, TrainConfig, register_configs, validate
from clip_train.from_openclip import main, split_command, translate
from clip_train.train.optim import lr_multiplier
from tests.cli_helpers import cli_env, read_metrics, run_to_completion

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# OpenCLIP's README example for LAION-400M on 8 GPUs (its epochs, warmup, batch, lr, wd, workers).
LAION_VIT_B32 = ("torchrun --nproc_per_node 8 -m open_clip_train.main --save-frequency 1 --zeroshot-frequency 1 "
                 "--report-to tensorboard --train-data /data/LAION-400M/{00000..41455}.tar "
                 "--train-num-samples 400000000 --warmup 2000 --batch-size=256 --lr=1e-3 --wd=0.1 --epochs=32 "
                 "--workers=8 --model ViT-B-32 --local-loss --gather-with-grad")
# A ResNet (OpenCLIP's ResNet betas and eps), gradient accumulation, two weighted resampled sources and a
# cooldown, under srun (its world size given to the translator).
RN50_COOLDOWN = ("srun python -m open_clip_train.main --train-data /a/{0..9}.tar::/b/{0..3}.tar "
                 "--train-data-upsampling-factors 1::2 --dataset-resampled --train-num-samples 100000 "
                 "--batch-size 64 --accum-freq 2 --workers 3 --model RN50 --epochs 6 --warmup 50 "
                 "--lr-scheduler const-cooldown --epochs-cooldown 2 --lr-cooldown-end 1e-5 --lr-cooldown-power 2 "
                 "--precision amp_bf16 --grad-clip-norm 1.0 --seed 7 --delete-previous-checkpoint")


def _compose(overrides: list[str]) -> TrainConfig:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
    return OmegaConf.to_object(cfg)


def _openclip_steps(openclip_args, world_size: int) -> tuple[int, int]:
    """(updates per epoch, total updates) as OpenCLIP's training script counts them, from its own loader."""
    openclip_args.world_size = world_size
    data = get_wds_dataset(openclip_args, lambda image: image, is_train=True, tokenizer=lambda text: text)
    per_epoch = data.dataloader.num_batches // openclip_args.accum_freq
    return per_epoch, per_epoch * openclip_args.epochs


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # OpenCLIP's loader, built, never iterated
@pytest.mark.parametrize(("command", "world_size"), [(LAION_VIT_B32, None), (RN50_COOLDOWN, 4)],
                         ids=["laion400m-vit-b32", "rn50-accum-cooldown"])
def test_a_translated_command_has_openclips_values_steps_and_learning_rates(command: str, world_size) -> None:
    argv = shlex.split(command)
    reference = parse_args(split_command(argv)[1])  # OpenCLIP's parser, with its model-dependent defaults
    translation = translate(argv, world_size=world_size)
    world = world_size or 8
    assert translation.world_size == world and translation.launcher == argv[:argv.index("-m")]
    cfg = _compose(translation.overrides)
    validate(cfg, world, "cuda")

    per_epoch, total = _openclip_steps(reference, world)
    assert cfg.train.max_steps == total and translation.steps_per_epoch == per_epoch
    assert cfg.ckpt.every_n_steps == per_epoch * reference.save_frequency
    assert cfg.model.name == reference.model and cfg.model.architecture_from_name
    assert cfg.data.batch_size == reference.batch_size * reference.accum_freq
    assert cfg.train.accum_steps == reference.accum_freq
    assert cfg.data.resampled == reference.dataset_resampled and cfg.data.num_workers == reference.workers
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps) == (reference.lr, reference.wd, reference.eps)
    assert cfg.optim.betas == [reference.beta1, reference.beta2]
    assert cfg.optim.no_decay == "openclip"  # the same tensors decayed: tests/test_zoo.py compares the groups
    assert cfg.optim.warmup_steps == reference.warmup and cfg.optim.grad_clip_norm == reference.grad_clip_norm
    assert cfg.train.seed == reference.seed and cfg.train.log_every_n_steps == reference.log_every_n_steps
    assert cfg.train.precision == {"amp": "fp16", "amp_bf16": "bf16"}[reference.precision]
    assert cfg.loss.name == "clip" and cfg.loss.temperature == 0.07

    if reference.lr_scheduler == "cosine":
        openclip_lr = cosine_lr(_sgd(), reference.lr, reference.warmup, total)
    else:
        openclip_lr = const_lr_cooldown(_sgd(), reference.lr, reference.warmup, total, per_epoch * reference.epochs_cooldown,
                                        reference.lr_cooldown_power, reference.lr_cooldown_end)
    # every update of a short schedule; the warmup and 5,000 points of LAION's 6.25 million
    steps = sorted({*range(min(total, 3000)), *range(0, total, max(1, total // 5000)), total - 1})
    multiplier = lr_multiplier(cfg.optim, cfg.train.max_steps)  # what the LambdaLR applies (tests/test_optim.py)
    assert [cfg.optim.lr * multiplier(s) for s in steps] == pytest.approx([openclip_lr(s) for s in steps],
                                                                          rel=1e-9, abs=1e-12)


def test_weighted_sources_tensorboard_and_notes_come_through(capsys) -> None:
    assert main(shlex.split(LAION_VIT_B32)) == 0
    out, err = capsys.readouterr()
    command = out.strip()
    assert "\n" not in command and command.startswith("torchrun --nproc_per_node 8 -m clip_train model=openclip ")
    assert "\"data.train_shards='/data/LAION-400M/{00000..41455}.tar'\"" in command  # quoted as the docs do
    assert "logger.tensorboard.enabled=true" in command and "data.epoch_samples=400000000" in command
    assert "note: --local-loss: no effect here" in err and "note: --gather-with-grad: no effect here" in err
    assert "32 epochs = train.max_steps=" in err

    cfg = _compose(translate([*shlex.split(RN50_COOLDOWN), "--imagenet-val", "/in/val", "--imagenet-v2", "/in/v2",
                              "--zeroshot-frequency", "2"], world_size=4).overrides)
    assert [(z.name, z.data, z.classnames, z.templates) for z in cfg.eval.zeroshot] == [
        ("imagenet", "/in/val", "imagenet", "openai"), ("imagenet_v2", "/in/v2", "imagenet", "openai")]
    assert cfg.eval.every_n_steps == 2 * translate(shlex.split(RN50_COOLDOWN), world_size=4).steps_per_epoch
    sources = cfg.data.train_shards
    assert [dict(s) for s in sources] == [{"shards": "/a/{0..9}.tar", "weight": 1.0},
                                          {"shards": "/b/{0..3}.tar", "weight": 2.0}]


@pytest.mark.parametrize(("flags", "message"), [
    ("--train-data pairs.csv --csv-img-key path --csv-caption-key caption",
     "python -m clip_train.data.make_shards pairs.csv shards/ --image-col path --caption-col caption"),
    ("--train-data /d/{0..9}.tar --precision pure_bf16", "the closest is --precision amp_bf16"),
    ("--train-data /d/{0..9}.tar --distill-model ViT-L-14", "--distill-model (distillation is not supported)"),
    ("--train-data /d/{0..9}.tar --pretrained laion2b_s34b_b79k", "download the weights file and pass its path"),
    ("--train-data /d/{0..9}.tar --model ViT-B-3", "(did you mean ViT-B-32?)"),
    ("--train-data /d/{0..9}.tar", "--train-num-samples is needed"),
])
def test_what_cannot_be_translated_is_one_line_naming_the_flag_and_the_way_out(flags: str, message: str,
                                                                               capsys) -> None:
    argv = ["python", "-m", "open_clip_train.main", *shlex.split(flags)]
    parse_args(argv[3:])  # a real OpenCLIP command line
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err


def test_the_crop_of_aug_cfg_is_translated_and_other_augmentations_are_refused(capsys) -> None:
    base = ["--train-data", "/d/{0..9}.tar", "--train-num-samples", "100"]
    reference = parse_args([*base, "--aug-cfg", "scale=(0.4, 1.0)", "ratio=(0.5,2)", "use_timm=True"]).aug_cfg
    cfg = _compose(translate([*base, "--aug-cfg", "scale=(0.4, 1.0)", "ratio=(0.5,2)", "use_timm=True"]).overrides)
    assert cfg.data.train_crop_scale == list(reference["scale"]) and cfg.data.train_crop_ratio == [0.5, 2.0]
    default = _compose(translate(base).overrides).data  # OpenCLIP's crop: scale (0.9, 1), ratio 3/4 to 4/3
    assert default.train_crop_scale == [0.9, 1.0] and default.train_crop_ratio == pytest.approx([0.75, 4 / 3])
    assert main(["--", *base, "--aug-cfg", "scale=(0.4,1)", "color_jitter=0.4", "re_prob=0.25"]) == 2
    assert "--aug-cfg color_jitter, re_prob (clip_train's training augmentation is the random resized crop" in (
        capsys.readouterr().err)


def test_siglip_and_coca_commands_compose_with_their_losses_and_a_local_tokenizer(tmp_path: Path, capsys) -> None:
    siglip = ["python", "-m", "open_clip_train.main", "--model", "ViT-B-16-SigLIP", "--siglip", "--train-data",
              "/d/{0..9}.tar", "--train-num-samples", "1000", "--precision", "amp_bf16"]
    parse_args(siglip[3:])
    assert main(siglip) == 2
    assert "needs the Hugging Face tokenizer 'timm/ViT-B-16-SigLIP'" in capsys.readouterr().err
    cfg = _compose(translate(siglip, tokenizer=str(tmp_path)).overrides)
    validate(cfg, 1, "cuda")
    assert (cfg.loss.name, cfg.tokenizer, cfg.model.name) == ("siglip", f"hf:{tmp_path}", "ViT-B-16-SigLIP")
    assert cfg.optim.betas == [0.9, 0.98]  # "vit" is in the name: OpenCLIP's ViT betas

    coca = ["python", "-m", "open_clip_train.main", "--model", "coca_ViT-B-32", "--train-data", "/d/{0..9}.tar",
            "--train-num-samples", "1000", "--coca-caption-loss-weight", "1.5", "--precision", "amp_bf16"]
    cfg = _compose(translate(coca).overrides)
    validate(cfg, 1, "cuda")
    assert (cfg.loss.name, cfg.loss.caption_loss_weight, cfg.loss.clip_loss_weight) == ("coca", 1.5, 1.0)


def test_a_broken_sizes_file_is_named_not_reported_missing(tmp_path: Path, capsys) -> None:
    (tmp_path / "sizes.json").write_text("[6, 4]")
    assert main(["--", "--train-data", str(tmp_path / "{0..1}.tar")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read shard manifest {tmp_path}/sizes.json" in err and "--train-num-samples is needed" not in err


def test_an_unknown_flag_or_launcher_is_refused(capsys) -> None:
    assert main(["--", "--train-data", "/d/0.tar", "--learning-rate", "3"]) == 2
    assert "unrecognized arguments: --learning-rate 3" in capsys.readouterr().err
    assert main(["srun", "python", "-m", "open_clip_train.main", "--train-data", "/d/0.tar"]) == 2
    assert "pass --world-size N" in capsys.readouterr().err


def test_the_printed_command_trains_the_demo_with_openclips_learning_rate_at_every_step(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    from clip_train.data.demo import ensure_demo_data

    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIP_TRAIN_CACHE", str(cache))
    demo = ensure_demo_data(str(cache))
    # No --train-num-samples: the epoch length comes from the shards' manifest, as OpenCLIP's from sizes.json.
    samples = sum(e["num_samples"] for e in json.loads((Path(demo.train_shards).parent / "shards.json"
                                                        ).read_text())["shards"])
    openclip = ["python", "-m", "open_clip_train.main", "--model", "tiny", "--train-data", demo.train_shards,
                "--batch-size", "512", "--epochs", "1", "--warmup", "3", "--lr", "2e-3", "--precision", "fp32",
                "--device", "cpu", "--workers", "0", "--log-every-n-steps", "1", "--logs", str(tmp_path),
                "--name", "run 1", "--seed", "3"]
    printed = shlex.split(translate(openclip).command)
    assert printed[:3] == ["python", "-m", "clip_train"]
    result = run_to_completion([sys.executable, *printed[1:]], 600, cwd=tmp_path, env=cli_env(cache))
    assert result.returncode == 0, result.stderr[-3000:]

    reference = parse_args(openclip[3:] + ["--train-num-samples", str(samples)])
    _, total = _openclip_steps(reference, 1)
    logged = [m for m in read_metrics(tmp_path / "run 1") if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, total + 1))
    # metrics.jsonl's lr at step s is the schedule's after s updates: what OpenCLIP logs at its step s
    # (it counts updates from 0), so the two runs' lr curves overlay.
    openclip_lr = cosine_lr(_sgd(), 2e-3, 3, total)
    assert [m["lr"] for m in logged] == pytest.approx([openclip_lr(m["step"]) for m in logged], rel=1e-6)
    assert logged[0]["lr"] == pytest.approx(2e-3 * 2 / 3)


@pytest.mark.parametrize(("precision", "hint"), [
    ("amp_bf16", "OpenCLIP's amp_bf16 is train.precision=bf16 here"),
    ("amp", "OpenCLIP's amp is train.precision=fp16 here"),
    ("pure_bf16", "the closest is train.precision=bf16"),
])
def test_an_openclip_precision_name_in_the_config_is_refused_with_ours(precision: str, hint: str) -> None:
    cfg = TrainConfig()
    cfg.train.precision = precision
    with pytest.raises(ConfigError, match=rf"^train.precision='{precision}' is not one of fp32, bf16, fp16 \(") as info:
        validate(cfg, 1, "cuda")
    assert hint in str(info.value)
