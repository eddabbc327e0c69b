"""Linear probe: L2-regularised logistic regression on frozen image features (Radford et al. 2021, §3.2).

As in the paper, the regularisation strength is chosen on a validation split held out of the training
features, then the classifier is refit on all of them and scored once on the test set. scikit-learn's
L-BFGS solver does the fitting; features are L2-normalised first, as CLIP compares them by cosine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-2, 4, 7))  # C = 1 / lambda


@torch.no_grad()
def image_features(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    preprocess: Callable[[torch.Tensor], torch.Tensor], progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image features ``[N, D]`` and labels ``[N]`` of every labelled sample (label >= 0)."""
    features, labels = [], []
    for images, batch_labels in batches:
        keep = batch_labels >= 0
        if keep.any():
            out = F.normalize(model.encode_image(preprocess(images)).float(), dim=-1).cpu()
            features.append(out[keep].numpy())
            labels.append(batch_labels[keep].numpy())
        if progress is not None:
            progress(len(batch_labels))
    if not features:
        raise ValueError("no labelled samples: the data has no class labels (check --class-key)")
    return np.concatenate(features), np.concatenate(labels)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rest, held_out)`` with about ``fraction`` of every class held out (at least one sample of
    every class with two or more stays in ``rest``)."""
    if not 0 < fraction < 1:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_held = round(len(members) * fraction)
        n_held = min(max(n_held, 1 if len(members) > 1 else 0), len(members) - 1)
        held.extend(members[:n_held])
        rest.extend(members[n_held:])
    return np.sort(np.array(rest, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def _fit(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression  # imported here: scipy's import takes seconds

    return LogisticRegression(C=c, max_iter=max_iter).fit(features, labels)


def linear_probe(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
    num_classes: int | None = None, c_grid: Iterable[float] = DEFAULT_C_GRID, val_fraction: float = 0.2,
    seed: int = 0, max_iter: int = 1000,
) -> dict:
    """Pick C on a validation split of the training features, refit on all of them, score the test set."""
    c_grid = list(c_grid)
    if len(np.unique(train_labels)) < 2:
        raise ValueError("the training split has fewer than two classes; a classifier needs at least two")
    fit_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    val_scores = {}
    if len(val_idx) and len(c_grid) > 1:
        for c in c_grid:
            clf = _fit(train_features[fit_idx], train_labels[fit_idx], c, max_iter)
            val_scores[c] = float((clf.predict(train_features[val_idx]) == train_labels[val_idx]).mean())
        best_c = max(c_grid, key=lambda c: (val_scores[c], -c))  # ties: the stronger regularisation
    else:
        best_c = c_grid[0]
    clf = _fit(train_features, train_labels, best_c, max_iter)
    predictions = clf.predict(test_features)
    hits = predictions == test_labels
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max()) + 1)
    per_class_total = np.bincount(test_labels, minlength=num_classes)
    per_class_hits = np.bincount(test_labels, weights=hits.astype(np.float64), minlength=num_classes)
    per_class = [float(h / n) if n else None for h, n in zip(per_class_hits, per_class_total)]
    scored = [p for p in per_class if p is not None]
    return {
        "top1": float(hits.mean()) if len(hits) else 0.0,
        "mean_per_class_top1": float(np.mean(scored)) if scored else 0.0,
        "per_class_top1": per_class,
        "per_class_samples": per_class_total.tolist(),
        "C": best_c,
        "validation_top1_by_C": {f"{c:g}": s for c, s in val_scores.items()},
        "train_samples": len(train_labels),
        "test_samples": len(test_labels),
    }
