"""Benchmark of the training stall per checkpoint: a synchronous save against ``ckpt.async_save``.

    python -m clip_train.bench.checkpoint [--model ViT-B-16] [--rounds 3] [--device cpu|cuda]
        [--dir DIR] [--out runs.jsonl]

The state is what the trainer checkpoints for the model: its weights and AdamW's state after one optimizer
step (random gradients, so both moments exist for every parameter), built with ``create_model`` and the
trainer's ``build_optimizer``, plus a step counter. Each round times, alternately:

- sync: ``write_checkpoint`` as the trainer calls it without ``ckpt.async_save`` (torch.save, fsync,
  SHA-256 manifest, rename, ``latest``): the training step waits for all of it;
- async: what training waits for with ``ckpt.async_save=true``, as the trainer does it: ``HostSnapshot.take``
  (everything but the weights and moments) and starting the background thread, then one real training
  step (forward and backward of ``--batch`` random images and captions with ``ClipLoss``) during which the
  thread copies the weights and moments, and the wait for that copy before the optimizer step. The
  background write is timed to its end (waited for before the next round, as the next save would), and
  the same training step is timed again with no write in flight, which shows what the background thread
  costs the step's compute where cores are few (``forward_backward_during_write_s`` against
  ``forward_backward_alone_s``).

The stall is ``take`` + ``submit`` + the copy wait. The first async round also allocates the host buffers (later saves reuse them), so it is reported apart
(``async_first_stall_s``); ``async_stall_s`` is the median of the later rounds. Checkpoints go to a fresh
temporary directory (``--dir``, default the system's temporary directory: put it on the disk that would hold
real checkpoints, not a tmpfs), removed at the end. One progress line per save, then a final JSON line
(also appended to ``--out``) with the machine, the date and the command; ``meets_target`` says whether the
async stall is at most 15% of the sync save.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from clip_train.bench import command_line
from clip_train.bench.loss import emit_report, machine_info
from clip_train.config import OptimConfig
from clip_train.loss import ClipLoss
from clip_train.models import create_model
from clip_train.tokenizer import get_tokenizer
from clip_train.train import checkpoint as ckpt_io
from clip_train.train.optim import build_optimizer

TARGET_RATIO = 0.15  # issue 16: the async stall is at most 15% of the synchronous save


class TrainingRun:
    """A model and AdamW after one optimizer step (random gradients, so both moments exist for every
    parameter), and a fixed batch for the steps between saves."""

    def __init__(self, model_name: str, device: torch.device, batch: int) -> None:
        torch.manual_seed(0)
        self.model = create_model(model_name, device=device)
        self.optimizer = build_optimizer(self.model, OptimConfig(), device)
        for parameter in self.model.parameters():
            parameter.grad = torch.randn_like(parameter) * 1e-3
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        size = self.model.image_size
        size = size if isinstance(size, int) else size[0]
        self.images = torch.randn(batch, 3, size, size, device=device)
        self.tokens = get_tokenizer(context_length=self.model.context_length)([f"caption {i}" for i in range(batch)]).to(device)
        self.loss = ClipLoss()

    def state(self) -> dict:
        """The model's part of a trainer checkpoint: weights, AdamW state, a step counter."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "train_state": {"step": 1}}

    def update_storages(self) -> set[int]:
        """What only the optimizer step changes (the trainer defers copying these, see HostSnapshot)."""
        found = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        return found | {v.untyped_storage().data_ptr() for s in self.optimizer.state.values()
                        for v in s.values() if isinstance(v, torch.Tensor)}

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        image_features, text_features, scale = self.model(self.images, self.tokens)
        self.loss(image_features, text_features, scale).backward()


def state_bytes(state: dict) -> int:
    seen: dict[int, int] = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(state)
    return sum(seen.values())


def measure(run: TrainingRun, root: Path, rounds: int) -> dict:
    """Alternate sync and async saves under ``root``; the seconds of each, and of the step between."""
    snapshot, writer = ckpt_io.HostSnapshot(), ckpt_io.BackgroundWriter()
    times: dict[str, list[float]] = {"sync_s": [], "async_stall_s": [], "async_copy_wait_s": [],
                                     "async_write_s": [], "forward_backward_s": [], "forward_backward_alone_s": []}
    for round_index in range(rounds):
        step = round_index + 1
        start = time.perf_counter()
        ckpt_io.write_checkpoint(root / "sync", step, run.state())
        times["sync_s"].append(time.perf_counter() - start)
        ckpt_io.prune_checkpoints(root / "sync", keep_last=1)
        print(f"[bench.checkpoint] round {step}: sync save {times['sync_s'][-1]:.2f} s", flush=True)

        # As the trainer does: the step pays for take() and submit(); the next step's forward and
        # backward run while the writer copies the weights and moments, and its optimizer step waits
        # for that copy; the write goes on in the background.
        start = time.perf_counter()
        host = snapshot.take(run.state(), run.update_storages())

        def write(host=host, step=step) -> Path:
            snapshot.complete()
            return ckpt_io.write_checkpoint(root / "async", step, host)

        writer.submit(ckpt_io.SaveTiming(step, block_s=0.0), write)
        blocked = time.perf_counter() - start
        start = time.perf_counter()
        run.forward_backward()
        times["forward_backward_s"].append(time.perf_counter() - start)
        copy_wait = snapshot.wait_copied()
        run.optimizer.step()
        times["async_stall_s"].append(blocked + copy_wait)
        times["async_copy_wait_s"].append(copy_wait)
        times["async_write_s"].append(writer.wait().write_s)
        ckpt_io.prune_checkpoints(root / "async", keep_last=1)
        # The same step with no write in flight: what the background thread costs the step's compute.
        start = time.perf_counter()
        run.forward_backward()
        times["forward_backward_alone_s"].append(time.perf_counter() - start)
        run.optimizer.step()
        print(f"[bench.checkpoint] round {step}: async stall {times['async_stall_s'][-1]:.3f} s (of which "
              f"{copy_wait:.3f} s waiting for the copy before the optimizer step), background write "
              f"{times['async_write_s'][-1]:.2f} s, forward+backward {times['forward_backward_s'][-1]:.2f} s "
              f"during it, {times['forward_backward_alone_s'][-1]:.2f} s alone",
              flush=True)
    return times


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    device = torch.device(args.device)
    run = TrainingRun(args.model, device, args.batch)
    parent = Path(args.dir) if args.dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=parent))
    try:
        times = measure(run, root, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sync = statistics.median(times["sync_s"])
    steady = times["async_stall_s"][1:] or times["async_stall_s"]
    stall = statistics.median(steady)
    report = {
        "bench": "checkpoint",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line("clip_train.bench.checkpoint", argv),
        "model": args.model,
        "device": args.device,
        "batch": args.batch,
        "state_bytes": state_bytes(run.state()),
        "rounds": args.rounds,
        "dir": str(parent or Path(tempfile.gettempdir())),
        "sync_stall_s": round(sync, 6),
        "async_stall_s": round(stall, 6),
        "async_first_stall_s": round(times["async_stall_s"][0], 6),
        "async_write_s": round(statistics.median(times["async_write_s"]), 6),
        "forward_backward_during_write_s": round(statistics.median(times["forward_backward_s"]), 6),
        "forward_backward_alone_s": round(statistics.median(times["forward_backward_alone_s"]), 6),
        "stall_ratio": round(stall / sync, 6),
        "target_ratio": TARGET_RATIO,
        "meets_target": stall <= TARGET_RATIO * sync,
        "all_s": {key: [round(v, 6) for v in values] for key, values in times.items()},
        "machine": machine_info(args.device),
    }
    emit_report(report, args.out)
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m clip_train.bench.checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="a create_model name")
    parser.add_argument("--rounds", type=int, default=3, help="sync and async saves each (at least 2)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=4, help="batch of the training step between saves")
    parser.add_argument("--dir", default=None, help="where the temporary checkpoints go (a local disk)")
    parser.add_argument("--out", default=None, help="append the final JSON line to this file")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the first async save also allocates its host buffers")
    return run(args, argv)


if __name__ == "__main__":
    main()
