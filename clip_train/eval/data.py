"""Evaluation data: labelled image sets (ImageFolder trees or shards with a class field) and image–caption
shards for retrieval, as uint8 batches split across ranks.

The training loop's eval hook and ``python -m clip_train.eval`` read data through these same classes, so an
evaluation gives the same number wherever it runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_train.data import DataConfig, build_eval_loader, ensure_demo_data
from clip_train.data.decode import BadSample, SampleDecoder, SkipCounter
from clip_train.data.manifest import sample_counts
from clip_train.data.plan import Unit
from clip_train.data.reader import read_unit
from clip_train.data.sources import resolve_sources
from clip_train.eval.imagefolder import (
    IMAGE_SUFFIXES,
    folder_class_indices,
    imagefolder_batches,
    imagefolder_samples,
    is_imagefolder,
)
from clip_train.models.config import ImagePreprocessing

DEMO = "demo"


@dataclasses.dataclass(frozen=True)
class ClassificationSpec:
    """Where a labelled set's images, class names and prompt templates are (``demo``: the built-in digits)."""

    data: str
    classnames: str | None = None
    templates: str | None = None
    """``None``: the demo's own prompts for ``data=demo``, OpenAI's 80 ImageNet prompts otherwise."""

    def resolved(self) -> ClassificationSpec:
        """``demo`` in any field replaced by the built-in digits' val shards / class names / templates.

        With ``data=demo``, unset class names and templates default to the demo's own (digit words; its
        three digit prompts).
        """
        classnames = self.classnames if self.classnames is not None else (DEMO if self.data == DEMO else None)
        templates = self.templates if self.templates is not None else (DEMO if self.data == DEMO else "openai")
        if DEMO not in (self.data, classnames, templates):
            return ClassificationSpec(self.data, classnames, templates)
        demo = ensure_demo_data()
        return ClassificationSpec(
            data=demo.val_shards if self.data == DEMO else self.data,
            classnames=demo.classnames if classnames == DEMO else classnames,
            templates=demo.classnames if templates == DEMO else templates,
        )


def resolve_shards(data: str) -> str:
    """``demo`` names the built-in digits' val shards (one caption per image); anything else passes through."""
    return ensure_demo_data().val_shards if data == DEMO else data


class LabelledImages:
    """``(uint8 images [B, 3, S, S], labels [B])`` batches of one rank's share of a labelled set.

    ``data`` is an ImageFolder root (``root/<class>/<image>``) or shards (a pattern, list or folder of
    ``.tar`` files) whose samples carry an integer class in ``class_key`` (samples without one get label
    -1). An ImageFolder's labels index ``classnames`` when given (folders matched to names by
    ``folder_class_indices``), else its sorted folders. Shard loaders keep their worker processes between
    passes, so a set evaluated every N steps starts fast. ``option`` is how error messages name ``data``
    (the CLI flag, or the config key in training); ``classnames_source`` names the class-names file;
    ``may_omit_classes`` lets an ImageFolder hold only some of ``classnames`` (each folder matched by name).
    """

    def __init__(self, data: str, image_size: int, batch_size: int = 256, *, class_key: str = "cls",
                 rank: int = 0, world_size: int = 1, num_workers: int = 2, max_samples: int | None = None,
                 tokenizer: Callable | None = None, image_key: str = "jpg;png;jpeg;webp", text_key: str = "txt",
                 base_cfg: DataConfig | None = None, option: str = "--data", classnames: list[str] | None = None,
                 classnames_source: str = "--classnames", may_omit_classes: bool = False,
                 preprocessing: ImagePreprocessing | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.data = data
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.max_samples = max_samples
        self.preprocessing = preprocessing or ImagePreprocessing()  # the model's resize and interpolation
        self.is_folder = is_imagefolder(data)
        self._loader = None
        self._folder_to_class: torch.Tensor | None = None
        if self.is_folder:
            self.folder_samples, self.folder_classes = imagefolder_samples(data)
            if not self.folder_samples:
                raise ValueError(f"ImageFolder {data} has class folders but no images "
                                 f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            if classnames is not None:
                self._folder_to_class = torch.tensor(
                    folder_class_indices(data, self.folder_classes, classnames, classnames_source, may_omit_classes))
        else:
            # Expanded here first so that a pattern matching nothing is reported under the user's option name.
            self._urls = [u for s in resolve_sources(data, option) for u in s.urls]
            # The trainer passes its data config (decoding limits, pinning, prefetch); the CLI the defaults.
            if base_cfg is None:
                base_cfg = DataConfig(num_workers=num_workers, image_key=image_key, text_key=text_key)
            cfg = dataclasses.replace(base_cfg, val_shards=data, label_key=class_key, eval_batch_size=batch_size)
            # A tokenizer is required by the shard stream; labelled sets never use the captions' tokens.
            from clip_train.tokenizer import get_tokenizer

            self._loader = build_eval_loader(cfg, image_size, tokenizer or get_tokenizer(context_length=2),
                                             rank=rank, world_size=world_size, option=option,
                                             preprocessing=self.preprocessing)

    @property
    def total_samples(self) -> int | None:
        """Samples in the whole set (all ranks), if known: ImageFolder counts, shard manifests otherwise."""
        if self.is_folder:
            count = len(self.folder_samples)
        else:
            counts = sample_counts(self._urls)
            count = sum(counts) if counts else None
        if count is not None and self.max_samples is not None:
            count = min(count, self.max_samples)
        return count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.is_folder:
            for images, labels in imagefolder_batches(self.data, self.image_size, self.batch_size, self.rank,
                                                      self.world_size, self.max_samples, self.preprocessing):
                yield images, (labels if self._folder_to_class is None else self._folder_to_class[labels])
            return
        batches = ((batch.images, batch.labels) for batch in self._loader)
        if self.max_samples is not None:
            per_rank_batches = -(-self.max_samples // (self.batch_size * self.world_size))
            batches = itertools.islice(batches, per_rank_batches)
        yield from batches


def split_captions(text: str) -> list[str]:
    """The captions of one retrieval sample: a JSON list of strings, or one caption per non-empty line."""
    text = text.strip()
    if text.startswith("["):
        try:
            captions = json.loads(text)
        except ValueError:
            captions = None
        if isinstance(captions, list) and all(isinstance(c, str) for c in captions):
            return [c.strip() for c in captions if c.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


class _CaptionedStream(IterableDataset):
    """``(uint8 image [3, S, S], captions, position)`` for every good sample of the given shards.

    Each DataLoader worker reads every ``num_workers``-th shard; ``position`` (shard index, sample index)
    lets the main process restore the shards' own order whatever the workers' interleaving.
    """

    def __init__(self, urls: list[tuple[int, str]], decoder: SampleDecoder) -> None:
        self.urls = urls
        self.decoder = decoder

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str], tuple[int, int]]]:
        info = get_worker_info()
        mine = self.urls if info is None else self.urls[info.id :: info.num_workers]
        skips = SkipCounter(where="retrieval data")
        for shard_index, url in mine:
            # The project's raw tar reader (not wds.WebDataset, which would split shards across workers again).
            for sample_index, sample in enumerate(read_unit(Unit(url), skips.tar_error_handler(url))):
                try:
                    captions = split_captions(self.decoder.caption(sample))
                    if not captions:
                        raise BadSample("no caption")
                    image = self.decoder.image(sample, random.Random(0))
                except BadSample as err:
                    skips.skip(f"{url} #{sample_index}: {err}")
                    continue
                tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy of PIL's buffer
                yield tensor, captions, (shard_index, sample_index)


def _collate(items: list) -> tuple[torch.Tensor, list[list[str]], list[tuple[int, int]]]:
    images, captions, positions = zip(*items)
    return torch.stack(images), list(captions), list(positions)


class CaptionedImages:
    """Batches ``(uint8 images, captions per image, positions)`` of one rank's shards of an image–caption set.

    A sample's text field holds one caption per line, or a JSON list of captions; several captions per
    image are what COCO and Flickr30k retrieval need.
    """

    def __init__(self, data: str, image_size: int, batch_size: int = 256, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, image_key: str = "jpg;png;jpeg;webp", text_key: str = "txt",
                 preprocessing: ImagePreprocessing | None = None) -> None:
        urls = [u for s in resolve_sources(resolve_shards(data), "--data") for u in s.urls]
        self.total_samples = sum(sample_counts(urls) or []) or None
        mine = list(enumerate(urls))[rank::world_size]
        preprocessing = preprocessing or ImagePreprocessing()
        decoder = SampleDecoder(image_size, image_key, text_key, train=False, resize_mode=preprocessing.resize_mode,
                                interpolation=preprocessing.interpolation)
        workers = max(0, min(num_workers, len(mine)))
        self._loader = DataLoader(_CaptionedStream(mine, decoder), batch_size=batch_size, num_workers=workers,
                                  collate_fn=_collate) if mine else None

    def __iter__(self):
        return iter(self._loader) if self._loader is not None else iter(())
