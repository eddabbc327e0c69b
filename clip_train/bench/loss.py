"""Benchmark of the contrastive loss: time and peak memory of forward + backward, ours against OpenCLIP.

    python -m clip_train.bench.loss --batch 16384 --dim 512 [--device cpu|cuda] [--dtype fp32|bf16]
        [--impl tiled,open_clip] [--loss clip|siglip] [--repeats 3] [--tile-size 4096] [--out runs.jsonl]

Every implementation is measured in a fresh subprocess on the same seeded input (L2-normalised random
features, ``logit_scale`` requiring grad), so one measurement's allocations cannot hide another's peak:

- time: wall clock of ``loss = fn(...); loss.backward()`` after a warm-up at a small batch; median (and
  all values) of ``--repeats`` runs;
- memory: on CPU, the growth of the process's peak resident set (``ru_maxrss``) over its resident set just
  before the first timed run, i.e. everything forward and backward allocate including the feature
  gradients; on CUDA, ``torch.cuda.max_memory_allocated`` over the allocation before the first run.

One progress line per implementation, then a final JSON line (also appended to ``--out``) with the machine,
the date, the command and, when OpenCLIP ran, our time and memory relative to it. OpenCLIP is skipped
with a reason when its logits would not fit in the available memory (about ``4.5 * B**2`` floats).
``--plot-from RUNS.jsonl --plot-out PNG`` draws memory and time against batch size from saved JSON lines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from clip_train.bench import command_line

IMPLEMENTATIONS = ("tiled", "exact", "open_clip")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPEN_CLIP_FLOATS_PER_PAIR = 4.5
"""OpenCLIP's ClipLoss holds two logits matrices and their soft-max/gradient buffers: measured here at
about 4.5 fp32 values per pair (18 GB at B = 32,768), used to skip sizes that cannot fit."""
WARMUP_BATCH = 1024
"""Warm-up size: loads kernels and thread pools without raising the process's peak memory."""


# ------------------------------------------------------------------------------------------- measurement


def make_inputs(
    batch: int, dim: int, device: str, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded unit-norm image/text features (leaves requiring grad), logit_scale 1/0.07 and bias -10.

    Normalised in place so creating the inputs leaves no ``batch x dim`` temporaries in the peak.
    """
    generator = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(2):
        x = torch.randn(batch, dim, generator=generator)
        x /= x.norm(dim=1, keepdim=True)
        features.append(x.to(device=device, dtype=dtype).requires_grad_(True))
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return features[0], features[1], scale, bias


def build_loss(impl: str, loss: str, tile_size: int) -> Callable[..., torch.Tensor]:
    """``fn(image, text, scale, bias) -> loss`` for one implementation."""
    if impl == "open_clip":
        import open_clip.loss as open_clip_loss

        if loss == "siglip":
            siglip = open_clip_loss.SigLipLoss()
            return lambda i, t, s, b: siglip(i, t, s, b)
        clip = open_clip_loss.ClipLoss()
        return lambda i, t, s, b: clip(i, t, s)

    from clip_train.loss import ClipLoss, SigLipLoss

    if loss == "siglip":
        ours_siglip = SigLipLoss(tile_size=tile_size, implementation=impl)
        return lambda i, t, s, b: ours_siglip(i, t, s, b)
    ours_clip = ClipLoss(tile_size=tile_size, implementation=impl)
    return lambda i, t, s, b: ours_clip(i, t, s)


def _resident_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(impl: str, args: argparse.Namespace) -> dict:
    """Time and peak memory of forward + backward for ``impl`` in *this* process (run it in a fresh one)."""
    dtype = DTYPES[args.dtype]
    fn = build_loss(impl, args.loss, args.tile_size)

    def step(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward()
        return out.detach()

    step(make_inputs(min(args.batch, WARMUP_BATCH), args.dim, args.device, dtype, seed=1))
    inputs = make_inputs(args.batch, args.dim, args.device, dtype, seed=args.seed)
    _sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _resident_bytes()
    times, value = [], None
    for _ in range(args.repeats):
        _sync(args.device)
        start = time.perf_counter()
        value = step(inputs)
        _sync(args.device)
        times.append(time.perf_counter() - start)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = max(0, _peak_resident_bytes() - baseline)
    return {
        "impl": impl,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": [round(t, 4) for t in times],
        "peak_mem_bytes": peak,
        "peak_mem_gib": round(peak / 2**30, 3),
        "loss_value": float(value),
    }


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return sys.maxsize


def _child_command(impl: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "clip_train.bench.loss", "--child", impl,
        "--batch", str(args.batch), "--dim", str(args.dim), "--device", args.device, "--dtype", args.dtype,
        "--loss", args.loss, "--repeats", str(args.repeats), "--tile-size", str(args.tile_size),
        "--seed", str(args.seed),
    ]  # fmt: skip


def run_isolated(impl: str, args: argparse.Namespace) -> dict:
    """Measure ``impl`` in a fresh interpreter; a crash (e.g. out of memory) is reported, not raised."""
    proc = subprocess.run(_child_command(impl, args), check=False, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else proc.stderr.strip()[-500:]
        return {"impl": impl, "error": f"exit {proc.returncode}: {reason}"}
    return json.loads(lines[-1])


def emit_report(report: dict, out: str | None) -> None:
    """Print the report as one JSON line (the last line of stdout), appended to ``out`` too when given."""
    line = json.dumps(report)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


def machine_info(device: str) -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------------------------ plotting


def plot(runs_files: Sequence[str], out: str) -> None:
    """Peak memory and time against batch size, ours vs OpenCLIP, from saved final JSON lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, dict]] = {}
    title = ""
    for path in runs_files:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            run = json.loads(line)
            title = f"{run['loss']} loss, D={run['dim']}, {run['dtype']}, {run['device']} ({run['machine']['cpu']})"
            for result in run["results"]:
                if "error" not in result and "skipped" not in result:
                    series.setdefault(result["impl"], {})[run["batch"]] = result
    labels = {"tiled": "clip_train (tiled)", "exact": "clip_train (exact)", "open_clip": "OpenCLIP ClipLoss"}
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, points in sorted(series.items()):
        batches = sorted(points)
        label = labels.get(impl, impl)
        ax_mem.plot(batches, [points[b]["peak_mem_bytes"] / 2**30 for b in batches], "o-", label=label)
        ax_time.plot(batches, [points[b]["median_s"] for b in batches], "o-", label=label)
    for ax, ylabel in ((ax_mem, "peak memory of forward+backward (GiB)"), (ax_time, "forward+backward (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch size B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.bench.loss",
        description="Time and peak memory of the contrastive loss (forward+backward), ours vs OpenCLIP.",
    )
    parser.add_argument("--batch", type=int, default=16384, help="global batch size B (default 16384)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D (default 512)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="feature dtype")
    parser.add_argument(
        "--impl",
        default="tiled,open_clip",
        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)} (default tiled,open_clip)",
    )
    parser.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    parser.add_argument("--tile-size", type=int, default=None, help="tile edge (default: the library's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="run OpenCLIP even if it looks too big")
    parser.add_argument("--out", help="append the final JSON line to this file")
    parser.add_argument("--plot-from", nargs="+", metavar="RUNS", help="JSON-lines files to plot, then exit")
    parser.add_argument("--plot-out", default="docs/img/loss_memory.png")
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tile_size is None:
        from clip_train.loss import DEFAULT_TILE_SIZE

        args.tile_size = DEFAULT_TILE_SIZE
    return args


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Run the benchmark; print a progress line per implementation and the final JSON line."""
    args = parse_args(argv)
    if args.plot_from:
        plot(args.plot_from, args.plot_out)
        print(json.dumps({"plot": args.plot_out}))
        return None
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return None

    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLEMENTATIONS)
    if unknown:
        raise SystemExit(f"--impl: unknown {sorted(unknown)}; choose from {','.join(IMPLEMENTATIONS)}")
    setting = f"{args.loss} B={args.batch} D={args.dim} {args.dtype} {args.device}"
    results = []
    for impl in impls:
        materialises = impl in ("exact", "open_clip")
        need = OPEN_CLIP_FLOATS_PER_PAIR * args.batch**2 * 4
        if materialises and not args.force and need > 0.9 * _available_bytes(args.device):
            reason = (
                f"needs ~{need / 2**30:.0f} GiB, {_available_bytes(args.device) / 2**30:.0f} GiB available"
            )
            print(f"[bench.loss] {impl:9s} {setting}: skipped ({reason})", flush=True)
            results.append({"impl": impl, "skipped": reason})
            continue
        print(f"[bench.loss] {impl:9s} {setting}: running {args.repeats} x forward+backward ...", flush=True)
        result = run_isolated(impl, args)
        results.append(result)
        if "error" in result:
            print(f"[bench.loss] {impl:9s} failed: {result['error']}", flush=True)
        else:
            print(
                f"[bench.loss] {impl:9s} {setting}: {result['median_s']:.3f} s (median of {args.repeats}), "
                f"peak +{result['peak_mem_gib']:.3f} GiB, loss {result['loss_value']:.6f}",
                flush=True,
            )
    report = {
        "benchmark": "loss",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("clip_train.bench.loss", argv),
        "loss": args.loss,
        "batch": args.batch,
        "dim": args.dim,
        "device": args.device,
        "dtype": args.dtype,
        "tile_size": args.tile_size,
        "repeats": args.repeats,
        "machine": machine_info(args.device),
        "results": results,
    }
    by_impl = {r["impl"]: r for r in results if "median_s" in r}
    if "open_clip" in by_impl:
        base = by_impl["open_clip"]
        report["vs_open_clip"] = {
            impl: {
                "time_ratio": round(r["median_s"] / base["median_s"], 3),
                "memory_ratio": round(r["peak_mem_bytes"] / max(base["peak_mem_bytes"], 1), 4),
                "loss_abs_diff": abs(r["loss_value"] - base["loss_value"]),
            }
            for impl, r in by_impl.items()
            if impl != "open_clip"
        }
    emit_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
