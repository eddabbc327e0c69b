"""Mixed precision: autocast contexts and the fp16 gradient scaler, kept out of model code."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the precision's dtype on ``device``; fp32 is a no-op context."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 only (bf16 and fp32 have the range to go without)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def enable_tf32(enabled: bool) -> None:
    """TF32 tensor-core matmuls and convolutions on GPUs that have them (Ampere and newer)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
