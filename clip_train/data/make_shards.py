"""Write WebDataset shards from a folder of images with sidecar captions, or from a CSV/TSV/Parquet table.

    python -m clip_train.data.make_shards photos/ shards/              # photos/a.jpg + photos/a.txt, ...
    python -m clip_train.data.make_shards pairs.csv shards/ --image-col path --caption-col caption
    python -m clip_train.data.make_shards pairs.parquet shards/ --samples-per-shard 5000 --max-size 512

Each sample becomes ``KEY.jpg|png|webp`` + ``KEY.txt`` (+ ``KEY.json`` naming its source); ``shards.json``
records every shard's sample count (the loader's epoch length). Image paths in a table are relative to
the table's folder unless absolute. JPEG, PNG and WebP files are stored byte for byte; other images Pillow
reads (TIFF, BMP, GIF, ...) are converted to PNG, which keeps every pixel, and counted in the summary. In a
folder, any file with a sidecar caption is tried as an image, so nothing captioned is left out unseen.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator

from PIL import Image
from tqdm import tqdm

from clip_train.cli_help import DefaultsHelpFormatter
from clip_train.data.writer import ManifestShardWriter

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")  # found without a caption too
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what shard readers decode; kept byte for byte
_NOT_IMAGES = (".txt", ".json")  # sidecars: img2dataset's folder output has KEY.jpg, KEY.txt and KEY.json
IMAGE_COLUMNS = ("image", "filepath", "image_path", "path", "file", "filename")
CAPTION_COLUMNS = ("caption", "text", "txt", "title")


class CliError(Exception):
    """A one-line error for the user."""


class _Skip(Exception):
    """A row left out; the message is the reason it is counted under."""


def folder_pairs(root: str) -> tuple[list[tuple[str, str | None]], int]:
    """``(image path, caption file or None)`` under ``root`` (sorted): every file with an image extension,
    and every other file that has a sidecar ``.txt`` (it is tried as an image, and counted if it is none)."""
    pairs = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        names = set(files)
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            captioned = stem + ".txt" in names
            if ext.lower() in _NOT_IMAGES or not (captioned or ext.lower() in IMAGE_EXTENSIONS):
                continue
            pairs.append((os.path.join(folder, name), os.path.join(folder, stem + ".txt") if captioned else None))
    return pairs, len(pairs)


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, source: str) -> str:
    if wanted:
        if wanted not in columns:
            raise CliError(f"{source} has no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    found = next((c for c in columns if c.lower() in defaults), None)
    if found is None:
        raise CliError(f"{source}: no {what} column among {', '.join(columns)}; name it with --{what}-col")
    return found


def table_rows(path: str, image_col: str | None, caption_col: str | None) -> tuple[list[tuple[str, str]], int]:
    """``(image path, caption)`` rows of a CSV, TSV or Parquet table."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exn:
            raise CliError("reading Parquet needs pyarrow: pip install pyarrow") from exn
        columns = pq.read_schema(path).names
        icol = _pick(columns, image_col, IMAGE_COLUMNS, "image", path)
        ccol = _pick(columns, caption_col, CAPTION_COLUMNS, "caption", path)
        table = pq.read_table(path, columns=[icol, ccol]).to_pydict()
        rows = list(zip(table[icol], table[ccol]))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            columns = list(reader.fieldnames or [])
            icol = _pick(columns, image_col, IMAGE_COLUMNS, "image", path)
            ccol = _pick(columns, caption_col, CAPTION_COLUMNS, "caption", path)
            rows = [(r[icol], r[ccol]) for r in reader]
    base = os.path.dirname(os.path.abspath(path))
    rows = [(p if os.path.isabs(str(p)) else os.path.join(base, str(p)), c) for p, c in rows]
    return rows, len(rows)


def _encode(path: str, max_size: int | None, quality: int) -> tuple[str, bytes, str | None]:
    """The image's extension and bytes, untouched unless its shorter side exceeds ``max_size`` or its format
    is none of JPEG, PNG and WebP; third, the format it was converted from (None when it was not)."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:  # header only: proves it is an image
        width, height = image.size
        ext = STORED_FORMATS.get(image.format or "")
        converted = None if ext is not None else str(image.format)
        if max_size is None or min(width, height) <= max_size:
            if converted is not None:
                return "png", _as_png(image), converted
            return ext, data, None
        scale = max_size / min(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image.draft("RGB", size)  # JPEG: decode at reduced size first
        keep_alpha = image.mode in ("RGBA", "LA", "P")
        image = image.convert("RGBA" if keep_alpha else "RGB").resize(size, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        if keep_alpha:
            image.save(out, format="PNG")
            return "png", out.getvalue(), converted
        image.save(out, format="JPEG", quality=quality)
        return "jpg", out.getvalue(), converted


def _as_png(image: Image.Image) -> bytes:
    """A lossless PNG of ``image`` (a GIF's first frame); modes PNG cannot hold become RGB(A)."""
    image.load()
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _caption(value: str | None, from_file: bool) -> str:
    if value is None:
        raise _Skip("no caption")
    if from_file:
        try:
            with open(value, "rb") as f:
                value = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            raise _Skip("unreadable caption") from None
    text = " ".join(str(value).split())
    if not text:
        raise _Skip("empty caption")
    return text


def make_shards(source: str, out_dir: str, *, samples_per_shard: int = 10_000, max_shard_bytes: float = 1e9,
                max_size: int | None = None, quality: int = 95, image_col: str | None = None,
                caption_col: str | None = None, progress: bool = True) -> dict:
    """Write shards from ``source`` (folder or table) into ``out_dir``; returns a summary dict.

    Samples whose image or caption cannot be read are left out and counted by reason.
    """
    if not os.path.exists(source):
        raise CliError(f"input {source} does not exist")
    if os.path.isdir(out_dir) and any(n.endswith(".tar") or n == "shards.json" for n in os.listdir(out_dir)):
        raise CliError(f"{out_dir} already holds shards; choose a new or empty output folder")
    from_folder = os.path.isdir(source)
    if from_folder:
        rows, total = folder_pairs(source)
    elif os.path.splitext(source)[1].lower() in (".csv", ".tsv", ".parquet"):
        rows, total = table_rows(source, image_col, caption_col)
    else:
        raise CliError(f"input {source} is neither a folder nor a .csv/.tsv/.parquet table")
    if total == 0:
        raise CliError(f"no images found in {source} (looked for {', '.join(IMAGE_EXTENSIONS)} files, and any "
                       "file with a sidecar .txt caption)")
    skipped: Counter = Counter()
    converted: Counter = Counter()
    written = 0
    writer = ManifestShardWriter(out_dir, samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes)
    rows_iter: Iterator = iter(rows)
    if progress:
        rows_iter = tqdm(rows_iter, total=total, unit="img", desc="make_shards", file=sys.stderr)
    with writer:
        for image_path, caption in rows_iter:
            try:
                text = _caption(caption, from_folder)
                try:
                    ext, data, converted_from = _encode(image_path, max_size, quality)
                except FileNotFoundError:
                    raise _Skip("missing image file") from None
                except Exception:  # noqa: BLE001 - PIL raises many types for corrupt files; all mean "leave it out"
                    raise _Skip("unreadable image") from None
            except _Skip as why:
                skipped[str(why)] += 1
                continue
            if converted_from is not None:
                converted[converted_from] += 1
            rel = os.path.relpath(image_path, source if from_folder else os.path.dirname(os.path.abspath(source)))
            writer.write({"__key__": f"{written:09d}", ext: data, "txt": text,
                          "json": json.dumps({"source": rel}).encode()})
            written += 1
    return {"samples": written, "shards": len(writer.shards), "pattern": writer.pattern,
            "skipped": dict(skipped), "converted_to_png": dict(converted), "out_dir": out_dir}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with a one-line error on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m clip_train.data.make_shards",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("input", help="folder of images with sidecar .txt captions, or a .csv/.tsv/.parquet table")
    parser.add_argument("out_dir", help="folder to write 00000.tar, 00001.tar, ... and shards.json into")
    parser.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per shard at most")
    parser.add_argument("--max-shard-mb", type=float, default=1000.0, help="start a new shard beyond this size")
    parser.add_argument("--max-size", type=int, default=None,
                        help="downscale images whose shorter side is larger than this (re-encoded; default: keep every "
                             "image as it is)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    parser.add_argument("--image-col", default=None, help=f"table column of image paths (default: first of "
                                                          f"{', '.join(IMAGE_COLUMNS)})")
    parser.add_argument("--caption-col", default=None, help=f"table column of captions (default: first of "
                                                            f"{', '.join(CAPTION_COLUMNS)})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1 or args.max_shard_mb <= 0 or (args.max_size is not None and args.max_size < 1):
        print("error: --samples-per-shard, --max-shard-mb and --max-size must be positive", file=sys.stderr)
        return 2
    try:
        summary = make_shards(args.input, args.out_dir, samples_per_shard=args.samples_per_shard,
                              max_shard_bytes=args.max_shard_mb * 1e6, max_size=args.max_size,
                              quality=args.quality, image_col=args.image_col, caption_col=args.caption_col,
                              progress=not args.no_progress)
    except CliError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
    converted = ", ".join(f"{n} {kind}" for kind, n in summary["converted_to_png"].items())
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {args.out_dir} (skipped: {skipped}"
          f"{'; converted to PNG: ' + converted if converted else ''})")
    if summary["samples"]:
        print(f"train with: \"data.train_shards='{summary['pattern']}'\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
