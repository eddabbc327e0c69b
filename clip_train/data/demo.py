"""The built-in demo dataset: scikit-learn's handwritten digits as captioned WebDataset shards.

``python -m clip_train.data.demo OUT_DIR`` writes ``OUT_DIR/train/*.tar`` (the 1,498 training digits, each
rendered four times with varied captions: 5,992 samples), ``OUT_DIR/val/00000.tar`` (the other 299 digits,
with a ``cls`` label), a ``shards.json`` in each, and
``OUT_DIR/classnames.json`` (class names and prompt templates for zero-shot evaluation). Nothing is
downloaded: the digits ship inside scikit-learn.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from clip_train.data.writer import ManifestShardWriter

DEMO_VERSION = 3
CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Written like the captions, without a final period: the tiny text tower never sees "." in training, so
# an untrained token just before the end token moved its features at random (top-1 0.71 vs 0.98 measured).
ZEROSHOT_TEMPLATES = ["a photo of the number {}", "a handwritten digit {}", "the digit {}"]
# {w} = number word, {d} = digit: captions vary so the text tower must learn that "7" and "seven" match.
CAPTION_TEMPLATES = [
    "a photo of the number {w}",
    "a handwritten {d}",
    "the digit {w}",
    "a handwritten digit {w}",
    "a scan of a handwritten {w}",
    "the number {d} written by hand",
    "a blurry picture of the digit {d}",
    "an image of a {w}",
    "a {w} drawn with a pen",
    "digit {d} on paper",
]
IMAGE_SIZE = 64
TRAIN_SHARDS = 4
# Each training digit is rendered this many times (own tint, shift, noise and caption). With one fixed caption
# per image the tiny model learns which template goes with which image instead of which digit it shows.
RENDERS_PER_TRAIN_DIGIT = 4


@dataclass(frozen=True)
class DemoData:
    """Paths of a built demo dataset."""

    root: str
    train_shards: str
    val_shards: str
    classnames: str


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as (images [N, 8, 8] in 0..16, labels [N]).

    The bundled ``digits.csv.gz`` is read directly when it is where scikit-learn keeps it, which skips
    importing scikit-learn itself (seconds, for scipy); otherwise ``sklearn.datasets.load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None:
        raise RuntimeError("the demo dataset needs scikit-learn: pip install scikit-learn")
    path = os.path.join(os.path.dirname(spec.origin or ""), "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _render(digit: np.ndarray, rng: random.Random, noise_rng: np.random.Generator) -> bytes:
    """8x8 digit (0..16) -> 64x64 RGB PNG: dark ink on light paper, random tints, a small shift, a little noise."""
    ink = digit.astype(np.float32) / 16.0
    big = Image.fromarray((ink * 255).astype(np.uint8)).resize((IMAGE_SIZE - 8, IMAGE_SIZE - 8), Image.BICUBIC)
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    dx, dy = rng.randint(0, 8), rng.randint(0, 8)
    canvas[dy:dy + IMAGE_SIZE - 8, dx:dx + IMAGE_SIZE - 8] = np.asarray(big, dtype=np.float32) / 255.0
    paper = np.array([rng.uniform(0.75, 1.0) for _ in range(3)], dtype=np.float32)
    pen = np.array([rng.uniform(0.0, 0.35) for _ in range(3)], dtype=np.float32)
    noise = noise_rng.normal(0, 0.03, (IMAGE_SIZE, IMAGE_SIZE, 1))
    rgb = paper * (1 - canvas[..., None]) + pen * canvas[..., None] + noise
    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def build_demo_data(out_dir: str, seed: int = 0) -> DemoData:
    """Write the demo shards, manifests and class names into ``out_dir``; returns their paths."""
    images, targets = load_digit_arrays()
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    train_dir, val_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "val")
    n = len(targets)
    is_val = [i % 6 == 5 for i in range(n)]  # every sixth digit: a stratified-ish held-out split
    per_shard = -(-(n - sum(is_val)) * RENDERS_PER_TRAIN_DIGIT // TRAIN_SHARDS)
    with ManifestShardWriter(train_dir, samples_per_shard=per_shard) as train, \
            ManifestShardWriter(val_dir, samples_per_shard=n) as val:
        # Renders of one digit are spread over the shards' length (outer loop), not written side by side.
        for render in range(RENDERS_PER_TRAIN_DIGIT):
            for i in range(n):
                if is_val[i] and render > 0:
                    continue
                label = int(targets[i])
                caption = rng.choice(CAPTION_TEMPLATES).format(w=CLASSNAMES[label], d=label)
                sample = {"__key__": f"{i:06d}_{render}", "png": _render(images[i], rng, noise_rng),
                          "txt": caption, "cls": str(label)}
                (val if is_val[i] else train).write(sample)
    with open(os.path.join(out_dir, "classnames.json"), "w") as f:
        json.dump({"classnames": CLASSNAMES, "templates": ZEROSHOT_TEMPLATES}, f, indent=1)
    return DemoData(out_dir, train.pattern, val.pattern, os.path.join(out_dir, "classnames.json"))


def _paths(root: str) -> DemoData:
    return DemoData(root, os.path.join(root, "train", f"{{00000..{TRAIN_SHARDS - 1:05d}}}.tar"),
                    os.path.join(root, "val", "00000.tar"), os.path.join(root, "classnames.json"))


def default_cache_dir() -> str:
    """``$CLIP_TRAIN_CACHE/demo-vN`` or ``~/.cache/clip_train/demo-vN``."""
    base = os.environ.get("CLIP_TRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clip_train")
    return os.path.join(base, f"demo-v{DEMO_VERSION}")


def ensure_demo_data(cache_dir: str | None = None) -> DemoData:
    """The demo dataset in ``cache_dir`` (default: ``default_cache_dir()``), built there on first use.

    Safe when several ranks call it at once: each builds into a private temporary folder and renames it
    into place; the first rename wins and the others discard theirs.
    """
    root = os.path.abspath(cache_dir or default_cache_dir())
    if os.path.isfile(os.path.join(root, "classnames.json")):
        return _paths(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-building-", dir=parent)
    try:
        build_demo_data(tmp)
        try:
            os.rename(tmp, root)  # atomic: readers see no folder or a complete one
        except OSError:
            if not os.path.isfile(os.path.join(root, "classnames.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def load_classnames(path: str) -> tuple:
    """``(classnames, templates)`` from a ``classnames.json`` (or the folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "classnames.json")
    with open(path) as f:
        doc = json.load(f)
    return list(doc["classnames"]), list(doc.get("templates", ["a photo of a {}."]))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m clip_train.data.demo", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write train/, val/ and classnames.json into")
    parser.add_argument("--seed", type=int, default=0, help="seed for captions and image tints")
    args = parser.parse_args(argv)
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        print(f"error: {args.out_dir} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    demo = build_demo_data(args.out_dir, seed=args.seed)
    print(f"train: data.train_shards='{demo.train_shards}'")
    print(f"val:   data.val_shards='{demo.val_shards}'")
    print(f"class names: {demo.classnames}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
