"""How an exception becomes the one line a user reads.

Our own errors are written as one line that names the problem and the fix, and are shown whole. Errors
raised inside a library (torch, safetensors, transformers, gloo) can run to pages, so when we quote one as
the reason for our own refusal we keep its first line, cut to ``REASON_LIMIT`` characters.
"""

from __future__ import annotations

REASON_LIMIT = 240  # transformers' "Unrecognized model" lists every model type it knows: ~4,000 characters


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of ``err``'s message, or its class name when it says nothing; cut to ``limit`` with " ..."."""
    lines = str(err).strip().splitlines()
    line = lines[0].strip() if lines else type(err).__name__
    if limit is not None and len(line) > limit:
        line = line[:limit].rstrip() + " ..."
    return line


def reason(err: BaseException) -> str:
    """A library's exception quoted inside one of our messages: its first line, at most ``REASON_LIMIT`` long."""
    return first_line(err, REASON_LIMIT)
