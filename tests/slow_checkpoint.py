"""``python -m tests.slow_checkpoint [overrides]``: the training CLI with chosen checkpoint writes slowed down
or failing (tests only).

``CLIP_TRAIN_TEST_SLOW_SAVE=3:2,6:300`` sleeps 2 s after ``state.pt`` of step 3 is written (before the
manifest and the rename) and 300 s for step 6, first creating ``writing-<step>`` in
``CLIP_TRAIN_TEST_SAVE_MARKERS`` so a test knows the write is in progress. ``CLIP_TRAIN_TEST_FULL_SAVE=6``
makes the write of step 6 fail with ENOSPC, as a full disk does. The real writer runs in every case; the
hook lives here so no user-facing option can slow a run.
"""

from __future__ import annotations

import errno
import os
import runpy
import time
from pathlib import Path
from typing import Any

from clip_train.train import checkpoint as ckpt_io


def _step_of(path: Path) -> int:
    return int(path.parent.name.removeprefix(".tmp-step_"))


def _install(delays: dict[int, float], full_steps: set[int], markers: Path | None) -> None:
    real_save = ckpt_io.save_state_file

    def save_state_file(state: Any, path: Path) -> None:
        step = _step_of(path)
        if step in full_steps:
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(state, path)
        if step in delays:
            if markers is not None:
                (markers / f"writing-{step}").touch()
            time.sleep(delays[step])

    ckpt_io.save_state_file = save_state_file


if __name__ == "__main__":
    slow = os.environ.get("CLIP_TRAIN_TEST_SLOW_SAVE", "")
    delays = {int(step): float(seconds) for step, seconds in (item.split(":") for item in slow.split(",") if item)}
    full = {int(s) for s in os.environ.get("CLIP_TRAIN_TEST_FULL_SAVE", "").split(",") if s.strip()}
    marker_dir = os.environ.get("CLIP_TRAIN_TEST_SAVE_MARKERS")
    _install(delays, full, Path(marker_dir) if marker_dir else None)
    runpy.run_module("clip_train", run_name="__main__", alter_sys=True)
