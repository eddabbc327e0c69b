"""clip_train: distributed contrastive image-text pretraining (CLIP) that loads OpenAI and OpenCLIP weights."""

from clip_train.models import CLIP, CheckpointError, ModelConfig, create_model, get_model_config, list_models
from clip_train.preprocess import ImageTransform, create_model_and_transforms, get_preprocess
from clip_train.tokenizer import ClipTokenizer, get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "CheckpointError",
    "ClipTokenizer",
    "ImageTransform",
    "ModelConfig",
    "create_model",
    "create_model_and_transforms",
    "get_model_config",
    "get_preprocess",
    "get_tokenizer",
    "list_models",
]
