"""Benchmarks: each ``python -m clip_train.bench.NAME`` prints its figures with the command that made them."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """``python -m MODULE ARGV`` quoted so that pasting it into a shell passes the same arguments
    (``[3,4]`` is a glob and JSON has spaces unquoted); ``argv=None`` means this process's own."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
