"""Evaluation: zero-shot classification (and, in later modules, retrieval and linear probes)."""

from clip_train.eval.templates import load_classnames, load_templates
from clip_train.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier

__all__ = ["load_classnames", "load_templates", "zeroshot_accuracy", "zeroshot_classifier"]
