"""Image–text retrieval: recall@K in both directions, with any number of captions per image.

The convention is CLIP_benchmark's (and the usual COCO/Flickr30k one): rank the candidates by similarity,
take the top K, and score a hit when a true match is among them. Image→text: an image scores a hit at K when
any of its own captions is among the K texts most similar to it. Text→image: a caption scores a hit at K
when its image is among the K images most similar to it.

Ties are ranked by a stable ordering: among candidates with equal similarity the one with the lower index
(earlier in the data) comes first. So a true match tied with others is a hit only where it is among the
first K under that ordering, exactly as a top-K list has room for only K candidates. Duplicate captions
(common in web data and in COCO) thus cannot all be hits at once, which is what counting ties in the
model's favour would do (it inflated image→text R@1 from 0.027 to 0.193 on one such set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

DEFAULT_KS = (1, 5, 10)


@torch.no_grad()
def retrieval_recall(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
    ks: Iterable[int] = DEFAULT_KS, chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K of normalised ``image_features`` [I, D] and ``text_features`` [T, D].

    ``text_to_image[t]`` is the index of caption t's image. Similarities are computed ``chunk`` rows at a
    time, so 5,000 images by 25,000 captions (COCO) never hold the full matrix.
    """
    ks = sorted({int(k) for k in ks})
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({num_texts},)")
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError("text_to_image holds an index outside the images")
    text_to_image = text_to_image.to(image_features.device)

    # Text -> image: the position of each caption's own image in the stably sorted list of all images.
    image_index = torch.arange(num_images, device=image_features.device)
    t2i_rank = torch.empty(num_texts, dtype=torch.long, device=image_features.device)
    for start in range(0, num_texts, chunk):
        sims = text_features[start : start + chunk] @ image_features.T
        target = text_to_image[start : start + chunk, None]
        own = sims.gather(1, target)
        ahead = (sims > own) | ((sims == own) & (image_index[None, :] < target))
        t2i_rank[start : start + chunk] = ahead.sum(dim=1)

    # Image -> text: the position of each image's first own caption in the stably sorted list of all texts;
    # the texts ahead of it are all other images' captions.
    text_index = torch.arange(num_texts, device=image_features.device)
    i2t_rank = torch.empty(num_images, dtype=torch.long, device=image_features.device)
    for start in range(0, num_images, chunk):
        sims = image_features[start : start + chunk] @ text_features.T
        rows = torch.arange(start, start + sims.shape[0], device=sims.device)
        own = text_to_image[None, :] == rows[:, None]
        best_own = sims.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        tied_own = own & (sims == best_own)
        first_own = torch.where(tied_own, text_index[None, :], num_texts).min(dim=1, keepdim=True).values
        ahead = ~own & ((sims > best_own) | ((sims == best_own) & (text_index[None, :] < first_own)))
        i2t_rank[start : start + chunk] = ahead.sum(dim=1)

    results: dict[str, float] = {}
    for k in ks:
        results[f"image_to_text_recall@{k}"] = (i2t_rank < k).double().mean().item() if num_images else 0.0
    for k in ks:
        results[f"text_to_image_recall@{k}"] = (t2i_rank < k).double().mean().item() if num_texts else 0.0
    results["mean_recall"] = sum(results.values()) / len(results)
    return results


def _gather_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (variable-length) CPU tensor in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor)
    return torch.cat(parts)


@torch.no_grad()
def embed_captioned(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, list[list[str]], list[tuple[int, int]]]],
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised image and caption features of all ranks, and each caption's image index.

    Images come out in the shards' order (by each sample's position), whatever the worker interleaving.
    """
    images, texts, owners, positions = [], [], [], []
    for pixels, captions, where in batches:
        images.append(F.normalize(model.encode_image(preprocess(pixels)).float(), dim=-1).cpu())
        flat = [c for per_image in captions for c in per_image]
        texts.append(F.normalize(model.encode_text(tokenizer(flat).to(device)).float(), dim=-1).cpu())
        owners.append(torch.tensor([i for i, per_image in enumerate(captions) for _ in per_image]))
        positions.extend(where)
        if progress is not None:
            progress(len(captions))
    if not images:
        embed_dim = model.text_projection.shape[1]
        images, texts = [torch.empty(0, embed_dim)], [torch.empty(0, embed_dim)]
        owners = [torch.empty(0, dtype=torch.long)]
    # Owners are batch-local: offset them by the images before each batch, then reorder by position.
    offsets = torch.tensor([0] + [len(x) for x in images[:-1]]).cumsum(0)
    owner = torch.cat([o + off for o, off in zip(owners, offsets)])
    image_features, text_features = torch.cat(images), torch.cat(texts)
    if positions:
        order = sorted(range(len(positions)), key=positions.__getitem__)
        new_index = torch.empty(len(order), dtype=torch.long)
        new_index[torch.tensor(order)] = torch.arange(len(order))
        image_features, owner = image_features[order], new_index[owner]
    # Across ranks: offset each rank's owners by the images of the ranks before it.
    counts = _gather_cpu(torch.tensor([image_features.shape[0]]))
    rank = dist.get_rank() if dist.is_initialized() else 0
    owner = owner + counts[:rank].sum()
    return _gather_cpu(image_features), _gather_cpu(text_features), _gather_cpu(owner)
