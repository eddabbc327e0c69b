"""Every GPU figure and CUDA-only check in one command, as a markdown table for ``docs/benchmarks.md``.

    python -m clip_train.bench.gpu [--budget-s 450] [--only NAME,...] [--out DIR]   # on a CUDA machine
    python -m clip_train.bench.gpu --dry-run                                        # anywhere: the plumbing

On a GPU it runs, in this order, within ``--budget-s`` seconds (an entry that would start after the budget
is spent is listed as skipped, so the table always comes out):

- **checks** (in this process, seconds each): bf16 autocast (our model's features against fp32, LayerNorm
  in fp32), an NCCL process group of one GPU (all-reduce, all-gather, reduce-scatter), the SDPA flash kernel
  on our ViT-B/16 and text tower (forward and backward with only flash allowed), fused AdamW on CUDA (and its
  on-device skip of a non-finite step), pinned batches and non-blocking copies from our loader,
  ``train.compile`` (compiled blocks give the eager loss), no host sync inside ``Trainer.train_step``
  (``torch.cuda.set_sync_debug_mode("error")``), and a short ``python -m clip_train`` run on the GPU with
  a profiler window (step-time keys, Chrome trace, CUDA memory snapshot);
- **benchmarks** (each the existing command in a fresh process, as listed in ``docs/benchmarks.md``):
  ViT-B/16 bf16 train step at B = 256 against OpenCLIP (MFU, samples/s), the loss at B = 65,536 bf16 against
  OpenCLIP, the data pipeline with 8 workers, the largest batch per GPU for both, and the step compiled.

``--dry-run`` checks this command's own plumbing on a CPU: every entry that can runs its setup at a tiny
size on the CPU (the benchmark CLIs in this process, the tiny model, a few samples), the others are listed
as needing CUDA, and the table renders. Its figures mean nothing. The last stdout lines are the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from clip_train.bench import command_line
from clip_train.errors import reason

NEEDS_CUDA = "needs CUDA"


@dataclasses.dataclass
class Context:
    """What every entry may read: the mode, the device, a scratch folder, the time left."""

    dry_run: bool
    device: torch.device
    scratch: Path
    deadline: float

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


@dataclasses.dataclass
class Row:
    name: str
    status: str
    """``ok``, ``FAILED``, ``needs CUDA`` or ``skipped (...)``."""
    result: str = ""
    command: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class Entry:
    name: str
    what: str
    run: Callable[[Context], tuple[str, str]]
    """Returns ``(result text, command)``; raises on failure."""
    dry_run_on_cpu: bool


class CheckFailed(AssertionError):
    """A CUDA check whose result is wrong (rather than an error)."""


# ------------------------------------------------------------------------------------------ the benchmarks


def _bench_json(module: str, argv: list[str], ctx: Context, in_process: Callable[[list[str]], object]) -> dict:
    """The final JSON line of ``python -m MODULE ARGV``: a fresh process on a GPU, this process in a dry run."""
    if ctx.dry_run:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            in_process(argv)
        lines = out.getvalue().strip().splitlines()
    else:
        proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, check=False,
                              timeout=max(ctx.seconds_left(), 30), env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"exit {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def _train_figures(report: dict) -> str:
    parts = []
    for r in report["results"]:
        if "error" in r:
            parts.append(f"{r['impl']}: {r['error']}")
            continue
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        parts.append(f"{r['impl']} {1e3 * r['step_s']:.1f} ms/step, {r['samples_per_s']:,.0f} samples/s{mfu}, "
                     f"peak {r['peak_mem_gib']:.2f} GiB")
    if "ours_vs_open_clip" in report:
        parts.append(f"speed-up {report['ours_vs_open_clip']['speedup']:.2f}x")
    return "; ".join(parts)


def bench_train_step(ctx: Context, compile_: bool = False) -> tuple[str, str]:
    from clip_train.bench.train import main as train_main

    if ctx.dry_run:
        argv = ["--model", "tiny", "--batch", "8", "--precision", "fp32", "--device", "cpu", "--steps", "1",
                "--warmup", "0", "--threads", "1", "--no-isolate"]
    else:
        argv = ["--model", "ViT-B-16", "--batch", "256", "--precision", "bf16", "--device", "cuda",
                "--rounds", "1" if compile_ else "2"]
        if compile_:
            argv += ["--compile", "--impl", "ours"]
    report = _bench_json("clip_train.bench.train", argv, ctx, train_main)
    return _train_figures(report), command_line("clip_train.bench.train", argv)


def bench_max_batch(ctx: Context) -> tuple[str, str]:
    from clip_train.bench.train import main as train_main

    argv = ["--model", "ViT-B-16", "--batch", "512", "--precision", "bf16", "--device", "cuda",
            "--find-max-batch"]
    report = _bench_json("clip_train.bench.train", argv, ctx, train_main)
    found = {r["impl"]: r["max_batch"] for r in report["results"]}
    text = ", ".join(f"{impl} {batch if batch else '< 512'}" for impl, batch in found.items())
    if found.get("ours") and found.get("open_clip"):
        text += f" ({found['ours'] / found['open_clip']:.1f}x)"
    return text, command_line("clip_train.bench.train", argv)


def bench_loss(ctx: Context) -> tuple[str, str]:
    from clip_train.bench.loss import main as loss_main

    if ctx.dry_run:  # the measurement a child process would make, here
        argv = ["--batch", "64", "--dim", "32", "--device", "cpu", "--repeats", "1", "--child", "tiled"]
    else:
        argv = ["--batch", "65536", "--dim", "512", "--device", "cuda", "--dtype", "bf16",
                "--impl", "tiled,open_clip", "--repeats", "3"]
    report = _bench_json("clip_train.bench.loss", argv, ctx, loss_main)
    results = report.get("results", [report])
    parts = []
    for r in results:
        if "median_s" in r:
            parts.append(f"{r['impl']} {r['median_s']:.3f} s, peak +{r['peak_mem_gib']:.2f} GiB")
        else:
            parts.append(f"{r['impl']}: {r.get('skipped') or r.get('error')}")
    for impl, ratios in report.get("vs_open_clip", {}).items():
        parts.append(f"{impl}/OpenCLIP time {ratios['time_ratio']:.2f}x, memory {ratios['memory_ratio']:.3f}")
    return "; ".join(parts), command_line("clip_train.bench.loss", argv)


def bench_data(ctx: Context) -> tuple[str, str]:
    from clip_train.bench.data import main as data_main

    shards = str(ctx.scratch / "bench_shards")
    if ctx.dry_run:
        argv = ["--synthetic", shards, "--synthetic-samples", "8", "--image-size", "32", "--workers", "0",
                "--batch-size", "4", "--batches", "1", "--warmup", "0", "--shuffle-buffer", "0"]
    else:
        argv = ["--synthetic", shards, "--synthetic-samples", "1024", "--image-size", "224", "--workers", "8",
                "--batches", "40"]
    report = _bench_json("clip_train.bench.data", argv, ctx, data_main)
    return f"{report['samples_per_s']:,.0f} samples/s", command_line("clip_train.bench.data", argv)


# ------------------------------------------------------------------------------------------ the CUDA checks


def _model(ctx: Context):
    from clip_train.models import create_model_from_config
    from clip_train.models.registry import get_model_config

    cfg = get_model_config("tiny" if ctx.dry_run else "ViT-B-16")
    torch.manual_seed(0)
    return create_model_from_config(cfg).to(ctx.device), cfg


def _batch(cfg, batch: int, device: torch.device):
    from clip_train.bench.train import make_batch

    images, tokens = make_batch(cfg, batch)
    return images.to(device), tokens.to(device)


def check_bf16_autocast(ctx: Context) -> tuple[str, str]:
    from clip_train.loss import ClipLoss
    from clip_train.train.precision import autocast

    model, cfg = _model(ctx)
    images, tokens = _batch(cfg, 8, ctx.device)
    with torch.no_grad():
        reference = model(images, tokens)
        with autocast("bf16", ctx.device):
            mixed = model(images, tokens)
            probe = model.visual.transformer.resblocks[0].mlp.c_fc(torch.randn(2, cfg.vision.width,
                                                                             device=ctx.device))
    if probe.dtype != torch.bfloat16:
        raise CheckFailed(f"a Linear under autocast gave {probe.dtype}, not bfloat16")
    cosine = min(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min().item()
                 for a, b in zip(reference[:2], mixed[:2]))
    loss = ClipLoss()(mixed[0], mixed[1], mixed[2]).item()
    if not (cosine > 0.99 and math.isfinite(loss)):
        raise CheckFailed(f"bf16 features differ from fp32 (min cosine {cosine:.4f}) or the loss is {loss}")
    return f"features vs fp32: min cosine {cosine:.5f}; loss {loss:.4f}", "in-process"


def check_nccl_group(ctx: Context) -> tuple[str, str]:
    import torch.distributed as dist

    from clip_train.distributed_ops import _all_gather_single, _reduce_scatter_single

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=ctx.device)
    try:
        x = torch.arange(4.0, device=ctx.device)
        dist.all_reduce(x)
        gathered = torch.empty(4, device=ctx.device)
        _all_gather_single(gathered, x)
        scattered = torch.empty(4, device=ctx.device)
        _reduce_scatter_single(scattered, gathered)
        dist.barrier()
        if not (torch.equal(x, torch.arange(4.0, device=ctx.device)) and torch.equal(scattered, x)):
            raise CheckFailed("a one-GPU NCCL collective changed its input")
        version = ".".join(map(str, torch.cuda.nccl.version()))
    finally:
        dist.destroy_process_group()
    return f"all-reduce, all-gather, reduce-scatter, barrier ok (NCCL {version})", "in-process"


def check_sdpa_flash(ctx: Context) -> tuple[str, str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from clip_train.train.precision import autocast

    model, cfg = _model(ctx)
    images, tokens = _batch(cfg, 8, ctx.device)
    # Only the flash kernel allowed: a mask tensor, a wrong layout or an unsupported dtype would raise.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast("bf16", ctx.device):
        image_features, text_features, _ = model(images, tokens)
        (image_features.float().sum() + text_features.float().sum()).backward()
    return "image and text towers (causal) run forward+backward on the flash kernel alone", "in-process"


def check_fused_adamw(ctx: Context) -> tuple[str, str]:
    from clip_train.config import OptimConfig
    from clip_train.train.optim import build_optimizer
    from clip_train.train.step import step_unless_nonfinite

    model, cfg = _model(ctx)
    optimizer = build_optimizer(model, OptimConfig(warmup_steps=1), ctx.device)
    if not optimizer.defaults.get("fused"):
        raise CheckFailed("build_optimizer did not build a fused AdamW")
    images, tokens = _batch(cfg, 4, ctx.device)
    image_features, text_features, _ = model(images, tokens)
    (image_features.sum() + text_features.sum()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    nan = torch.tensor(float("nan"), device=ctx.device)
    step_unless_nonfinite(optimizer, nan, torch.tensor(1.0, device=ctx.device))
    if not all(torch.equal(a, p) for a, p in zip(before, model.parameters())):
        raise CheckFailed("a non-finite loss still changed the parameters")
    step_unless_nonfinite(optimizer, torch.tensor(1.0, device=ctx.device), torch.tensor(1.0, device=ctx.device))
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    if not changed:
        raise CheckFailed("a finite step changed no parameter")
    return f"fused kernel on {ctx.device.type}; non-finite step skipped on the device; {changed} tensors updated", \
        "in-process"


def check_pinned_copies(ctx: Context) -> tuple[str, str]:
    from clip_train.config import DataConfig
    from clip_train.data import build_train_loader

    loader = build_train_loader(DataConfig(train_shards="demo", batch_size=64, num_workers=2), image_size=32)
    images, tokens = next(iter(loader))
    if not (images.is_pinned() and tokens.is_pinned()):
        raise CheckFailed("the loader's batches are not in pinned memory")
    stream = torch.cuda.Stream(ctx.device)
    with torch.cuda.stream(stream):
        on_device = images.to(ctx.device, non_blocking=True)
    stream.synchronize()
    if not torch.equal(on_device.cpu(), images):
        raise CheckFailed("the non-blocking copy differs from the batch")
    loader.close()
    return f"uint8 batch {tuple(images.shape)} pinned; non-blocking copy exact", "in-process"


def check_compile(ctx: Context) -> tuple[str, str]:
    from clip_train.loss import ClipLoss
    from clip_train.train.parallelize import apply_compile
    from clip_train.train.precision import autocast

    model, cfg = _model(ctx)
    images, tokens = _batch(cfg, 16, ctx.device)
    loss_fn = ClipLoss()
    with torch.no_grad(), autocast("bf16", ctx.device):
        eager = loss_fn(*model(images, tokens)).item()
        apply_compile(model)
        began = time.perf_counter()
        compiled = loss_fn(*model(images, tokens)).item()
        first = time.perf_counter() - began
    if not abs(compiled - eager) <= 2e-2 * max(1.0, abs(eager)):
        raise CheckFailed(f"compiled loss {compiled} differs from eager {eager}")
    return f"compiled blocks: loss {compiled:.4f} vs eager {eager:.4f}; first call {first:.1f} s", "in-process"


def check_no_host_sync(ctx: Context) -> tuple[str, str]:
    from omegaconf import OmegaConf

    from clip_train.config import register_configs
    from clip_train.config_source import hydra_config_path
    from clip_train.train import preflight
    from clip_train.train.distributed import DistributedContext
    from clip_train.train.trainer import Trainer

    register_configs()
    if ctx.dry_run:  # the same Trainer and steps on the CPU, without the sync detector (it is CUDA's)
        overrides = ["+experiment=demo", "train.device=cpu", "train.precision=fp32", "data.num_workers=0",
                     "eval.zeroshot=[]", "data.batch_size=8", "data.shuffle_buffer=0"]
    else:
        overrides = ["+experiment=demo", "train.device=cuda", "train.precision=bf16", "data.num_workers=2",
                     "eval.zeroshot=[]", "data.batch_size=64"]
    # The same config source ``python -m clip_train`` reads: the checkout's configs/ or the packaged copy.
    cfg = preflight.job_config(preflight.compose(hydra_config_path(), "train", overrides))
    dctx = DistributedContext(rank=0, local_rank=0, world_size=1, device=ctx.device)
    trainer = Trainer(OmegaConf.to_object(cfg), ctx.scratch / "sync_run", dctx, OmegaConf.to_container(cfg))
    batches = iter(trainer.loader)
    trainer.train_step(*next(batches))  # warm-up: lazy initialisation may sync once
    with contextlib.nullcontext() if ctx.dry_run else _host_syncs_raise():
        for _ in range(3):
            trainer.train_step(*next(batches))
    trainer.timer.collect()
    if ctx.dry_run:
        return "3 steps of Trainer.train_step on the CPU (the sync detector needs CUDA)", "in-process"
    return "3 steps of Trainer.train_step under set_sync_debug_mode('error'): no sync", "in-process"


@contextlib.contextmanager
def _host_syncs_raise() -> Iterator[None]:
    """Inside, any CUDA call that makes the host wait for the device raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def check_training_run(ctx: Context) -> tuple[str, str]:
    from clip_train.train.profiler import memory_snapshot_path, trace_path

    run_dir = ctx.scratch / "cuda_run"
    if ctx.dry_run:  # the same CLI, keys and trace on the CPU at a few steps; the memory snapshot is CUDA's
        first, last = 3, 4
        argv = ["+experiment=demo", "train.device=cpu", "train.precision=fp32", "train.max_steps=4",
                "train.log_every_n_steps=2", "data.num_workers=0", "data.batch_size=16", "data.shuffle_buffer=0",
                "eval.every_n_steps=2", "ckpt.every_n_steps=2"]
    else:
        first, last = 31, 32
        argv = ["+experiment=demo", "train.device=cuda", "train.precision=bf16", "train.max_steps=40",
                "train.log_every_n_steps=10", "data.num_workers=4", "eval.every_n_steps=20",
                "ckpt.every_n_steps=20"]
    argv += ["logger.tensorboard.enabled=true", f"train.profile.steps=[{first},{last}]", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "clip_train", *argv], capture_output=True, text=True, check=False,
                          timeout=max(ctx.seconds_left(), 60))
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in lines if "loss" in m][-1]
    for key in ("forward_backward_s", "optimizer_s", "comm_s", "eval_s", "checkpoint_s", "peak_mem_gib"):
        if key not in final:
            raise CheckFailed(f"metrics.jsonl lacks {key}")
    trace = trace_path(run_dir, first, last, rank=0)
    expected = [trace] if ctx.dry_run else [trace, memory_snapshot_path(run_dir, first, last, rank=0)]
    for path in expected:
        if not path.is_file():
            raise CheckFailed(f"no {path.relative_to(run_dir)}")
    regions = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    missing = sorted({"data", "forward", "loss", "backward", "optimizer"} - regions)
    if missing:
        raise CheckFailed(f"{trace.name} lacks the step regions {missing}")
    written = "trace" if ctx.dry_run else "trace + memory snapshot"
    steps = final["train_s"] / final["step_s"]  # the logging window; the other times are its totals
    per_step = {key: 1e3 * final[key] / steps for key in ("forward_backward_s", "optimizer_s", "data_wait_s")}
    return (f"step {1e3 * final['step_s']:.1f} ms: fwd+bwd {per_step['forward_backward_s']:.1f} ms, "
            f"optimizer {per_step['optimizer_s']:.1f} ms, data wait {per_step['data_wait_s']:.1f} ms; "
            f"peak {final['peak_mem_gib']:.2f} GiB; {written} written"), \
        command_line("clip_train", argv[:-1])


ENTRIES: tuple[Entry, ...] = (
    Entry("bf16_autocast", "bf16 autocast: features vs fp32", check_bf16_autocast, True),
    Entry("nccl_group", "NCCL group of one GPU", check_nccl_group, False),
    Entry("sdpa_flash", "SDPA flash kernel in both towers", check_sdpa_flash, False),
    Entry("fused_adamw", "fused AdamW + on-device skip", check_fused_adamw, True),
    Entry("pinned_copies", "pinned batches, non-blocking copy", check_pinned_copies, False),
    Entry("no_host_sync", "no host sync in Trainer.train_step", check_no_host_sync, True),
    Entry("compile", "train.compile blocks = eager loss", check_compile, False),
    Entry("training_run", "CLI run on the GPU: time keys, trace, memory snapshot", check_training_run, True),
    Entry("train_vit_b16", "ViT-B/16 bf16 B=256 step vs OpenCLIP (MFU)", bench_train_step, True),
    Entry("loss_65536", "loss B=65,536 bf16 vs OpenCLIP", bench_loss, True),
    Entry("data_8_workers", "data pipeline, 8 workers, 224 px", bench_data, True),
    Entry("max_batch", "largest ViT-B/16 bf16 batch per GPU", bench_max_batch, False),
    Entry("train_vit_b16_compile", "ViT-B/16 bf16 B=256 step, torch.compile",
          lambda ctx: bench_train_step(ctx, compile_=True), False),
)


# ------------------------------------------------------------------------------------------------- running


def run_entries(entries: Sequence[Entry], ctx: Context) -> list[Row]:
    rows = []
    for entry in entries:
        if ctx.dry_run and not entry.dry_run_on_cpu:
            rows.append(Row(entry.what, NEEDS_CUDA))
            continue
        if ctx.seconds_left() <= 0:
            rows.append(Row(entry.what, "skipped (time budget spent)"))
            continue
        print(f"[bench.gpu] {entry.name} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            result, command = entry.run(ctx)
            row = Row(entry.what, "ok", result, command)
        except Exception as err:  # noqa: BLE001 -- one failing entry must not hide the others' figures
            row = Row(entry.what, "FAILED", f"{type(err).__name__}: {reason(err)}")
        row.seconds = time.monotonic() - began
        print(f"[bench.gpu] {entry.name}: {row.status} in {row.seconds:.1f} s {row.result}", file=sys.stderr,
              flush=True)
        rows.append(row)
    return rows


def render_table(rows: Sequence[Row], header: dict[str, str]) -> str:
    """The markdown block for docs/benchmarks.md: a header line, then one table row per entry."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"**{header['device']}**, {header['date']}, torch {header['torch']}, `{header['command']}`", "",
             "| entry | status | result | time | command |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        command = f"`{cell(row.command)}`" if row.command and row.command != "in-process" else row.command
        seconds = f"{row.seconds:.0f} s" if row.seconds else ""
        lines.append(f"| {cell(row.name)} | {row.status} | {cell(row.result)} | {seconds} | {command} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clip_train.bench.gpu",
                                     description="Every GPU benchmark and CUDA check, as one markdown table.")
    parser.add_argument("--dry-run", action="store_true", help="check the plumbing on a CPU at tiny sizes")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="stop starting entries after this many seconds (default 450: under 8 minutes)")
    parser.add_argument("--only", default="", help="comma-separated entry names (default: all): "
                        + ",".join(e.name for e in ENTRIES))
    parser.add_argument("--out", default=None, help="also write the table to DIR/bench_gpu.md and rows as JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {e.name for e in ENTRIES})
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {','.join(e.name for e in ENTRIES)}")
    args.entries = [e for e in ENTRIES if not names or e.name in names]
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible: run this on a GPU machine, or pass --dry-run to check the plumbing")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as scratch:
        ctx = Context(args.dry_run, device, Path(scratch), started + args.budget_s)
        rows = run_entries(args.entries, ctx)
    header = {
        "device": "dry run on CPU (figures meaningless)" if args.dry_run else torch.cuda.get_device_name(device),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "command": command_line("clip_train.bench.gpu", argv),
    }
    table = render_table(rows, header) + f"\n\nTotal {time.monotonic() - started:.0f} s."
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_gpu.md").write_text(table + "\n")
        (out / "bench_gpu.json").write_text(json.dumps({"header": header, "rows": [dataclasses.asdict(r) for r in rows]}))
    print(table, flush=True)
    return table


if __name__ == "__main__":
    main()
