"""Evaluation from inside the training loop: every configured zero-shot and retrieval set, split across ranks.

The sets are read and scored by the same code as ``python -m clip_train.eval``, so the numbers agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from clip_train.config import RetrievalSetConfig, TrainConfig, ZeroShotSetConfig
from clip_train.data import normalize_on_device
from clip_train.eval.data import CaptionedImages, ClassificationSpec, LabelledImages
from clip_train.eval.imagefolder import folder_class_indices, imagefolder_classes, is_imagefolder
from clip_train.eval.retrieval import embed_captioned, retrieval_recall
from clip_train.eval.templates import load_classnames, load_templates
from clip_train.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier
from clip_train.train.distributed import DistributedContext


def metric_prefix(set_name: str) -> str:
    """``zeroshot`` for the default set name, ``zeroshot_<name>`` for others (e.g. ``zeroshot_imagenet``)."""
    return "zeroshot" if set_name == "zeroshot" else f"zeroshot_{set_name}"


def _classnames_source(spec: ZeroShotSetConfig) -> str:
    return f"eval.zeroshot[{spec.name}].classnames={spec.classnames}"


class ZeroShotHook:
    """Loads class names and templates once (failing fast on bad paths), evaluates on demand."""

    def __init__(self, cfg: TrainConfig, tokenizer: Callable, ctx: DistributedContext) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.sets = [self._resolve(s) for s in cfg.eval.zeroshot]
        self.retrieval_sets: list[RetrievalSetConfig] = list(cfg.eval.retrieval)
        self._data: dict[str, LabelledImages] = {}

    @staticmethod
    def _resolve(spec: ZeroShotSetConfig) -> tuple[ZeroShotSetConfig, list[str], list[str]]:
        """Class names and templates, read once at start-up; ``demo`` names the built-in digits set."""
        where = ClassificationSpec(spec.data, spec.classnames, spec.templates).resolved()
        spec = dataclasses.replace(spec, data=where.data, classnames=where.classnames, templates=where.templates)
        classnames = load_classnames(spec.classnames)
        if is_imagefolder(spec.data):  # fail at start-up, not at the first evaluation, when folders and names differ
            folder_class_indices(spec.data, imagefolder_classes(spec.data), classnames,
                                 _classnames_source(spec))
        return spec, classnames, load_templates(spec.templates)

    @property
    def enabled(self) -> bool:
        return bool(self.sets or self.retrieval_sets)

    def _batches(self, spec: ZeroShotSetConfig, classnames: list[str], model: nn.Module) -> LabelledImages:
        """``(uint8 images, labels)`` of this rank's share of the set (the same reader as the eval CLI)."""
        if spec.name not in self._data:  # kept: a shard loader's workers persist between evaluations
            self._data[spec.name] = LabelledImages(
                spec.data, model.image_size, spec.batch_size, class_key=spec.class_key, rank=self.ctx.rank,
                world_size=self.ctx.world_size, max_samples=spec.max_samples, tokenizer=self.tokenizer,
                base_cfg=self.cfg.data, option=f"eval.zeroshot[{spec.name}].data",
                classnames=classnames, classnames_source=_classnames_source(spec),
                preprocessing=model.config.preprocessing,
            )
        return self._data[spec.name]

    @torch.no_grad()
    def run(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        results: dict[str, float] = {}
        mean, std = model.config.preprocessing.mean, model.config.preprocessing.std
        for spec, classnames, templates in self.sets:
            classifier = zeroshot_classifier(model, self.tokenizer, classnames, templates, device)
            scores = zeroshot_accuracy(
                model, classifier, self._batches(spec, classnames, model),
                preprocess=lambda images: normalize_on_device(images.to(device, non_blocking=True), mean=mean, std=std),
                device=device,
            )
            prefix = metric_prefix(spec.name)
            results[f"{prefix}_top1"] = scores["top1"]
            results[f"{prefix}_top5"] = scores["top5"]
        for rspec in self.retrieval_sets:
            data = CaptionedImages(
                rspec.data, model.image_size, rspec.batch_size, rank=self.ctx.rank, world_size=self.ctx.world_size,
                num_workers=self.cfg.data.num_workers, image_key=self.cfg.data.image_key, text_key=rspec.text_key,
                preprocessing=model.config.preprocessing,
            )
            preprocess = lambda images: normalize_on_device(images.to(device, non_blocking=True), mean=mean, std=std)
            images, texts, owner = embed_captioned(model, self.tokenizer, data, preprocess, device)
            prefix = "retrieval" if rspec.name == "retrieval" else f"retrieval_{rspec.name}"
            for key, value in retrieval_recall(images, texts, owner).items():
                results[f"{prefix}_{key}"] = value
        return results
