"""Benchmark of one training step: step time, samples/s and MFU, ours against OpenCLIP's equivalent.

    python -m clip_train.bench.train --model ViT-B-16 --batch 256 --precision bf16 [--device cpu|cuda]
        [--impl ours,open_clip] [--steps 10] [--warmup 3] [--rounds 1] [--compile] [--peak-tflops X]
        [--find-max-batch] [--out runs.jsonl]

Both sides train the same architecture on the same seeded synthetic batch (CLIP-normalised random images
and random captions that end in the end-of-text token), already on the device, so only the step is timed:

- ours: ``create_model_from_config`` with the trainer's defaults, the tiled ``ClipLoss``, the trainer's
  ``forward_backward`` and fused AdamW from ``build_optimizer``, the cosine schedule and the temperature
  clamp, i.e. what ``Trainer.train_step`` runs after the host-to-device copy;
- open_clip: ``open_clip.model.CLIP`` built from the equivalent ``CLIPVisionCfg``/``CLIPTextCfg``,
  ``open_clip.loss.ClipLoss``, and ``torch.optim.AdamW`` with default options and the two weight-decay
  groups as in OpenCLIP's training script, with its temperature clamp after the step.

Precision ``bf16``/``fp16`` is autocast for both (fp16 adds a GradScaler); TF32 matmuls are allowed on
GPUs for both. Each implementation runs in a fresh subprocess (``--rounds`` times, interleaved), which
runs ``--warmup`` steps, then ``--steps`` steps timed as one window with one device sync at its end.

**FLOPs** are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` records the matmul,
convolution and attention FLOPs of our model's forward and backward at the benchmark's batch (on the
``meta`` device, so counting costs no compute), plus ``6 * B**2 * D`` for the B x B logits of the loss
(forward, and the two gradient products; the tiled loss's recomputation is not counted, as MFU counts
model work only). Both implementations do the same model work, so the same count divides both times.
**MFU** = FLOPs per step / step time / peak FLOP/s, with the dense peak of the device from ``PEAK_TFLOPS``
(bf16/fp16 tensor cores, or TF32 for fp32); on a CPU or an unknown GPU it is null unless ``--peak-tflops``
gives the peak.

One progress line per measurement, then a final JSON line (also appended to ``--out``). ``--find-max-batch``
(CUDA only) instead doubles the batch from ``--batch`` until a step runs out of memory, per implementation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

from clip_train.bench import command_line
from clip_train.bench.loss import emit_report, machine_info
from clip_train.models.config import ModelConfig

IMPLEMENTATIONS = ("ours", "open_clip")
PRECISIONS = ("fp32", "bf16", "fp16")

PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets; fp32 means TF32 matmuls, which the
    # benchmark enables. The first name found in the device name wins, so variants come before families.
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),  # SXM5
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
)
"""Peak TFLOP/s per GPU by device-name substring and precision."""

START_OF_TEXT, END_OF_TEXT = 49406, 49407


class CliError(Exception):
    """A one-line error for the user."""


# ------------------------------------------------------------------------------------------------ inputs


def make_batch(cfg: ModelConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded synthetic batch on the CPU: float images ``(B, 3, S, S)`` and tokens ``(B, context)``.

    Captions are 2 to ``context - 2`` random BPE ids between the start and end tokens, zero-padded, so
    the text tower reads its feature at a different position in each row, as with real captions.
    """
    generator = torch.Generator().manual_seed(seed)
    size, context = cfg.vision.image_size, cfg.text.context_length
    images = torch.randn(batch, 3, size, size, generator=generator)  # already mean 0, std 1 like normalised
    tokens = torch.zeros(batch, context, dtype=torch.long)
    tokens[:, 0] = START_OF_TEXT
    body = torch.randint(1, min(cfg.text.vocab_size, START_OF_TEXT), (batch, context), generator=generator)
    lengths = torch.randint(2, max(3, context - 1), (batch,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        tokens[row, 1 : length + 1] = body[row, :length]
        tokens[row, length + 1] = END_OF_TEXT
    return images, tokens


# ------------------------------------------------------------------------------------------------- FLOPs


def count_step_flops(cfg: ModelConfig, batch: int) -> dict[str, int]:
    """Model FLOPs of one training step at ``batch``: towers forward+backward (counted) plus the logits.

    The towers are built and run on the ``meta`` device under ``FlopCounterMode``, which counts each
    matmul, convolution and attention call from its shapes (2 FLOPs per multiply-add); element-wise work
    (norms, activations, softmax) is not counted, as is usual for MFU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from clip_train.models.factory import create_model_from_config

    with torch.device("meta"):
        model = create_model_from_config(cfg)
        size = cfg.vision.image_size
        images = torch.empty(batch, 3, size, size)
        tokens = torch.zeros(batch, cfg.text.context_length, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        image_features, text_features, scale = model(images, tokens)
        # A loss that touches every output without adding matmuls, so backward covers both towers.
        (image_features.sum() + text_features.sum() + scale).backward()
    towers = int(counter.get_total_flops())
    logits = 6 * batch * batch * cfg.embed_dim
    return {"towers": towers, "logits": logits, "total": towers + logits}


def peak_tflops(device: str, precision: str, override: float | None) -> tuple[float | None, str]:
    """The peak TFLOP/s that MFU divides by, and where it came from."""
    if override is not None:
        return override, "--peak-tflops"
    if not device.startswith("cuda"):
        return None, "no peak known for a CPU; pass --peak-tflops"
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[precision], f"table: {key} {precision}"
    return None, f"no peak known for {name!r}; pass --peak-tflops"


# ------------------------------------------------------------------------------------------------- steps


def _autocast(precision: str, device: torch.device):
    from clip_train.train.precision import autocast

    return autocast(precision, device)


def build_ours(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> Callable:
    """Our training step (model, tiled loss, fused AdamW, schedule, clamp) as ``step(images, tokens)``."""
    from clip_train.config import OptimConfig
    from clip_train.loss import ClipLoss
    from clip_train.models.clip import MAX_LOGIT_SCALE
    from clip_train.models.factory import create_model_from_config
    from clip_train.train.optim import build_optimizer, build_scheduler
    from clip_train.train.precision import grad_scaler
    from clip_train.train.step import forward_backward

    model = create_model_from_config(cfg).to(device)
    step_model = torch.compile(model) if args.compile else model
    loss_fn = ClipLoss()
    optim_cfg = OptimConfig(warmup_steps=1)
    optimizer = build_optimizer(model, optim_cfg, device)
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps=10_000)
    scaler = grad_scaler(args.precision, device)

    def loss(image_features, text_features, logit_scale, direct_grads):
        return loss_fn(image_features, text_features, logit_scale if direct_grads else logit_scale.detach())

    def step(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = forward_backward(
            step_model,
            loss,
            images,
            tokens,
            precision=args.precision,
            scale_loss=scaler.scale,
            plain_model=model,
        )
        if scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return value

    return step


def open_clip_model(cfg: ModelConfig) -> torch.nn.Module:
    """OpenCLIP's CLIP with the same architecture as ``cfg`` (ViT or ModifiedResNet image tower)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision, text = cfg.vision, cfg.text
    if vision.timm_model_name:
        raise CliError("--model: timm image towers are not benchmarked against OpenCLIP")
    layers = vision.layers[0] if cfg.is_vit else tuple(vision.layers)
    vision_cfg = CLIPVisionCfg(
        layers=layers,
        width=vision.width,
        head_width=vision.head_width,
        mlp_ratio=vision.mlp_ratio,
        patch_size=vision.patch_size or 16,
        image_size=vision.image_size,
    )
    text_cfg = CLIPTextCfg(
        context_length=text.context_length,
        vocab_size=text.vocab_size,
        width=text.width,
        heads=text.heads,
        layers=text.layers,
        mlp_ratio=text.mlp_ratio,
    )
    return CLIP(cfg.embed_dim, vision_cfg, text_cfg, quick_gelu=cfg.quick_gelu, output_dict=True)


def build_open_clip(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> Callable:
    """OpenCLIP's training step on the same architecture: its model, ClipLoss and a default AdamW."""
    import open_clip.loss

    model = open_clip_model(cfg).to(device)
    step_model = torch.compile(model) if args.compile else model
    loss_fn = open_clip.loss.ClipLoss()
    # OpenCLIP's training script: no decay for gains, biases and the temperature; AdamW's default options.
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
                or "logit_scale" in n]  # fmt: skip
    decay = [p for n, p in model.named_parameters() if not any(p is q for q in no_decay)]
    optimizer = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def step(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(args.precision, device):
            out = step_model(images, tokens)
            losses = loss_fn(**out, output_dict=True)
            total = sum(losses.values())
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return total.detach()

    return step


# ------------------------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(impl: str, args: argparse.Namespace) -> dict:
    """Warm up, then time ``args.steps`` steps of ``impl`` in *this* process (run it in a fresh one)."""
    from clip_train.models.registry import get_model_config

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = get_model_config(args.model)
    torch.manual_seed(args.seed)
    builder = build_ours if impl == "ours" else build_open_clip
    step = builder(cfg, args, device)
    images, tokens = make_batch(cfg, args.batch, seed=args.seed)
    images, tokens = images.to(device), tokens.to(device)
    for _ in range(args.warmup):
        step(images, tokens)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    value = None
    for _ in range(args.steps):
        value = step(images, tokens)
    _sync(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "impl": impl,
        "step_s": elapsed / args.steps,
        "samples_per_s": args.batch * args.steps / elapsed,
        # CPU seconds of this process per step: on a shared CPU, less sensitive to other jobs than wall time.
        "cpu_s_per_step": cpu / args.steps,
        "peak_mem_bytes": peak,
        "peak_mem_gib": round(peak / 2**30, 3),
        "loss_value": float(value) if value is not None else None,
    }


def _child_command(impl: str, args: argparse.Namespace, batch: int, steps: int, warmup: int) -> list[str]:
    command = [
        sys.executable, "-m", "clip_train.bench.train", "--child", impl, "--model", args.model,
        "--batch", str(batch), "--precision", args.precision, "--device", args.device,
        "--steps", str(steps), "--warmup", str(warmup), "--seed", str(args.seed), "--threads", str(args.threads),
    ]  # fmt: skip
    return command + (["--compile"] if args.compile else [])


def run_isolated(impl: str, args: argparse.Namespace, batch: int, steps: int, warmup: int) -> dict:
    """Measure ``impl`` in a fresh interpreter; a crash (e.g. out of memory) is reported, not raised.

    With ``--no-isolate`` it runs in this process instead (quicker start; peak memory then includes
    whatever ran before it).
    """
    if args.no_isolate:
        return measure(
            impl, argparse.Namespace(**{**vars(args), "batch": batch, "steps": steps, "warmup": warmup})
        )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        _child_command(impl, args, batch, steps, warmup), check=False, capture_output=True, text=True, env=env
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        stderr = proc.stderr.strip()
        out_of_memory = proc.returncode in (-9, 137) or "out of memory" in stderr.lower()
        reason = "out of memory" if out_of_memory else stderr.splitlines()[-1] if stderr else "no output"
        return {"impl": impl, "error": f"exit {proc.returncode}: {reason}", "out_of_memory": out_of_memory}
    return json.loads(lines[-1])


def find_max_batch(impl: str, args: argparse.Namespace, limit: int) -> dict:
    """Largest batch (doubling from ``args.batch``) at which one step of ``impl`` runs without an error."""
    best, batch, last_error = None, args.batch, None
    while batch <= limit:
        result = run_isolated(impl, args, batch, steps=1, warmup=1)
        status = result.get("error", "ok")
        print(
            f"[bench.train] {impl:9s} {args.model} B={batch} {args.precision} {args.device}: {status}",
            flush=True,
        )
        if "error" in result:
            last_error = result["error"]
            break
        best, batch = batch, batch * 2
    return {"impl": impl, "max_batch": best, "stopped_by": last_error or f"limit {limit}"}


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.bench.train",
        description="Step time, samples/s and MFU of a CLIP training step, ours vs OpenCLIP.",
    )
    parser.add_argument("--model", default="ViT-B-16", help="architecture name (see clip_train.list_models)")
    parser.add_argument("--batch", type=int, default=256, help="batch size of the step (default 256)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="autocast precision")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", default="ours,open_clip", help="comma-separated subset of ours,open_clip")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per implementation, interleaved")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--peak-tflops", type=float, help="peak TFLOP/s of the device for MFU (overrides the table)"
    )
    parser.add_argument(
        "--find-max-batch", action="store_true", help="double the batch until OOM (CUDA only)"
    )
    parser.add_argument("--max-batch-limit", type=int, default=1 << 20, help="stop --find-max-batch here")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-isolate", action="store_true", help="measure in this process (quick checks only)"
    )
    parser.add_argument("--out", help="append the final JSON line to this file")
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise CliError(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.warmup < 0:
        raise CliError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise CliError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: CUDA is not available on this machine")
    if args.find_max_batch and not args.device.startswith("cuda"):
        raise CliError(
            "--find-max-batch needs --device cuda (on a CPU it would exhaust the machine's memory)"
        )
    args.impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    unknown = sorted(set(args.impls) - set(IMPLEMENTATIONS))
    if unknown or not args.impls:
        raise CliError(f"--impl: unknown {unknown}; choose from {','.join(IMPLEMENTATIONS)}")
    from clip_train.models.registry import get_model_config

    try:
        args.model_config = get_model_config(args.model)
    except ValueError as error:
        raise CliError(f"--model: {error}") from None
    return args


def _summarise(impl: str, runs: list[dict], flops: dict, peak: float | None) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"impl": impl, "error": runs[-1]["error"]}
    step_s = statistics.median(r["step_s"] for r in ok)
    achieved = flops["total"] / step_s
    return {
        "impl": impl,
        "step_s": step_s,
        "step_s_all": [round(r["step_s"], 5) for r in ok],
        "samples_per_s": statistics.median(r["samples_per_s"] for r in ok),
        "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in ok),
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "peak_mem_gib": max(r["peak_mem_gib"] for r in ok),
        "loss_value": ok[-1]["loss_value"],
    }


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    """The parent: measure each implementation in fresh subprocesses and build the report."""
    setting = f"{args.model} B={args.batch} {args.precision} {args.device}"
    report: dict = {
        "benchmark": "train",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("clip_train.bench.train", argv),
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "device": args.device,
        "compile": args.compile,
        "load_average": list(os.getloadavg()),
        "machine": machine_info(args.device),
    }
    if args.find_max_batch:
        report["results"] = [find_max_batch(impl, args, args.max_batch_limit) for impl in args.impls]
        return report

    flops = count_step_flops(args.model_config, args.batch)
    peak, peak_source = peak_tflops(args.device, args.precision, args.peak_tflops)
    runs: dict[str, list[dict]] = {impl: [] for impl in args.impls}
    for round_index in range(args.rounds):
        for impl in args.impls:
            print(f"[bench.train] {impl:9s} {setting}: round {round_index + 1}/{args.rounds}, "
                  f"{args.warmup} warm-up + {args.steps} timed steps ...", flush=True)  # fmt: skip
            result = run_isolated(impl, args, args.batch, args.steps, args.warmup)
            runs[impl].append(result)
            if "error" in result:
                print(f"[bench.train] {impl:9s} failed: {result['error']}", flush=True)
            else:
                print(f"[bench.train] {impl:9s} {setting}: {result['step_s'] * 1e3:.1f} ms/step, "
                      f"{result['samples_per_s']:.1f} samples/s, peak {result['peak_mem_gib']:.2f} GiB, "
                      f"{result['cpu_s_per_step'] * 1e3:.1f} CPU-ms/step, loss {result['loss_value']:.4f}",
                      flush=True)  # fmt: skip
    results = [_summarise(impl, impl_runs, flops, peak) for impl, impl_runs in runs.items()]
    report.update({
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "flops_per_step": flops["total"],
        "flops_method": "torch.utils.flop_counter on our model's forward+backward (meta device) "
                        "+ 6*B^2*D analytic for the logits",
        "flops_breakdown": flops,
        "peak_tflops": peak, "peak_source": peak_source,
        "results": results,
    })  # fmt: skip
    by_impl = {r["impl"]: r for r in results if "step_s" in r}
    if "ours" in by_impl and "open_clip" in by_impl:
        report["ours_vs_open_clip"] = {
            "speedup": by_impl["open_clip"]["step_s"] / by_impl["ours"]["step_s"],
            "memory_ratio": by_impl["ours"]["peak_mem_gib"] / max(by_impl["open_clip"]["peak_mem_gib"], 1e-9),
        }
    return report


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Run the benchmark; print progress lines and the final JSON line (returned too)."""
    try:
        args = parse_args(argv)
        if args.child:
            print(json.dumps(measure(args.child, args)), flush=True)
            return None
        report = run(args, argv)
    except CliError as error:
        raise SystemExit(f"bench.train: {error}") from None
    emit_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
