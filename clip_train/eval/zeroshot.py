"""Prompt-ensembled zero-shot classification (Radford et al. 2021, section 3.1.4).

Each class is the renormalised mean of its prompts' normalised text embeddings; an image takes the class
with the highest cosine similarity. The training loop's eval hook and ``python -m clip_train.eval zeroshot``
both call ``zeroshot_classifier`` and ``zeroshot_accuracy``, so their numbers agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def zeroshot_classifier(
    model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], classnames: list[str], templates: list[str],
    device: torch.device,
) -> torch.Tensor:
    """A ``(embed_dim, num_classes)`` matrix of unit-norm class embeddings."""
    columns = []
    for name in classnames:
        tokens = tokenizer([template.format(name) for template in templates]).to(device)
        embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def zeroshot_accuracy(
    model: nn.Module,
    classifier: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> dict[str, float | list[float]]:
    """Top-1, top-5 and per-class accuracy over ``(images, labels)`` batches, summed over all ranks.

    ``per_class_top1[c]`` is 0.0 for a class without samples; ``per_class_samples[c]`` tells them apart.

    ``preprocess`` turns a batch as the loader yields it (uint8 on the host) into normalised model input.
    """
    num_classes = classifier.shape[1]
    correct1 = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.float64, device=device)
    per_class_hits = torch.zeros(num_classes, dtype=torch.float64, device=device)
    per_class_total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for images, labels in batches:
        labels = labels.to(device)
        keep = labels >= 0  # samples without a class field are not scored
        if not keep.any():
            continue
        features = F.normalize(model.encode_image(preprocess(images)).float(), dim=-1)
        logits = features[keep] @ classifier
        labels = labels[keep]
        topk = logits.topk(min(5, num_classes), dim=-1).indices
        hit1 = topk[:, 0] == labels
        correct1 += hit1.sum()
        correct5 += (topk == labels[:, None]).any(dim=-1).sum()
        per_class_hits.index_add_(0, labels, hit1.double())
        per_class_total.index_add_(0, labels, torch.ones_like(hit1, dtype=torch.float64))
    totals = torch.stack([correct1, correct5])
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in (totals, per_class_hits, per_class_total):
            dist.all_reduce(tensor)
    count = per_class_total.sum().clamp(min=1)
    per_class = (per_class_hits / per_class_total.clamp(min=1)).tolist()
    return {
        "top1": (totals[0] / count).item(),
        "top5": (totals[1] / count).item(),
        "samples": int(per_class_total.sum().item()),
        "per_class_top1": per_class,
        "per_class_samples": [int(n) for n in per_class_total.tolist()],
    }
