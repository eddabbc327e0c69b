"""Zero-shot evaluation from inside the training loop, on every configured set, split across ranks."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from clip_train.config import TrainConfig, ZeroShotSetConfig
from clip_train.data import build_eval_loader, ensure_demo_data, normalize_on_device
from clip_train.eval.imagefolder import imagefolder_batches
from clip_train.eval.templates import load_classnames, load_templates
from clip_train.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier
from clip_train.train.distributed import DistributedContext


def metric_prefix(set_name: str) -> str:
    """``zeroshot`` for the default set name, ``zeroshot_<name>`` for others (e.g. ``zeroshot_imagenet``)."""
    return "zeroshot" if set_name == "zeroshot" else f"zeroshot_{set_name}"


class ZeroShotHook:
    """Loads class names and templates once (failing fast on bad paths), evaluates on demand."""

    def __init__(self, cfg: TrainConfig, tokenizer: Callable, ctx: DistributedContext) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.sets = [self._resolve(s) for s in cfg.eval.zeroshot]
        self._loaders: dict[str, object] = {}

    @staticmethod
    def _resolve(spec: ZeroShotSetConfig) -> tuple[ZeroShotSetConfig, list[str], list[str]]:
        """Class names and templates, read once at start-up; ``demo`` names the built-in digits set."""
        if "demo" in (spec.data, spec.classnames, spec.templates):
            demo = ensure_demo_data()
            spec = dataclasses.replace(
                spec,
                data=demo.val_shards if spec.data == "demo" else spec.data,
                classnames=demo.classnames if spec.classnames == "demo" else spec.classnames,
                templates=demo.classnames if spec.templates == "demo" else spec.templates,
            )
        return spec, load_classnames(spec.classnames), load_templates(spec.templates)

    @property
    def enabled(self) -> bool:
        return bool(self.sets)

    def _batches(self, spec: ZeroShotSetConfig, image_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """``(uint8 images, labels)`` of this rank's share of the set."""
        if Path(spec.data).expanduser().is_dir():
            return imagefolder_batches(
                spec.data, image_size, spec.batch_size, self.ctx.rank, self.ctx.world_size, spec.max_samples
            )
        if spec.name not in self._loaders:  # kept: its workers persist between evaluations
            data_cfg = dataclasses.replace(
                self.cfg.data, val_shards=spec.data, label_key=spec.class_key, eval_batch_size=spec.batch_size
            )
            self._loaders[spec.name] = build_eval_loader(
                data_cfg, image_size, self.tokenizer, rank=self.ctx.rank, world_size=self.ctx.world_size
            )
        batches = ((batch.images, batch.labels) for batch in self._loaders[spec.name])
        if spec.max_samples is None:
            return batches
        per_rank_batches = -(-spec.max_samples // (spec.batch_size * self.ctx.world_size))
        return itertools.islice(batches, per_rank_batches)

    @torch.no_grad()
    def run(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        results: dict[str, float] = {}
        for spec, classnames, templates in self.sets:
            classifier = zeroshot_classifier(model, self.tokenizer, classnames, templates, device)
            scores = zeroshot_accuracy(
                model, classifier, self._batches(spec, model.image_size),
                preprocess=lambda images: normalize_on_device(images.to(device, non_blocking=True)),
                device=device,
            )
            prefix = metric_prefix(spec.name)
            results[f"{prefix}_top1"] = scores["top1"]
            results[f"{prefix}_top5"] = scores["top5"]
        return results
