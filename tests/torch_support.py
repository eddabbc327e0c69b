"""Markers for tests of features the installed torch may lack (we support torch 2.4 onwards)."""

from __future__ import annotations

import pytest

from clip_train.train.torch_compat import fsdp_unsupported_reason

_WHY_NO_FSDP = fsdp_unsupported_reason()
requires_fsdp = pytest.mark.skipif(_WHY_NO_FSDP is not None, reason=str(_WHY_NO_FSDP))
