"""Helpers that write small WebDataset shards for the data tests (imported by conftest and tests).

A module with its own name rather than conftest.py, so importing it cannot pick up another directory's
conftest.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image


def image_bytes(index: int, size=(24, 20), fmt: str = "PNG") -> bytes:
    """A small image whose colour encodes ``index`` (so different samples give different pixels)."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width: int = 15000, height: int = 14000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (with almost no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def write_tar(path: str, samples: Sequence[dict[str, bytes]]) -> None:
    """Write samples ``{"__key__": k, ext: bytes}`` as consecutive tar members ``k.ext``."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def cut_tar(path: str) -> None:
    """Truncate a tar in the middle of its last member's data (a shard whose download was cut short)."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)


def good_sample(index: int, fmt: str = "png", size=(24, 20)) -> dict[str, bytes]:
    return {"__key__": f"{index:06d}", fmt: image_bytes(index, size, "JPEG" if fmt == "jpg" else "PNG"),
            "txt": f"sample {index}".encode()}
