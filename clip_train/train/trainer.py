"""The Trainer: owns the model, optimizer, schedule, data, checkpointer and metrics, and runs the loop.

Each concern lives in its own module (distributed, precision, optim, checkpoint, metrics); this file only
wires them together and keeps the training state that a checkpoint must carry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clip_train.checkpoint_paths import resolve_training_checkpoint
from clip_train.config import TrainConfig
from clip_train.data import build_train_loader, normalize_on_device
from clip_train.distributed_ops import set_collective_region
from clip_train.loss import ClipLoss, CocaLoss, SigLipLoss
from clip_train.models import CLIP, create_model_from_config
from clip_train.models.clip import MAX_LOGIT_SCALE
from clip_train.models.lock import lock_image_tower, lock_text_tower
from clip_train.models.pretrained import CheckpointError, check_finite, fit_problems
from clip_train.tokenizer import get_model_tokenizer
from clip_train.train import checkpoint as ckpt_io
from clip_train.train import openclip_run, preemption, run_lock
from clip_train.train import resume as resume_rules
from clip_train.train import sharded_checkpoint as sharded_io
from clip_train.train.distributed import DistributedContext, any_rank, barrier, broadcast_object
from clip_train.train.metrics import (
    METRICS_FILE,
    ConsoleBackend,
    JsonlBackend,
    MetricsProcessor,
    TensorboardBackend,
    WandbBackend,
    evaluation_at,
    truncate_metrics_after,
)
from clip_train.train.optim import (
    apply_config_on_resume,
    build_optimizer,
    build_scheduler,
    cooldown_begun_before,
    ignored_cooldown,
)
from clip_train.train.parallelize import clip_grad_norm, parallelize
from clip_train.train.precision import autocast, enable_tf32, grad_scaler
from clip_train.train.profiler import OnDemandProfiler
from clip_train.train.rng import restore_rng_streams, rng_state, seed_everything
from clip_train.train.step import NonFiniteSteps, forward_backward, step_unless_nonfinite
from clip_train.train.timing import EtaEstimator, StepTimer, peak_memory_bytes
from clip_train.train.zeroshot_hook import ZeroShotHook

log = logging.getLogger("clip_train")


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainState:
    """Counters a resumed run must continue from."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_bad_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def build_model(cfg: TrainConfig) -> CLIP:
    """The model with its temperature (and SigLIP bias) initialised from the loss config."""
    siglip = cfg.loss.name == "siglip"
    model = create_model_from_config(
        cfg.model, init_temperature=cfg.loss.temperature, init_logit_bias=cfg.loss.init_bias if siglip else None
    )
    model.logit_scale.requires_grad_(cfg.loss.learn_temperature)
    # Locking happens before the optimizer is built, so frozen parameters never get optimizer state.
    if cfg.model.lock_image:
        lock_image_tower(model, cfg.model.lock_image_unlocked_groups)
    if cfg.model.lock_text:
        lock_text_tower(model, cfg.model.lock_text_unlocked_groups)
    return model


def build_loss(cfg: TrainConfig) -> nn.Module:
    if cfg.loss.name == "coca":
        return CocaLoss(
            caption_loss_weight=cfg.loss.caption_loss_weight, clip_loss_weight=cfg.loss.clip_loss_weight,
            pad_id=cfg.model.text.pad_id, tile_size=cfg.loss.tile_size, implementation=cfg.loss.implementation,
        )
    if cfg.loss.name == "siglip":
        return SigLipLoss(tile_size=cfg.loss.tile_size, implementation=cfg.loss.implementation)
    return ClipLoss(tile_size=cfg.loss.tile_size, implementation=cfg.loss.implementation)


class Trainer:
    """Trains one run in ``run_dir`` (shared by all ranks; only rank 0 writes to it)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, ctx: DistributedContext, resolved_config: dict) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.ctx = ctx
        self.device = ctx.device
        self.resolved_config = resolved_config
        self.checkpoint_dir = run_dir / "checkpoints"

        seed_everything(cfg.train.seed + ctx.rank)
        enable_tf32(cfg.train.tf32)
        # The model is built from the same seed on every rank; DDP also broadcasts rank 0's weights.
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg).to(self.device)
        torch.manual_seed(cfg.train.seed + ctx.rank)
        # Grad checkpointing, channels_last, compile, then DDP or FSDP2; the optimizer must see the
        # parameters as sharding leaves them, so it is built after.
        self.parallel = parallelize(self.model, cfg, ctx)
        self.ddp_model: nn.Module = self.parallel.module
        self.loss_fn = build_loss(cfg)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        unused_cooldown = ignored_cooldown(cfg.optim)
        if unused_cooldown and ctx.is_main:
            log.warning(unused_cooldown)
        self.scaler = grad_scaler(cfg.train.precision, self.device)
        self.state = TrainState()
        self.bad_steps = NonFiniteSteps(self.device)

        self.tokenizer = get_model_tokenizer(cfg.model, cfg.tokenizer)
        # Images are normalised with the model's own statistics (OpenAI's unless its config says otherwise).
        self.image_mean, self.image_std = self.model.config.preprocessing.mean, self.model.config.preprocessing.std
        self.loader = build_train_loader(
            cfg.data, image_size=self.model.image_size, tokenizer=self.tokenizer,
            rank=ctx.rank, world_size=ctx.world_size, seed=cfg.train.seed,
        )
        self.zeroshot = ZeroShotHook(cfg, self.tokenizer, ctx)
        self.metrics = MetricsProcessor()
        self.timer = StepTimer(self.device)
        self.profiler = OnDemandProfiler(cfg.train.profile, run_dir, ctx.rank, self.device, cfg.train.max_steps)
        self.eta: EtaEstimator | None = None
        self.wandb_run_id: str | None = None
        # The checkpoint (and its step and W&B run) this run branched off, kept through its own resumes.
        self.branched_from: dict[str, Any] | None = None
        self.global_batch_size = cfg.data.batch_size * ctx.world_size
        # ckpt.async_save: the write in flight (at most one), the reused host copy, and the saves whose
        # figures (ckpt_block_s, ckpt_write_s) the next training metrics line reports.
        self._writer = ckpt_io.BackgroundWriter()
        self._host_copy = ckpt_io.HostSnapshot()
        self._ckpt_group: dist.ProcessGroup | None = None
        self._saves_to_report: list[ckpt_io.SaveTiming] = []
        self._copy_timing: ckpt_io.SaveTiming | None = None

    # ------------------------------------------------------------------ checkpoint state (Stateful parts)

    def _stateful_parts(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "train_state": self.state,
        }

    def _gather(self, obj: Any) -> list[Any]:
        if not self.ctx.enabled:
            return [obj]
        out: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(out, obj)
        return out

    def save_checkpoint(self) -> None:
        """Every rank contributes its RNG and data position; rank 0 writes; all wait for the write.

        Under FSDP every rank also writes its own shards of the model and optimizer (DCP). With
        ``ckpt.async_save`` the write goes to the background (:meth:`_save_in_background`).
        """
        start = time.perf_counter()
        self._check_bad_steps()
        if self.cfg.ckpt.async_save:
            self._save_in_background(start)
            return
        sharded = self.parallel.sharded
        state = self._checkpoint_state(sharded)
        path = None
        if sharded:
            path = sharded_io.save_sharded_checkpoint(
                self.checkpoint_dir, self.state.step, self.model, self.optimizer, state, self.ctx.is_main
            )
        elif self.ctx.is_main:
            path = ckpt_io.write_checkpoint(self.checkpoint_dir, self.state.step, state)
        if self.ctx.is_main:
            ckpt_io.prune_checkpoints(self.checkpoint_dir, self.cfg.ckpt.keep_last, self.cfg.ckpt.keep_every_n_steps)
            log.info("saved checkpoint %s", path)
        barrier(self.ctx)
        took = time.perf_counter() - start
        self._saves_to_report.append(ckpt_io.SaveTiming(self.state.step, block_s=took, write_s=took, path=path))

    def _checkpoint_state(self, sharded: bool) -> dict[str, Any] | None:
        """What rank 0 writes to ``state.pt`` (every rank takes part in gathering it); None on other ranks."""
        per_rank = self._gather({"rng": rng_state(), "dataloader": self.loader.state_dict(gather=False)})
        if not self.ctx.is_main:
            return None
        parts = self._stateful_parts()
        if sharded:  # these two go to sharded/ instead
            del parts["model"], parts["optimizer"]
        state = {name: part.state_dict() for name, part in parts.items()}
        state["per_rank"] = per_rank
        state["world_size"] = self.ctx.world_size
        state["wandb_run_id"] = self.wandb_run_id
        state["branched_from"] = self.branched_from
        state["config"] = self.resolved_config
        state["model_config"] = dataclasses.asdict(self.cfg.model)
        return state

    def _save_in_background(self, start: float) -> None:
        """The step waits for the previous write (at most one in flight, its error raised here), copies the
        state to host memory, and goes on; a thread writes, fsyncs, seals and prunes. Under FSDP, DCP's
        ``async_save`` stages and writes the shards and rank 0 seals once they are all on disk."""
        self._finish_pending_save()
        step, sharded = self.state.step, self.parallel.sharded
        state = self._checkpoint_state(sharded)
        # Weights and moments change only in the optimizer step: they are copied during the next
        # forward/backward (HostSnapshot), and that step's optimizer update waits for the copy.
        deferred: set[int] = set()
        if not sharded:  # FSDP's shards go through DCP's own staging instead
            deferred = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
            deferred |= {value.untyped_storage().data_ptr() for per_param in self.optimizer.state.values()
                         for value in per_param.values() if isinstance(value, torch.Tensor)}
        host_state = self._host_copy.take(state, deferred) if state is not None else None
        root, is_main = self.checkpoint_dir, self.ctx.is_main
        keep_last, keep_every = self.cfg.ckpt.keep_last, self.cfg.ckpt.keep_every_n_steps
        if sharded:
            if self._ckpt_group is None:  # collective, and every rank saves at the same step
                self._ckpt_group = dist.new_group(backend="gloo")
            write_shards = sharded_io.start_sharded_checkpoint_async(
                root, step, self.model, self.optimizer, host_state, is_main, self._ckpt_group
            )
        else:
            def write_shards() -> Path | None:
                return ckpt_io.write_checkpoint(root, step, host_state) if is_main else None

        def write() -> Path | None:
            self._host_copy.complete()
            lock = run_lock.current()
            if lock is not None and lock.lost():  # the run dir changed hands while this save waited
                raise run_lock.RunDirLocked(f"another trainer took over the lock on {root.parent}; the "
                                            f"checkpoint of step {step} was not written")
            path = write_shards()
            if is_main:
                ckpt_io.prune_checkpoints(root, keep_last, keep_every)
            return path

        timing = ckpt_io.SaveTiming(step, block_s=time.perf_counter() - start)
        self._copy_timing = timing  # the next optimizer step adds its wait for the copy
        self._writer.submit(timing, write)

    def _wait_for_host_copy(self) -> None:
        """Before the optimizer changes weights and moments: the checkpoint's copy of them is complete."""
        waited = self._host_copy.wait_copied()
        if self._copy_timing is not None:
            self._copy_timing.block_s += waited
            self._copy_timing = None

    def _finish_pending_save(self) -> None:
        """Wait for the background write, if any; a failed write (e.g. ``DiskFull``) is raised here."""
        timing = self._writer.wait()
        if timing is not None:
            self._record_finished_save(timing)

    def _record_finished_save(self, timing: ckpt_io.SaveTiming) -> None:
        if self.ctx.is_main:
            log.info("saved checkpoint %s (training blocked %.3f s, background write %.3f s)",
                     timing.path, timing.block_s, timing.write_s)
        self._saves_to_report.append(timing)

    def _save_figures(self) -> dict[str, float]:
        """``ckpt_block_s``/``ckpt_write_s``/``ckpt_step`` of the newest save finished since the last line."""
        if self._writer.pending and self._writer.done():  # finished in the background: collect, never block
            self._finish_pending_save()
        if not self._saves_to_report:
            return {}
        newest = self._saves_to_report[-1]
        self._saves_to_report.clear()
        return {"ckpt_step": newest.step, "ckpt_block_s": newest.block_s, "ckpt_write_s": newest.write_s}

    def _checkpoint_to_resume(self) -> Path | None:
        resume = self.cfg.ckpt.resume
        if resume == "none":
            return None
        if resume == "auto":
            return ckpt_io.find_resumable(self.checkpoint_dir)
        given = Path(resume).expanduser()
        path = given if openclip_run.is_openclip_checkpoint_file(given) else resolve_training_checkpoint(resume)
        if not self._is_own_checkpoint(path):
            # A branch that was requeued (preemption, a restart) still names the run it branched from; starting
            # over from there would throw away its own steps, so its own newest checkpoint wins (torchtitan's
            # initial_load_path works the same way).
            own = ckpt_io.find_resumable(self.checkpoint_dir)
            if own is not None:
                log.info("ckpt.resume=%s is another run's checkpoint, but this run dir has its own: continuing from "
                         "%s (to branch afresh, use a new run dir)", resume, own)
                return own
        return path

    def _state_from_openclip(self, path: Path) -> dict[str, Any]:
        """An OpenCLIP ``epoch_N.pt`` as the state a clip_train checkpoint holds (``openclip_run``)."""
        problem = openclip_run.continuation_problem(self.cfg)
        if problem:
            raise CheckpointError(problem)
        raw = openclip_run.read_openclip_checkpoint(path)
        return openclip_run.state_from_openclip(
            path, raw, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            loader_state=self.loader.state_dict(gather=False), steps_per_epoch=self.cfg.ckpt.openclip_steps_per_epoch,
        )

    def _is_own_checkpoint(self, path: Path) -> bool:
        # An OpenCLIP epoch file is never this run's own, even inside its checkpoints/ (OpenCLIP's log dir
        # reused as the run dir): a requeue must continue from this run's steps, not restart from the file.
        if openclip_run.is_openclip_checkpoint_file(Path(path)):
            return False
        return Path(path).resolve().is_relative_to(self.checkpoint_dir.resolve())

    def _check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """One line, before anything is loaded, if the checkpoint's model is another architecture or not finite,
        or its optimizer groups follow another ``optim.no_decay`` rule."""
        changed_rule = resume_rules.decay_rule_change(state.get("config"), self.resolved_config)
        if changed_rule:
            raise CheckpointError(changed_rule)
        if "model" not in state:
            return  # sharded: DCP checks keys and shapes itself when loading
        problems = fit_problems(self.model.state_dict(), state["model"])
        if problems:
            saved = (state.get("model_config") or {}).get("name", "?")
            raise CheckpointError(
                f"checkpoint {path} holds a model of another architecture ({saved}; this run builds "
                f"{self.cfg.model.name}): " + "; ".join(problems)
                + ". Resume with the model config it was trained with, or start afresh with ckpt.resume=none"
            )
        if not self.cfg.model.allow_nonfinite_weights:
            check_finite(state["model"], f"checkpoint {path}")

    def maybe_resume(self) -> None:
        path = broadcast_object(self._checkpoint_to_resume() if self.ctx.is_main else None, self.ctx)
        if path is None:
            return
        from_openclip = openclip_run.is_openclip_checkpoint_file(Path(path))
        state = self._state_from_openclip(Path(path)) if from_openclip else ckpt_io.load_checkpoint(Path(path))
        self._check_resumable(Path(path), state)
        parts = self._stateful_parts()
        model, optimizer = parts.pop("model"), parts.pop("optimizer")
        if sharded_io.is_sharded(Path(path)):  # an FSDP run's checkpoint, into FSDP or DDP alike
            sharded_io.load_sharded_checkpoint(Path(path), model, optimizer)
        elif self.parallel.sharded:  # a DDP checkpoint continued with FSDP
            sharded_io.load_full_state_into_sharded(model, optimizer, state["model"], state["optimizer"])
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        for name, part in parts.items():
            part.load_state_dict(state[name])
        # Hyperparameters come from the new config, not the checkpoint (docs/reliability.md, "Resume").
        apply_config_on_resume(self.optimizer, self.scheduler, self.cfg.optim)
        if self.ctx.is_main:
            for change in resume_rules.config_changes(state.get("config"), self.resolved_config):
                log.info("resume: %s (from the new config)", change)
            if self.cfg.ckpt.resume not in ("auto", "none"):  # auto skips damaged newer ones; they are rewritten
                resume_rules.retire_newer_checkpoints(self.checkpoint_dir, self.state.step,
                                                      self.run_dir / METRICS_FILE)
        # Another run's checkpoint branches off it (a cooldown, a new lr): this run dir is a new run, so it
        # gets its own W&B run rather than appending steps the other run has logged already.
        branched = not self._is_own_checkpoint(Path(path))
        self.wandb_run_id = None if branched else state.get("wandb_run_id")
        if branched:
            self.branched_from = {"checkpoint": str(Path(path).resolve()), "step": self.state.step,
                                  "wandb_run_id": state.get("wandb_run_id")}
        else:
            self.branched_from = state.get("branched_from")
        if branched and self.ctx.is_main:
            source_run = f", W&B run {state['wandb_run_id']}" if state.get("wandb_run_id") else ""
            log.info("resume: %s is another run's checkpoint; this run continues from it as a new run (its own "
                     "metrics and W&B run, whose config names it as branched_from%s; that run is left as it was)",
                     path, source_run)
        per_rank = state["per_rank"]
        # The data position is the global batch index, which any world size and worker count continues;
        # the loader takes every saved rank's entry (skip counts included) and warns only for a new global batch.
        self.loader.load_state_dict([entry["dataloader"] for entry in per_rank])
        restore_rng_streams(per_rank, self.ctx.rank, self.cfg.train.seed, self.state.step)
        if from_openclip:
            log.info("resume: %s is OpenCLIP's checkpoint after epoch %d: its weights, AdamW moments and GradScaler "
                     "continue at step %d (%d x ckpt.openclip_steps_per_epoch=%d), with fresh data order and random "
                     "streams as OpenCLIP's own resume", path, state["openclip_epoch"], self.state.step,
                     state["openclip_epoch"], self.cfg.ckpt.openclip_steps_per_epoch)
        log.info("resumed from %s at step %d", path, self.state.step)
        late_cooldown = cooldown_begun_before(self.cfg.optim, self.cfg.train.max_steps, self.state.step)
        if late_cooldown and self.ctx.is_main:
            log.warning(late_cooldown)

    # ------------------------------------------------------------------ logging

    def _open_metrics(self) -> None:
        if not self.ctx.is_main:
            return
        metrics_path = self.run_dir / METRICS_FILE
        truncate_metrics_after(metrics_path, self.state.step)
        backends: list = [
            JsonlBackend(metrics_path),
            ConsoleBackend(
                self.cfg.train.max_steps,
                self.cfg.logger.console_every_n_steps or self.cfg.train.log_every_n_steps,
                start_step=self.state.step,
            ),
        ]
        wandb_config = dict(self.resolved_config)
        if self.branched_from:  # a branch's W&B run says what it branched off, to group and filter runs by
            wandb_config["branched_from"] = self.branched_from
        wandb = WandbBackend.from_config(self.cfg.logger.wandb, self.run_dir, wandb_config, self.wandb_run_id)
        if wandb is not None:  # logger.wandb and the WANDB_* environment decide
            self.wandb_run_id = wandb.run_id
            backends.append(wandb)
        if self.cfg.logger.tensorboard.enabled:
            backends.append(TensorboardBackend(self.run_dir, start_step=self.state.step))
        self.metrics = MetricsProcessor(backends)

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.ctx.enabled:
            dist.all_reduce(values)
            values /= self.ctx.world_size
        return values

    # ------------------------------------------------------------------ one step

    def _loss(self, image_features, text_features, logit_scale, direct_grads: bool = True, *caption) -> torch.Tensor:
        if not direct_grads:
            logit_scale = logit_scale.detach()
        if self.cfg.loss.name == "coca":  # caption = (logits, labels) from CoCa's forward
            return self.loss_fn(image_features, text_features, logit_scale, *caption)
        if self.cfg.loss.name == "siglip":
            bias = self.model.logit_bias if direct_grads else self.model.logit_bias.detach()
            return self.loss_fn(image_features, text_features, logit_scale, bias)
        return self.loss_fn(image_features, text_features, logit_scale)

    def train_step(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        # forward_backward_s: the copy to the device, forward, loss and backward (less the loss's
        # collectives, which time themselves as comm_s; DDP's all-reduce overlaps backward and stays in it).
        self.timer.begin("forward_backward")
        images = normalize_on_device(images.to(self.device, non_blocking=True), torch.float32,
                                     mean=self.image_mean, std=self.image_std)
        tokens = tokens.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(
            self.ddp_model, self._loss, images, tokens,
            accum_steps=self.cfg.train.accum_steps, precision=self.cfg.train.precision,
            scale_loss=self.scaler.scale, plain_model=self.model,
        )
        self.timer.begin("comm")
        self.parallel.sync_grads()

        self.timer.begin("optimizer")
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.grad_clip_norm or math.inf
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm)
        self._wait_for_host_copy()  # ckpt.async_save: no update while a checkpoint copies the weights
        if self.scaler.is_enabled():
            # fp16: the scaler skips non-finite steps and lowers its scale; early overflows are routine.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            # Skipped on the device (fused AdamW), counted on the device, checked when logging: no host
            # sync in the step. Every rank sees the same all-reduced gradients, so all agree to skip.
            self.bad_steps.update(step_unless_nonfinite(self.optimizer, loss, grad_norm))
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.state.step += 1
        self.timer.end()
        return {"loss": loss, "grad_norm": grad_norm}

    def _check_bad_steps(self) -> None:
        """Move the device-side skip counts into the train state (a host sync: call when logging or saving)."""
        skipped, run, longest = self.bad_steps.drain()
        self.state.skipped_steps += skipped
        self.state.consecutive_bad_steps = run
        if skipped:
            log.warning("%d steps up to step %d had a non-finite loss or gradient; their updates were skipped",
                        skipped, self.state.step)  # fmt: skip
        if longest >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{longest} consecutive steps had a non-finite loss or gradient; stopping. Resume from the "
                "last checkpoint with a lower optim.lr, or optim=stable_adamw"
            )

    # ------------------------------------------------------------------ where the time goes

    def _comm_region(self) -> contextlib.AbstractContextManager:
        """What the loss's collectives run inside during training steps (see distributed_ops)."""
        return self.timer.region("comm")

    @contextlib.contextmanager
    def _timed(self, kind: str) -> Iterator[None]:
        """Wall time of an evaluation or checkpoint, kept out of the throughput window (``eval_s``, ``checkpoint_s``).

        The device first finishes the queued training work, so that stays in the window it belongs to (these
        steps synchronise anyway).
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        set_collective_region(None)  # a collective of the evaluation is evaluation time, not comm_s
        try:
            with self.timer.host_region(kind):
                yield
        finally:
            set_collective_region(self._comm_region)
        if self.eta is not None:
            self.eta.add(kind, time.perf_counter() - began)

    def _step_time_metrics(self, window_s: float, window_steps: int) -> dict[str, float]:
        """The window's time breakdown (one gather of the data wait across ranks; call on logging steps)."""
        times = self.timer.collect()
        data_wait = times.get("data", 0.0)
        eval_s, checkpoint_s = times.get("eval", 0.0), times.get("checkpoint", 0.0)
        train_s = max(window_s - eval_s - checkpoint_s, 1e-9)
        comm = times.get("comm", 0.0)
        # The loss's collectives run inside forward_backward's region: count them once, as comm.
        forward_backward = max(times.get("forward_backward", 0.0) - comm, 0.0)
        optimizer = times.get("optimizer", 0.0)
        waits = [data_wait]
        if self.ctx.enabled:
            gathered = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.ctx.world_size)]
            dist.all_gather(gathered, torch.tensor([data_wait], dtype=torch.float64, device=self.device))
            waits = [float(t.item()) for t in gathered]
        if self.eta is not None:
            self.eta.add_train(train_s)
        return {
            "train_s": train_s,
            "step_s": train_s / max(window_steps, 1),
            "data_wait_s": data_wait,
            "data_wait_fraction": data_wait / train_s,
            "data_wait_max_s": max(waits),
            "data_wait_min_s": min(waits),
            "data_wait_max_rank": waits.index(max(waits)),
            "compute_s": train_s - data_wait,
            "forward_backward_s": forward_backward,
            "optimizer_s": optimizer,
            "comm_s": comm,
            "other_s": max(train_s - data_wait - forward_backward - optimizer - comm, 0.0),
            "eval_s": eval_s,
            "checkpoint_s": checkpoint_s,
            "peak_mem_gib": peak_memory_bytes(self.device) / 2**30,
            "eta_s": self.eta.eta_s(self.state.step) if self.eta is not None else 0.0,
        }

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        set_collective_region(self._comm_region)
        self.profiler.install_signal()
        try:
            return self._train()
        except BaseException:
            # An earlier checkpoint still being written is good: let it finish, but its own error (if
            # any) must not hide the one that ended the run.
            try:
                self._finish_pending_save()
            except Exception as err:  # noqa: BLE001
                log.error("the background checkpoint write failed too: %s", err)
            raise
        finally:
            self.profiler.close(self.state.step)
            self.profiler.restore_signal()
            set_collective_region(None)

    def _train(self) -> dict[str, float]:
        self.maybe_resume()
        finished = self.state.step >= self.cfg.train.max_steps  # e.g. a finished job started again
        if finished and self.ctx.is_main:
            log.info("nothing to train: the run is at step %d and train.max_steps=%d; raise train.max_steps to "
                     "train further", self.state.step, self.cfg.train.max_steps)
        self.bad_steps = NonFiniteSteps(self.device, consecutive=self.state.consecutive_bad_steps)
        self._open_metrics()
        cfg = self.cfg
        self.eta = EtaEstimator(
            cfg.train.max_steps, self.state.step, cfg.eval.every_n_steps if self.zeroshot.enabled else None,
            cfg.ckpt.every_n_steps,
        )
        self.ddp_model.train()
        batches = iter(self.loader)
        self.timer.collect()  # a fresh window
        window_start = time.perf_counter()
        window_steps = 0
        # A finished run hands its final results to Hydra's sweepers again, from its metrics.
        last_eval = evaluation_at(self.run_dir / METRICS_FILE, self.state.step) if finished and self.ctx.is_main else {}
        while self.state.step < cfg.train.max_steps:
            self.profiler.before_step(self.state.step + 1)
            with self.timer.host_region("data"):
                try:
                    images, tokens = next(batches)
                except StopIteration:  # epoch mode: every rank ends its epoch on the same batch count
                    batches = iter(self.loader)
                    images, tokens = next(batches)
            out = self.train_step(images, tokens)
            window_steps += 1
            step = self.state.step
            self.profiler.after_step(step)

            if step % cfg.train.log_every_n_steps == 0 or step == cfg.train.max_steps:
                self._check_bad_steps()
                loss = self._mean_over_ranks(out["loss"].float().reshape(1)).item()
                skipped = torch.tensor([float(self.loader.skipped_samples),
                                        float(getattr(self.loader, "skipped_shards", 0))], device=self.device)
                if self.ctx.enabled:
                    dist.all_reduce(skipped)
                timing = self._step_time_metrics(time.perf_counter() - window_start, window_steps)
                self.metrics.log(step, {
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "temperature": 1.0 / self.model.logit_scale.exp().item(),
                    "grad_norm": out["grad_norm"].item(),
                    "samples_per_s": window_steps * self.global_batch_size / timing["train_s"],
                    **timing,
                    "skipped_samples": int(skipped[0].item()),
                    "skipped_shards": int(skipped[1].item()),
                    "skipped_steps": self.state.skipped_steps,
                    # CoCa: the weighted contrastive and captioning terms of the logged step's loss.
                    **{name: float(value) for name, value in getattr(self.loss_fn, "last_terms", {}).items()},
                    "world_size": self.ctx.world_size,
                    "global_batch_size": self.global_batch_size,
                    **self._save_figures(),
                })
                window_start, window_steps = time.perf_counter(), 0

            every_eval = cfg.eval.every_n_steps
            if self.zeroshot.enabled and ((every_eval and step % every_eval == 0) or step == cfg.train.max_steps):
                with self._timed("eval"):
                    last_eval = self.evaluate()
            every_ckpt = cfg.ckpt.every_n_steps
            saved = (every_ckpt and step % every_ckpt == 0) or step == cfg.train.max_steps
            if saved:
                with self._timed("checkpoint"):
                    self.save_checkpoint()
            lock = run_lock.current()
            if lock is not None and lock.lost():  # another trainer now owns the run dir: write nothing more
                raise run_lock.RunDirLocked(f"another trainer took over the lock on {self.run_dir}; stopping "
                                            "without writing further")
            # The preemption signal reaches ranks at slightly different moments; agreeing here makes
            # every rank stop after this same step (one small all-reduce per step).
            if step < cfg.train.max_steps and any_rank(preemption.requested(), self.ctx):
                if not saved:
                    self.save_checkpoint()
                self._finish_pending_save()  # the checkpoint the exit code promises is on disk
                barrier(self.ctx)
                self.metrics.close()
                raise preemption.Preempted(step)
        self._finish_pending_save()  # the end of training waits for the last write
        barrier(self.ctx)
        self.metrics.close()
        if last_eval and self.ctx.is_main:
            summary = ", ".join(f"{key} {value:.4f}" for key, value in last_eval.items())
            log.info("finished %d steps; final %s", self.state.step, summary)
        if self.ctx.is_main and self.eta is not None:
            log.info("time in evaluations %.1f s, in checkpoints %.1f s (those after the last metrics line included)",
                     self.eta.total("eval"), self.eta.total("checkpoint"))
        return last_eval

    def evaluate(self) -> dict[str, float]:
        self.ddp_model.eval()
        with autocast(self.cfg.train.precision, self.device):
            results = self.zeroshot.run(self.parallel.eval_model(), self.device)
        self.ddp_model.train()
        self.metrics.log(self.state.step, results)
        return results
