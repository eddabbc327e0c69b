"""Zero-shot evaluation from inside the training loop, on every configured set, split across ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clip_train.config import TrainConfig, ZeroShotSetConfig
from clip_train.data import build_eval_loader, normalize_on_device
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
        self.sets: list[tuple[ZeroShotSetConfig, list[str], list[str]]] = [
            (s, load_classnames(s.classnames), load_templates(s.templates)) for s in cfg.eval.zeroshot
        ]

    @property
    def enabled(self) -> bool:
        return bool(self.sets)

    def _batches(self, spec: ZeroShotSetConfig, image_size: int):
        if Path(spec.data).expanduser().is_dir():
            return imagefolder_batches(
                spec.data, image_size, spec.batch_size, self.ctx.rank, self.ctx.world_size, spec.max_samples
            )
        return build_eval_loader(
            self.cfg.data, spec.data, image_size=image_size, rank=self.ctx.rank, world_size=self.ctx.world_size,
            label_key=spec.class_key, batch_size=spec.batch_size, max_samples=spec.max_samples,
        )

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
