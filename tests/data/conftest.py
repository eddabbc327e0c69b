"""Fixtures that write small WebDataset shards (tiny images, captions "sample N") into tmp dirs."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from PIL import Image

from clip_train.data.manifest import write_manifest
from clip_train.tokenizer import get_tokenizer


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


@pytest.fixture
def make_shards(tmp_path) -> Callable:
    """``make_shards(sizes, manifest=True, bad=None, name="shards")`` -> (brace pattern, list of captions).

    Shard ``i`` holds ``sizes[i]`` good samples numbered consecutively (captions listed as "sampleN"); ``bad`` maps a shard index to extra
    raw samples appended to it; numbering starts at ``first``.
    """
    def make(sizes: Sequence[int], manifest: bool = True, bad: dict[int, list[dict]] | None = None,
             name: str = "shards", first: int = 0) -> tuple:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        captions, entries, index = [], [], first
        for s, size in enumerate(sizes):
            samples = []
            for _ in range(size):
                samples.append(good_sample(index))
                captions.append(f"sample{index}")
                index += 1
            samples += (bad or {}).get(s, [])
            path = str(folder / f"{s:05d}.tar")
            write_tar(path, samples)
            entries.append((os.path.basename(path), len(samples), os.path.getsize(path)))
        if manifest:
            write_manifest(str(folder), entries)
        pattern = str(folder / f"{{00000..{len(sizes) - 1:05d}}}.tar")
        return pattern, captions

    return make


@pytest.fixture(scope="session")
def tokenizer():
    return get_tokenizer(context_length=16)


@pytest.fixture(scope="session")
def captions_of(tokenizer) -> Callable:
    """Decode a token batch back to its captions without spaces ("sample17"; how tests identify samples).

    CLIP's tokenizer splits numbers into digits, so decoding gives "sample 1 7": spaces are dropped.
    """
    return lambda tokens: [tokenizer.decode(row).replace(" ", "") for row in tokens]
