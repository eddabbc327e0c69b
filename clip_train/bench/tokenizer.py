"""Benchmark of the tokenizer's cost per caption, for normal captions and pathological ones.

    python -m clip_train.bench.tokenizer [--repeats 5] [--context-length 77] [--unbounded]

Cases: a typical caption, a 1 MB caption that is one word, a 1 MB caption of ordinary words, a 20,000
character word. Each is tokenised ``--repeats`` times by a fresh tokenizer (no word cache carried over) and
the median is reported. ``--unbounded`` also times the unbounded path (``encode`` of the whole text, as
before the length bound) on the one case where that takes a minute rather than hours: the 20k word
(57 s on a loaded 2-core EPYC, 2026-12-02). The last line on stdout is JSON with ``ms`` per case, the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import time

from clip_train.bench import command_line
from clip_train.bench.loss import machine_info
from clip_train.tokenizer import ClipTokenizer


def cases(seed: int = 0) -> dict[str, str]:
    """The captions timed, by name (seeded, so every run times the same text)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["a", "photo", "of", "the", "dog", "on", "beach", "sunset", "with", "red", "car", "street"]
    return {
        "typical_caption": "A golden retriever catching a red frisbee on the beach at sunset, 4k photo",
        "one_word_1mb": "".join(rng.choice(letters) for _ in range(1_000_000)),
        "words_1mb": " ".join(rng.choice(words) for _ in range(250_000))[:1_000_000],
        "one_word_20k": "".join(rng.choice(letters) for _ in range(20_000)),
    }


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a line per case and the JSON report; returns the report."""
    parser = argparse.ArgumentParser(prog="python -m clip_train.bench.tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--unbounded", action="store_true",
                        help="also time the unbounded path (whole-text BPE) on the 20k-character word")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    base = ClipTokenizer(args.context_length)

    def fresh() -> ClipTokenizer:
        tok = ClipTokenizer.__new__(ClipTokenizer)
        tok.__dict__.update(base.__dict__)
        tok._word_cache = {k: v for k, v in base._word_cache.items() if k.startswith("<")}  # specials only
        return tok

    results: dict[str, float] = {}
    for name, text in cases().items():
        results[name] = round(_time(lambda text=text: fresh()([text]), args.repeats), 3)
        print(f"[bench.tokenizer] {name:16s} {len(text):>9,d} chars: {results[name]:.3f} ms", flush=True)
    report = {
        "benchmark": "tokenizer",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("clip_train.bench.tokenizer", argv),
        "context_length": args.context_length,
        "repeats": args.repeats,
        "ms": results,
        "machine": machine_info("cpu"),
    }
    if args.unbounded:
        text = cases()["one_word_20k"]
        report["unbounded_ms"] = {"one_word_20k": round(_time(lambda: fresh().encode(text), 1), 1)}
        print(f"[bench.tokenizer] unbounded one_word_20k: {report['unbounded_ms']['one_word_20k']:.1f} ms",
              flush=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
