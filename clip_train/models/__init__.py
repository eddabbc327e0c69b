"""CLIP image and text towers, named architectures and weight loading."""

from clip_train.models.clip import CLIP
from clip_train.models.config import ModelConfig, TextConfig, VisionConfig
from clip_train.models.factory import create_model, create_model_from_config
from clip_train.models.pretrained import CheckpointError, config_from_state_dict, read_weights
from clip_train.models.registry import get_model_config, list_models

__all__ = [
    "CLIP",
    "CheckpointError",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "config_from_state_dict",
    "create_model",
    "create_model_from_config",
    "get_model_config",
    "list_models",
    "read_weights",
]
