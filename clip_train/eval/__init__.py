"""Evaluation: zero-shot classification, image-text retrieval and linear probes (``python -m clip_train.eval``).

The functions here are what both the CLI and the training loop's eval hook call, so their numbers agree.
"""

from clip_train.eval.data import CaptionedImages, ClassificationSpec, LabelledImages
from clip_train.eval.linear_probe import linear_probe
from clip_train.eval.retrieval import embed_captioned, retrieval_recall
from clip_train.eval.templates import load_classnames, load_templates
from clip_train.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier

__all__ = [
    "CaptionedImages",
    "ClassificationSpec",
    "LabelledImages",
    "embed_captioned",
    "linear_probe",
    "load_classnames",
    "load_templates",
    "retrieval_recall",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
