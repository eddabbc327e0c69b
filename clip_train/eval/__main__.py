"""``python -m clip_train.eval {zeroshot,retrieval,linear-probe} --checkpoint PATH ...``

Each task prints a progress bar on stderr and, as its last line on stdout, one JSON object with the
results (also written to ``--output FILE`` when given). Bad input exits with status 2 and a one-line error.
Zero-shot and retrieval also run under ``torchrun --nproc_per_node=N -m clip_train.eval ...`` (or srun):
each rank reads its share of the set, and rank 0 prints the combined result.

    python -m clip_train.eval zeroshot --checkpoint outputs/run --data /data/imagenet/val \\
        --classnames imagenet --templates openai
    python -m clip_train.eval retrieval --checkpoint outputs/run --data '/data/coco/test-{0000..0004}.tar'
    python -m clip_train.eval linear-probe --checkpoint outputs/run --train-data DIR --test-data DIR
    python -m clip_train.eval zeroshot --checkpoint outputs/run --data demo     # the built-in digits
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from clip_train.errors import first_line

EXIT_BAD_INPUT = 2


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _counted(batches: Iterable, bar) -> Iterator:
    """Pass ``(images, ...)`` batches through, advancing ``bar`` by each batch's image count."""
    for batch in batches:
        bar.update(len(batch[0]))
        yield batch


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


class _Context:
    """The model, tokenizer and input pipeline every task shares."""

    def __init__(self, args: argparse.Namespace) -> None:
        from clip_train.data import normalize_on_device
        from clip_train.load import load_model
        from clip_train.tokenizer import get_model_tokenizer
        from clip_train.train.precision import autocast

        self.args = args
        self.rank, self.world_size = args.rank, args.world_size
        self.device = args.dist_device or _device(args.device)
        self.model = load_model(args.checkpoint, name=args.model, device=self.device)
        self.tokenizer = get_model_tokenizer(self.model.config, args.tokenizer)
        self.image_size = self.model.image_size
        self.preprocessing = self.model.config.preprocessing  # the model's mean/std, resize and interpolation
        mean, std = self.preprocessing.mean, self.preprocessing.std
        self.autocast: Callable = lambda: autocast(args.precision, self.device)
        self.preprocess: Callable[[torch.Tensor], torch.Tensor] = (
            lambda images: normalize_on_device(images.to(self.device, non_blocking=True), mean=mean, std=std)
        )

    def header(self, task: str) -> dict:
        return {"task": task, "checkpoint": str(self.args.checkpoint), "model": self.model.config.name,
                "device": str(self.device), "precision": self.args.precision, "world_size": self.world_size}

    def progress(self, total: int | None, desc: str):
        """Rank 0's bar, over rank 0's share of the set."""
        share = -(-total // self.world_size) if total else None
        return _progress(share, desc, self.rank == 0 and not self.args.no_progress)


def run_zeroshot(args: argparse.Namespace) -> dict:
    from clip_train.eval.data import ClassificationSpec, LabelledImages
    from clip_train.eval.imagefolder import imagefolder_classes, is_imagefolder
    from clip_train.eval.templates import load_classnames, load_templates
    from clip_train.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier

    spec = ClassificationSpec(args.data, args.classnames, args.templates).resolved()
    templates = load_templates(spec.templates)
    if spec.classnames is not None:
        classnames = load_classnames(spec.classnames)
    elif is_imagefolder(spec.data):  # an ImageFolder names its classes: "golden_retriever" -> "golden retriever"
        classnames = [name.replace("_", " ") for name in imagefolder_classes(spec.data)]
    else:
        from clip_train.data.sources import resolve_sources

        resolve_sources(spec.data, "--data")  # data that is not there is the first thing to report
        raise ValueError("--classnames FILE is required for shards (one class name per line, line i names class i)")
    ctx = _Context(args)
    # An ImageFolder's folders are matched to the class names (by name, or by position when none is a name).
    data = LabelledImages(spec.data, ctx.image_size, args.batch_size, class_key=args.class_key, rank=ctx.rank,
                          world_size=ctx.world_size, num_workers=args.num_workers, max_samples=args.max_samples,
                          classnames=classnames, classnames_source=f"--classnames {spec.classnames}",
                          preprocessing=ctx.preprocessing)
    with ctx.autocast():
        classifier = zeroshot_classifier(ctx.model, ctx.tokenizer, classnames, templates, ctx.device)
        with ctx.progress(data.total_samples, "zero-shot") as bar:
            scores = zeroshot_accuracy(ctx.model, classifier, _counted(data, bar), ctx.preprocess, ctx.device)
    if scores["samples"] == 0:
        raise ValueError(f"no labelled samples in {spec.data} (shards need an integer '{args.class_key}' field)")
    per_class = {name: (acc if n else None)
                 for name, acc, n in zip(classnames, scores["per_class_top1"], scores["per_class_samples"])}
    scored = [acc for acc in per_class.values() if acc is not None]
    return {
        **ctx.header("zeroshot"), "data": spec.data, "classes": len(classnames), "templates": len(templates),
        "samples": scores["samples"], "top1": scores["top1"], "top5": scores["top5"],
        "mean_per_class_top1": sum(scored) / len(scored),
        "per_class_top1": per_class,
        "per_class_samples": dict(zip(classnames, scores["per_class_samples"])),
    }


def run_retrieval(args: argparse.Namespace) -> dict:
    from clip_train.eval.data import CaptionedImages
    from clip_train.eval.retrieval import embed_captioned, retrieval_recall

    ctx = _Context(args)
    data = CaptionedImages(args.data, ctx.image_size, args.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                           num_workers=args.num_workers, image_key=args.image_key, text_key=args.text_key,
                           preprocessing=ctx.preprocessing)
    with ctx.autocast(), ctx.progress(data.total_samples, "retrieval") as bar:
        images, texts, owner = embed_captioned(ctx.model, ctx.tokenizer, data, ctx.preprocess, ctx.device,
                                               progress=bar.update)
    if len(images) == 0:
        raise ValueError(f"no usable image-caption samples in {args.data} (image key {args.image_key!r}, "
                         f"text key {args.text_key!r})")
    recalls = retrieval_recall(images, texts, owner, ks=args.k)
    return {**ctx.header("retrieval"), "data": args.data, "images": len(images), "texts": len(texts), **recalls}


def run_linear_probe(args: argparse.Namespace) -> dict:
    import numpy as np

    from clip_train.eval.data import ClassificationSpec, LabelledImages
    from clip_train.eval.imagefolder import imagefolder_classes, is_imagefolder
    from clip_train.eval.linear_probe import image_features, linear_probe, stratified_split

    if args.world_size > 1:
        raise ValueError("linear-probe runs in one process (the fit is not distributed); start it without torchrun")
    if (args.test_data is None) == (args.test_fraction is None):
        raise ValueError("give either --test-data DIR_OR_SHARDS or --test-fraction F (a split of --train-data)")
    classnames, classnames_source = None, "--classnames"
    train_root = ClassificationSpec(args.train_data).resolved().data
    if args.classnames:
        from clip_train.eval.templates import load_classnames

        classnames_file = ClassificationSpec(args.train_data, args.classnames).resolved().classnames
        classnames, classnames_source = load_classnames(classnames_file), f"--classnames {classnames_file}"
    elif is_imagefolder(train_root):
        # The training folders name the classes of both sets, so a test set that lacks a class folder is
        # refused instead of having every later folder's labels shifted by one.
        classnames = imagefolder_classes(train_root)
        classnames_source = f"--train-data {args.train_data} (its class folders)"
    ctx = _Context(args)

    def features(where: str, desc: str, may_omit_classes: bool = False):
        # ImageFolder labels follow ``classnames`` (folders matched by name), in both sets alike.
        data = LabelledImages(ClassificationSpec(where).resolved().data, ctx.image_size, args.batch_size,
                              class_key=args.class_key, num_workers=args.num_workers, max_samples=args.max_samples,
                              classnames=classnames, classnames_source=classnames_source,
                              may_omit_classes=may_omit_classes, preprocessing=ctx.preprocessing)
        with ctx.autocast(), _progress(data.total_samples, desc, not args.no_progress) as bar:
            return image_features(ctx.model, data, ctx.preprocess, progress=bar.update)

    train_x, train_y = features(args.train_data, "features (train)")
    if args.test_data is not None:
        test_x, test_y = features(args.test_data, "features (test)", may_omit_classes=True)
    else:
        train_idx, test_idx = stratified_split(train_y, args.test_fraction, args.seed)
        train_x, train_y, test_x, test_y = train_x[train_idx], train_y[train_idx], train_x[test_idx], train_y[test_idx]
    result = linear_probe(train_x, train_y, test_x, test_y, num_classes=len(classnames) if classnames else None,
                          val_fraction=args.val_fraction, seed=args.seed, max_iter=args.max_iter)
    names = classnames or [str(i) for i in range(len(result["per_class_top1"]))]
    result["per_class_top1"] = dict(zip(names, result["per_class_top1"]))
    result["per_class_samples"] = dict(zip(names, result["per_class_samples"]))
    return {**ctx.header("linear-probe"), "train_data": args.train_data,
            "test_data": args.test_data or f"{args.test_fraction:g} of train_data", "feature_dim": int(np.shape(train_x)[1]),
            **result}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clip_train.eval", description="Evaluate a CLIP model.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    tasks = parser.add_subparsers(dest="task", required=True, metavar="{zeroshot,retrieval,linear-probe}")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--checkpoint", required=True,
                         help="run dir, checkpoints dir, step dir, state.pt, weights file, or HF/OpenCLIP export dir")
        sub.add_argument("--model", default=None, help="architecture name, for weights files that do not record it")
        sub.add_argument("--tokenizer", default=None,
                         help="hf:PATH, a local Hugging Face tokenizer, for models whose text tower needs one")
        sub.add_argument("--batch-size", type=int, default=256)
        sub.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
        sub.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
        sub.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
        sub.add_argument("--output", default=None, help="also write the JSON result to this file")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")

    zs = tasks.add_parser("zeroshot", help="prompt-ensembled zero-shot classification (top-1/top-5, per class)")
    common(zs)
    zs.add_argument("--data", required=True,
                    help="ImageFolder root, shards (pattern or a folder of .tar) with a class field, or 'demo'")
    zs.add_argument("--classnames", default=None,
                    help="file: one class name per line (or JSON 'classnames'), or 'imagenet' (built in); "
                         "ImageFolder folders are matched to them by name (default: the folder names)")
    zs.add_argument("--templates", default=None,
                    help="openai (80 prompts; the default), simple (7), or a file with {} or {c} "
                         "(data=demo: the demo's own)")
    zs.add_argument("--class-key", default="cls", help="shards: the sample field holding the class index")
    zs.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many images")
    zs.set_defaults(run=run_zeroshot)

    rt = tasks.add_parser("retrieval", help="image->text and text->image recall@K on image-caption shards")
    common(rt)
    rt.add_argument("--data", required=True, help="shards; each text field holds one caption per line (or a JSON list)")
    rt.add_argument("--image-key", default="jpg;png;jpeg;webp")
    rt.add_argument("--text-key", default="txt")
    rt.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="recall cut-offs")
    rt.set_defaults(run=run_retrieval)

    lp = tasks.add_parser("linear-probe", help="logistic regression on frozen image features")
    common(lp)
    lp.add_argument("--train-data", required=True, help="ImageFolder root, shards with a class field, or 'demo'")
    lp.add_argument("--test-data", default=None, help="held-out set (or use --test-fraction)")
    lp.add_argument("--test-fraction", type=float, default=None, help="hold out this fraction of --train-data")
    lp.add_argument("--classnames", default=None, help="optional: names for the per-class results")
    lp.add_argument("--class-key", default="cls")
    lp.add_argument("--val-fraction", type=float, default=0.2, help="of the training features, to choose C")
    lp.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations")
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--max-samples", type=int, default=None, help="use at most this many images per set")
    lp.set_defaults(run=run_linear_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one task. Under ``torchrun`` every rank scores its share and rank 0 prints the result."""
    args = build_parser().parse_args(argv)
    from clip_train.models import CheckpointError
    from clip_train.train.distributed import init_distributed, launch_env, shutdown

    start = time.perf_counter()
    args.rank, args.world_size, args.dist_device = 0, 1, None
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if launch_env().world_size > 1:  # torchrun, or an srun step with one task per rank
            if args.device not in ("auto", "cpu", "cuda"):
                raise ValueError(f"under torchrun --device is auto, cpu or cuda (each rank takes its own GPU), "
                                 f"not {args.device!r}")
            dist_ctx = init_distributed(args.device)
            args.rank, args.world_size, args.dist_device = dist_ctx.rank, dist_ctx.world_size, dist_ctx.device
        result = args.run(args)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        print(f"clip_train.eval {args.task}: error: {first_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        shutdown()
    if args.rank != 0:
        return 0
    result["seconds"] = round(time.perf_counter() - start, 2)
    if args.output:
        Path(args.output).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).expanduser().write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
