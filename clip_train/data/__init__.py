"""WebDataset data pipeline: shard sources, resumable train loader, eval loader, transforms, shard tools.

Typical use (what the trainer does)::

    loader = build_train_loader(cfg.data, model.image_size, tokenizer, rank, world_size, seed)
    for images, tokens in loader:                      # uint8 [B, 3, S, S], long [B, L]
        images = normalize_on_device(images.to(device, non_blocking=True), torch.bfloat16)
    state = loader.state_dict()                        # checkpoint it; loader.load_state_dict(state) resumes
"""

from clip_train.data.config import DataConfig
from clip_train.data.pipeline import EvalBatch, EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from clip_train.data.sources import ShardSource, expand_pattern, resolve_sources
from clip_train.data.transforms import OPENAI_MEAN, OPENAI_STD, normalize_on_device


def ensure_demo_data(cache_dir=None):
    """Build the built-in digits dataset on first use and return its paths (see ``clip_train.data.demo``)."""
    from clip_train.data.demo import ensure_demo_data as _ensure

    return _ensure(cache_dir)


__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "DataConfig",
    "EvalBatch",
    "EvalLoader",
    "ShardSource",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "ensure_demo_data",
    "expand_pattern",
    "normalize_on_device",
    "resolve_sources",
]
