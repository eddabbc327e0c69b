"""Memory and speed options: grad checkpointing, patch dropout, locked towers, channels_last, compile,
FSDP2 with sharded checkpoints (in-process on a one-rank gloo group, and 2 ranks under torchrun)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

import clip_train
from clip_train.config import ConfigError, TrainConfig, validate
from clip_train.models import CLIP, ModelConfig, TextConfig, VisionConfig, get_model_config
from clip_train.models.lock import FrozenStatsBatchNorm2d
from clip_train.train import checkpoint as ckpt_io
from clip_train.train import sharded_checkpoint as sharded_io
from clip_train.train.distributed import DistributedContext
from clip_train.train.optim import build_optimizer
from clip_train.train.parallelize import clip_grad_norm, parallelize
from clip_train.train.trainer import build_model
from tests.cli_helpers import FAST_DEMO, read_metrics, run_cli, train_losses
from tests.torch_support import requires_fsdp

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_resnet() -> ModelConfig:
    return ModelConfig(
        name="tiny-rn", embed_dim=32,
        vision=VisionConfig(image_size=32, layers=[1, 1, 1, 1], width=16, patch_size=None),
        text=TextConfig(context_length=16, width=32, heads=1, layers=1),
    )


def train_config(model: ModelConfig | None = None, **train) -> TrainConfig:
    cfg = TrainConfig(model=model or get_model_config("tiny"))
    cfg.train = dataclasses.replace(cfg.train, precision="fp32", **train)
    return cfg


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 32, 32), clip_train.get_tokenizer("tiny")([f"caption {i} of {n}" for i in range(n)])


def contrastive_loss(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    image_features, text_features, scale = model(images, tokens)
    return (scale * image_features @ text_features.T).logsumexp(dim=1).mean()


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_grad_checkpointing_option_gives_the_same_gradients(arch: str) -> None:
    model_cfg = get_model_config("tiny") if arch == "vit" else tiny_resnet()
    images, tokens = batch()
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        cfg = train_config(dataclasses.replace(model_cfg, grad_checkpointing=enabled))
        model = build_model(cfg)
        module = parallelize(model, cfg, CPU).module
        assert model.transformer.grad_checkpointing is enabled
        assert model.visual.transformer.grad_checkpointing is enabled if arch == "vit" else \
            model.visual.grad_checkpointing is enabled
        contrastive_loss(module, images, tokens).backward()
        grads.append(grads_of(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- patch dropout


def test_patch_dropout_shortens_the_sequence_in_training_only_and_keeps_the_class_token() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_model_config("tiny"), patch_dropout=0.5)
    model = CLIP(cfg)
    plain = CLIP(get_model_config("tiny"))
    plain.load_state_dict(model.state_dict())  # same keys: patch dropout adds no parameters
    seen: list[torch.Tensor] = []
    model.visual.transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    images, _ = batch()

    model.train()
    model.encode_image(images)
    patches = model.visual.grid_size**2
    assert seen[-1].shape[1] == 1 + patches // 2
    # Token 0 is still the class token: class embedding + its position, then ln_pre.
    cls = model.visual.ln_pre(model.visual.class_embedding + model.visual.positional_embedding[0])
    torch.testing.assert_close(seen[-1][:, 0], cls.expand(len(images), -1))
    first = model.encode_image(images)
    assert not torch.allclose(first, model.encode_image(images)), "a fresh random subset each call"

    model.eval()
    with torch.no_grad():
        out = model.encode_image(images)
        assert seen[-1].shape[1] == 1 + patches
        torch.testing.assert_close(out, plain.eval().encode_image(images))


def test_patch_dropout_on_a_resnet_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="patch_dropout.*not a CLIP ViT"):
        CLIP(dataclasses.replace(tiny_resnet(), patch_dropout=0.5))
    with pytest.raises(ConfigError, match="patch_dropout"):
        validate(train_config(dataclasses.replace(tiny_resnet(), patch_dropout=0.5)), 1, "cpu")
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        validate(train_config(dataclasses.replace(get_model_config("tiny"), patch_dropout=1.0)), 1, "cpu")


# ---------------------------------------------------------------- locked towers


def step_once(model: CLIP, cfg: TrainConfig) -> torch.optim.Optimizer:
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    contrastive_loss(model, *batch()).backward()
    optimizer.step()
    return optimizer


def optimized_names(model: CLIP, optimizer: torch.optim.Optimizer) -> set[str]:
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with_state = {id(p) for p in optimizer.state}
    assert with_state <= in_optimizer
    return {name for name, p in model.named_parameters() if id(p) in in_optimizer}


def test_locked_image_tower_gets_no_gradient_and_no_optimizer_state() -> None:
    cfg = train_config(dataclasses.replace(get_model_config("tiny"), lock_image=True))
    model = build_model(cfg)
    keys_before = list(CLIP(get_model_config("tiny")).state_dict())
    assert list(model.state_dict()) == keys_before
    before = {n: p.detach().clone() for n, p in model.visual.named_parameters()}
    optimizer = step_once(model, cfg)
    names = optimized_names(model, optimizer)
    assert not any(n.startswith("visual.") for n in names)
    assert "text_projection" in names and "logit_scale" in names
    for name, param in model.visual.named_parameters():
        assert param.grad is None and not param.requires_grad, name
        assert torch.equal(param, before[name]), name
    assert model.text_projection.grad is not None


def test_unlocked_groups_stay_trainable_from_the_output_end() -> None:
    cfg = train_config(dataclasses.replace(
        get_model_config("tiny"), lock_image=True, lock_image_unlocked_groups=2,
        lock_text=True, lock_text_unlocked_groups=1,
    ))
    model = build_model(cfg)
    optimizer = step_once(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == optimized_names(model, optimizer)
    # Image: the last block and the head (ln_post, proj). Text: the head (ln_final, text_projection).
    assert {n for n in trainable if n.startswith("visual.")} == {
        n for n, _ in model.named_parameters()
        if n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj"))
    }
    assert {n for n in trainable if not n.startswith("visual.")} == {
        "ln_final.weight", "ln_final.bias", "text_projection", "logit_scale"
    }
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


def test_locked_resnet_keeps_its_batchnorm_statistics() -> None:
    cfg = train_config(dataclasses.replace(tiny_resnet(), lock_image=True))
    model = build_model(cfg)
    model.train()
    bn = model.visual.layer1[0].bn1
    assert isinstance(bn, FrozenStatsBatchNorm2d) and not bn.training
    stats = bn.running_mean.clone()
    step_once(model, cfg)
    assert torch.equal(bn.running_mean, stats)
    assert list(model.state_dict()) == list(CLIP(tiny_resnet()).state_dict())


def test_bad_lock_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="leaves all 4 layer groups"):
        build_model(train_config(dataclasses.replace(
            get_model_config("tiny"), lock_image=True, lock_image_unlocked_groups=4)))
    with pytest.raises(ConfigError, match="no effect without model.lock_text=true"):
        validate(train_config(dataclasses.replace(get_model_config("tiny"), lock_text_unlocked_groups=1)), 1, "cpu")


# ---------------------------------------------------------------- channels_last, compile, strategy validation


def test_channels_last_resnet_computes_the_same_features() -> None:
    torch.manual_seed(0)
    cfg = train_config(tiny_resnet(), channels_last=True)
    model = build_model(cfg)
    reference = build_model(train_config(tiny_resnet()))
    reference.load_state_dict(model.state_dict())
    parallelize(model, cfg, CPU)
    assert model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), reference.eval().encode_image(images))
    with pytest.raises(ConfigError, match="channels_last.*ViT"):
        validate(train_config(channels_last=True), 1, "cpu")


@requires_fsdp
def test_strategy_is_validated() -> None:
    with pytest.raises(ConfigError, match="one process"):
        validate(train_config(strategy="fsdp"), 1, "cpu")
    with pytest.raises(ConfigError, match="ddp, fsdp"):
        validate(train_config(strategy="zero3"), 2, "cpu")
    validate(train_config(strategy="fsdp"), 2, "cpu")


@pytest.mark.slow
def test_compiled_towers_run_on_cpu_with_eager_gradients() -> None:
    """train.compile compiles each block in place: same parameter names, same gradients (image tower only,
    to keep the CPU compile to one graph and its backward)."""
    torch.manual_seed(0)
    cfg = train_config(compile=True)
    model = build_model(cfg)
    eager = build_model(train_config())
    eager.load_state_dict(model.state_dict())
    parallelize(model, cfg, CPU)
    assert list(model.state_dict()) == list(eager.state_dict())
    images, _ = batch()
    for m in (eager, model):
        m.encode_image(images).square().sum().backward()
    compiled_grads, eager_grads = grads_of(model.visual), grads_of(eager.visual)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- FSDP2 and sharded checkpoints


@requires_fsdp
def test_sharded_checkpoint_round_trip_and_fallback(one_rank_group, tmp_path: Path) -> None:
    cfg = train_config(strategy="fsdp")
    torch.manual_seed(0)
    model = build_model(cfg)
    parallel = parallelize(model, cfg, CPU)
    assert parallel.sharded and [id(p) for p in parallel.replicated] == [id(model.logit_scale)]
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        contrastive_loss(parallel.module, *batch()).backward()
        parallel.sync_grads()
        assert torch.isfinite(clip_grad_norm(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad()
        replicated = {"step": step, "model_config": dataclasses.asdict(cfg.model)}
        sharded_io.save_sharded_checkpoint(root, step, model, optimizer, replicated, is_main=True)
    assert (root / ckpt_io.LATEST).resolve().name == ckpt_io.step_dir_name(2)
    manifest = (root / ckpt_io.step_dir_name(2) / ckpt_io.MANIFEST_FILE).read_text()
    assert "sharded/.metadata" in manifest and ".distcp" in manifest

    expected = {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    fresh = build_model(cfg)
    parallelize(fresh, cfg, CPU)
    fresh_optimizer = build_optimizer(fresh, cfg.optim, torch.device("cpu"))
    path = ckpt_io.find_resumable(root)
    assert ckpt_io.load_checkpoint(path)["step"] == 2
    sharded_io.load_sharded_checkpoint(path, fresh, fresh_optimizer)
    for key, value in fresh.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    assert len(fresh_optimizer.state) == len(optimizer.state)
    # create_model reads an FSDP checkpoint's full weights from its shards (as eval and export do).
    loaded = clip_train.create_model(pretrained=path / ckpt_io.STATE_FILE)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

    # Evaluation runs on a full, unsharded replica of the current weights (no per-batch collectives).
    replica = parallel.eval_model()
    assert replica is not model and not any(hasattr(p, "full_tensor") for p in replica.parameters())
    images, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(replica.encode_image(images), loaded.eval().encode_image(images))

    # A damaged shard of the newest checkpoint: resume falls back to the previous step.
    shard = next((path / sharded_io.SHARDED_DIR).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    assert ckpt_io.find_resumable(root).name == ckpt_io.step_dir_name(1)


@requires_fsdp
def test_fsdp_on_two_ranks_matches_ddp_and_its_checkpoint_resumes(tmp_path: Path) -> None:
    """An FSDP run logs the losses of a DDP run of the same config and saves sharded checkpoints; from its
    step-2 checkpoint (ckpt.resume=auto in a copy of the run dir) both an FSDP and a DDP run log the same
    losses for steps 3-4: the sharded checkpoint carries the whole model and optimizer state."""
    cache_dir = tmp_path / "cache"
    args = [*FAST_DEMO, "data.batch_size=8", "train.max_steps=4", "ckpt.every_n_steps=2", "ckpt.keep_last=0"]
    fsdp = tmp_path / "fsdp"
    result = run_cli([*args, "train.strategy=fsdp", f"hydra.run.dir={fsdp}"], cache_dir, torchrun_procs=2,
                     cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = train_losses(fsdp)
    assert sorted(reference) == [1, 2, 3, 4]
    step2 = fsdp / "checkpoints" / ckpt_io.step_dir_name(2)
    assert sorted(p.name for p in (step2 / sharded_io.SHARDED_DIR).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]

    ddp = tmp_path / "ddp"
    result = run_cli([*args, "train.strategy=ddp", f"hydra.run.dir={ddp}"], cache_dir, torchrun_procs=2,
                     cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for step, loss in train_losses(ddp).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step

    for strategy in ("fsdp", "ddp"):
        resumed = tmp_path / f"resumed_{strategy}"
        shutil.copytree(fsdp, resumed, symlinks=True)
        shutil.rmtree(resumed / "checkpoints" / ckpt_io.step_dir_name(4))
        result = run_cli([*args, f"train.strategy={strategy}", f"hydra.run.dir={resumed}"], cache_dir,
                         torchrun_procs=2, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "at step 2" in result.stderr + result.stdout
        assert [m["step"] for m in read_metrics(resumed) if "loss" in m] == [1, 2, 3, 4]
        resumed_losses = train_losses(resumed)
        for step in (3, 4):
            assert resumed_losses[step] == pytest.approx(reference[step], rel=1e-5), (strategy, step)
