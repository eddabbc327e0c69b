"""LiT-style locked towers (Zhai et al. 2022): freeze a tower, optionally leaving its last few layer groups trainable.

A tower is an ordered list of *layer groups*, from the input end to the output end:

- CLIP ViT: stem (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``), one group per
  block, head (``ln_post``, ``proj``);
- ModifiedResNet: stem (three convs and their BatchNorms), ``layer1`` … ``layer4``, ``attnpool``;
- timm tower: ``trunk``, ``head``;
- text: embeddings (``token_embedding``, ``positional_embedding``), one group per block, head
  (``ln_final``, ``text_projection``).

Locking sets ``requires_grad = False`` on the frozen groups' parameters, so autograd computes no gradient
for them and the optimizer (which only takes trainable parameters) keeps no state for them. BatchNorm
layers in frozen groups also stop updating their running statistics and normalise with them in training,
since a locked tower should compute the same features in training as in evaluation.
Nothing is renamed: a locked model's state dict is the same as an unlocked one's.
"""

from __future__ import annotations

from torch import nn

from clip_train.models.resnet import ModifiedResNet
from clip_train.models.timm_tower import TimmImageTower
from clip_train.models.vit import VisionTransformer

Group = list[nn.Module | nn.Parameter]


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that stays in eval mode whatever ``.train()`` asks: running statistics are used, never updated.

    Locking swaps a module's class to this one in place (same parameters and buffers, so the same
    state-dict keys), which keeps the optimizer-free, name-preserving contract of locking.
    """

    def train(self, mode: bool = True) -> FrozenStatsBatchNorm2d:
        return super().train(False)


def image_tower_groups(visual: nn.Module) -> list[Group]:
    """The image tower's layer groups, input end first."""
    if isinstance(visual, VisionTransformer):
        stem: Group = [visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre]
        # CoCa's attentional pooler sits between the blocks and ln_post: it belongs to the head.
        pool: Group = [visual.attn_pool] if visual.attn_pool is not None else []
        return [stem, *([block] for block in visual.transformer.resblocks), [*pool, visual.ln_post, visual.proj]]
    if isinstance(visual, ModifiedResNet):
        stem = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3]
        return [stem, [visual.layer1], [visual.layer2], [visual.layer3], [visual.layer4], [visual.attnpool]]
    if isinstance(visual, TimmImageTower):
        return [[visual.trunk], [visual.head]]
    raise TypeError(f"do not know the layer groups of image tower {type(visual).__name__}")


def text_tower_groups(model: nn.Module) -> list[Group]:
    """The text tower's layer groups, input end first (on the model itself, or under ``text.`` for custom_text)."""
    tower = getattr(model, "text_tower", model)
    embeddings: Group = [tower.token_embedding, tower.positional_embedding]
    if getattr(tower, "cls_emb", None) is not None:
        embeddings.append(tower.cls_emb)
    blocks = [[block] for block in tower.transformer.resblocks]
    head: Group = [tower.ln_final] + ([tower.text_projection] if tower.text_projection is not None else [])
    return [embeddings, *blocks, head]


def _freeze(group: Group) -> None:
    for item in group:
        if isinstance(item, nn.Parameter):
            item.requires_grad_(False)
            continue
        item.requires_grad_(False)
        for module in item.modules():
            if type(module) is nn.BatchNorm2d:
                module.__class__ = FrozenStatsBatchNorm2d
                module.eval()


def lock_groups(groups: list[Group], unlocked_groups: int, option: str) -> None:
    """Freeze all but the last ``unlocked_groups`` of ``groups``; ``option`` names the setting in errors."""
    if unlocked_groups < 0:
        raise ValueError(f"{option}_unlocked_groups must be >= 0, got {unlocked_groups}")
    if unlocked_groups >= len(groups):
        raise ValueError(
            f"{option}_unlocked_groups={unlocked_groups} leaves all {len(groups)} layer groups of the tower "
            f"trainable; use at most {len(groups) - 1}, or turn {option} off"
        )
    for group in groups[: len(groups) - unlocked_groups]:
        _freeze(group)


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0) -> None:
    """Freeze ``model.visual`` except its last ``unlocked_groups`` layer groups."""
    lock_groups(image_tower_groups(model.visual), unlocked_groups, "model.lock_image")


def lock_text_tower(model: nn.Module, unlocked_groups: int = 0) -> None:
    """Freeze the text tower except its last ``unlocked_groups`` layer groups."""
    lock_groups(text_tower_groups(model), unlocked_groups, "model.lock_text")
