"""``python -m tests.fault_injection [overrides]``: the training CLI with NaN batches injected (tests only).

``CLIP_TRAIN_TEST_NAN_STEPS=3,7,8`` turns the normalised images of those (1-based) steps into NaN, so the
real forward, loss, backward, finite check and skip logic all see a genuinely corrupted batch. The hook
lives here rather than in clip_train so no user-facing option can poison a run.
"""

from __future__ import annotations

import os
import runpy

import torch

from clip_train.train import trainer as trainer_module


def _install(nan_steps: set[int]) -> None:
    real_train_step = trainer_module.Trainer.train_step
    real_normalize = trainer_module.normalize_on_device
    poison = {"on": False}

    def normalize(images: torch.Tensor, dtype: torch.dtype, **stats) -> torch.Tensor:
        out = real_normalize(images, dtype, **stats)
        return out * float("nan") if poison["on"] else out

    def train_step(self: trainer_module.Trainer, images: torch.Tensor, tokens: torch.Tensor):
        poison["on"] = self.state.step + 1 in nan_steps
        try:
            return real_train_step(self, images, tokens)
        finally:
            poison["on"] = False

    trainer_module.normalize_on_device = normalize
    trainer_module.Trainer.train_step = train_step


if __name__ == "__main__":
    steps = {int(s) for s in os.environ.get("CLIP_TRAIN_TEST_NAN_STEPS", "").split(",") if s.strip()}
    _install(steps)
    # As `python -m clip_train`: Hydra finds configs/ relative to clip_train/__main__.py run as __main__.
    runpy.run_module("clip_train", run_name="__main__", alter_sys=True)
