"""Apply the memory and speed options to a finished CLIP model: activation checkpointing, channels_last,
torch.compile, and data parallelism (DDP, or FSDP2's ``fully_shard``).

The models know nothing about any of this (torchtitan's split): ``parallelize`` takes the model the
factory built and returns what the training loop runs. Every option here keeps parameter names, so
checkpoints and pretrained weights load the same whichever options a run used.

Order matters and follows what the PyTorch libraries expect: activation checkpointing and compile wrap
each block first, then FSDP shards those blocks (one all-gather per block) and finally the root, or DDP
wraps the whole model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel

from clip_train.config import TrainConfig
from clip_train.models import CLIP
from clip_train.models.factory import model_class
from clip_train.models.resnet import ModifiedResNet
from clip_train.models.timm_tower import TimmImageTower
from clip_train.models.vit import VisionTransformer
from clip_train.train.distributed import DistributedContext
from clip_train.train.torch_compat import (
    DTensor,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)


@dataclasses.dataclass
class ParallelModel:
    """The model as training runs it.

    ``module`` is what forward passes go through: the DDP wrapper, or the model itself after
    ``fully_shard`` (FSDP2 shards in place). ``model`` is always the underlying CLIP model, whose
    ``state_dict`` keys never change. ``replicated`` lists parameters FSDP cannot shard (0-d tensors
    such as ``logit_scale``); every rank keeps them whole and :meth:`sync_grads` averages their gradients.
    """

    model: CLIP
    module: nn.Module
    strategy: str
    world_size: int
    replicated: list[nn.Parameter] = dataclasses.field(default_factory=list)
    _eval_replica: CLIP | None = None

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def eval_model(self) -> CLIP:
        """A model evaluation can call freely on each rank: ``model`` itself, or under FSDP a full replica.

        Sharded forward passes are collectives, so ranks evaluating different numbers of batches (the
        zero-shot sets are split unevenly) would wait on each other forever. Collective: under FSDP every
        rank gathers the current weights into its replica (one all-gather of the parameters per evaluation).
        """
        if not self.sharded:
            return self.model
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        if self._eval_replica is None:
            bias = 0.0 if self.model.logit_bias is not None else None
            device = next(iter(full.values())).device
            # model_class, not type(self.model): fully_shard swaps the model's class for an FSDP subclass.
            replica_class = model_class(self.model.config)
            self._eval_replica = replica_class(self.model.config, init_logit_bias=bias).to(device).eval()
        self._eval_replica.load_state_dict(full)
        return self._eval_replica

    def sync_grads(self) -> None:
        """Average the gradients FSDP does not reduce itself; call once after the step's backward passes."""
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if not grads or self.world_size == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, value in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(value.view_as(grad))


def image_tower_units(visual: nn.Module) -> list[nn.Module]:
    """The image tower's parts to compile and shard one by one (blocks, ResNet stages, or a timm trunk)."""
    if isinstance(visual, VisionTransformer):
        return list(visual.transformer.resblocks)
    if isinstance(visual, ModifiedResNet):
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    if isinstance(visual, TimmImageTower):
        return [visual.trunk]
    return []


def _units(model: CLIP) -> list[nn.Module]:
    text = getattr(model, "text_tower", model)  # the text tower's parts: on the model, or under model.text
    units = list(text.transformer.resblocks) + image_tower_units(model.visual)
    decoder = getattr(model, "text_decoder", None)  # CoCa's captioning decoder
    if decoder is not None:
        units += [*decoder.resblocks, *decoder.cross_attn]
    return units


def apply_channels_last(model: CLIP) -> None:
    """Store the image tower's conv weights NHWC and feed it NHWC images (tensor-core friendly convolutions)."""
    model.visual.to(memory_format=torch.channels_last)

    def to_channels_last(_module: nn.Module, args: tuple) -> tuple:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])

    model.visual.register_forward_pre_hook(to_channels_last)


def apply_compile(model: CLIP) -> None:
    """Compile each block / stage in place (``nn.Module.compile`` keeps parameter names, unlike ``torch.compile``).

    Per-block compilation is what FSDP2 expects (each sharded unit traced on its own), and identical
    blocks reuse one compiled graph, so compile time does not grow with depth.
    """
    for unit in _units(model):
        unit.compile()


def apply_fsdp(model: CLIP, precision: str) -> list[nn.Parameter]:
    """Shard every block / stage, then the rest of the model; returns the parameters left unsharded.

    Under bf16 the blocks gather their parameters in bf16 (half the all-gather bytes) and reduce
    gradients in fp32; the root's parameters (embeddings, projections, temperature) stay fp32.
    """
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    for unit in _units(model):
        fully_shard(unit, mp_policy=policy)
    # fully_shard shards along dim 0 and refuses 0-d parameters; they are a few bytes, so every rank keeps them.
    replicated = [p for p in model.parameters() if p.ndim == 0]
    fully_shard(model, ignored_params=set(replicated))
    # Evaluation calls encode_image / encode_text directly: they must gather the root's parameters too.
    register_fsdp_forward_method(model, "encode_image")
    register_fsdp_forward_method(model, "encode_text")
    return replicated


def parallelize(model: CLIP, cfg: TrainConfig, ctx: DistributedContext) -> ParallelModel:
    """Apply ``cfg``'s memory and speed options to ``model`` (already on ``ctx.device``) and wrap it for data parallelism."""
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.train.channels_last:
        apply_channels_last(model)
    if cfg.train.compile:
        apply_compile(model)
    if cfg.train.strategy == "fsdp":
        if not dist.is_initialized():
            raise RuntimeError("train.strategy=fsdp needs a process group; launch with torchrun")
        replicated = apply_fsdp(model, cfg.train.precision)
        return ParallelModel(model, model, "fsdp", ctx.world_size, replicated)
    if ctx.enabled:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return ParallelModel(model, DistributedDataParallel(model, device_ids=device_ids), "ddp", ctx.world_size)
    return ParallelModel(model, model, "ddp", ctx.world_size)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm over all ranks' shards, clipped to ``max_norm`` (inf: measure only).

    ``torch.nn.utils.clip_grad_norm_`` cannot mix FSDP's sharded (DTensor) gradients with the plain
    gradients of replicated parameters; the two parts' norms are combined here. No host sync happens.
    """
    params = [p for p in parameters if p.grad is not None]
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    total = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()  # all ranks' shards
    if plain:
        plain_norm = torch.nn.utils.get_total_norm([p.grad for p in plain]).to(total)
        total = torch.linalg.vector_norm(torch.stack([total, plain_norm]))
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(sharded, max_norm, total)
        if plain:
            torch.nn.utils.clip_grads_with_norm_(plain, max_norm, total)
    return total
