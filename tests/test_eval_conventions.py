"""Evaluation follows the conventions of the tools users compare with (CLIP_benchmark's retrieval recall and
template files), and accepts its inputs the way training does (a folder of shards, class names by name)."""

from __future__ import annotations

import torch

from clip_train.eval.retrieval import retrieval_recall


def clip_benchmark_recall(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's recall@K, written from its definition: for each query row of ``scores`` take the K
    highest-scoring candidates; the query is a hit when at least one of its positives is among them.

    ``torch.topk`` leaves the order of tied scores unspecified, so the top K here come from a stable
    descending sort (tied candidates in index order): the ordering the convention needs to be well defined.
    """
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    hits = positive.gather(1, top).any(dim=1)
    return hits.double().mean().item()


def test_retrieval_recall_with_duplicate_captions_matches_clip_benchmarks_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    num_images, dim = 40, 6
    # Small integers: every dot product is exact, so ties are exact whichever way the matrix is computed.
    images = torch.randint(-2, 3, (num_images, dim), generator=generator).float()
    owner = torch.arange(num_images).repeat_interleave(3)  # three captions per image, COCO-style
    texts = torch.randint(-2, 3, (owner.numel(), dim), generator=generator).float()
    # Web-style duplicates: one generic caption ("a photo") shared by every fourth image, and a caption
    # that is a copy of another image's caption.
    texts[owner % 4 == 0] = torch.tensor([1.0, 1, 1, 1, 1, 1])
    texts[5] = texts[9]
    images[7] = images[3]  # and two identical images

    scores = images @ texts.T
    positive = owner[None, :] == torch.arange(num_images)[:, None]  # [images, texts]
    ks = (1, 2, 5, 10)
    ours = retrieval_recall(images, texts, owner, ks=ks, chunk=7)  # chunked, as for COCO's 25k captions
    for k in ks:
        assert ours[f"image_to_text_recall@{k}"] == clip_benchmark_recall(scores, positive, k), k
        assert ours[f"text_to_image_recall@{k}"] == clip_benchmark_recall(scores.T, positive.T, k), k

    # The duplicates are what the convention is about: counting ties as hits scores higher.
    generous_i2t_at_1 = sum(
        bool((scores[i, owner == i].max() >= scores[i, owner != i]).all()) for i in range(num_images)
    ) / num_images
    assert ours["image_to_text_recall@1"] < generous_i2t_at_1


def test_identical_captions_of_one_image_are_not_penalised() -> None:
    images = torch.eye(3)
    texts = torch.eye(3)[[0, 0, 1, 2]]  # image 0 has two identical captions
    owner = torch.tensor([0, 0, 1, 2])
    result = retrieval_recall(images, texts, owner, ks=(1,))
    assert result["image_to_text_recall@1"] == 1.0
    assert result["text_to_image_recall@1"] == 1.0
