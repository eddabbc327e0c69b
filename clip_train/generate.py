"""Caption generation with a CoCa model: greedy decoding and beam search, from Python and the command line.

    from clip_train.generate import generate
    tokens = generate(model, images)                       # beam search, 6 beams (OpenCLIP's default)
    tokens = generate(model, images, method="greedy")
    captions = [tokenizer.decode(row) for row in tokens]

    python -m clip_train.generate --model coca_ViT-B-32 --pretrained coca.pt photo1.jpg photo2.png

Every returned row starts with the start-of-text id, ends with the end-of-text id (a caption that reaches
``max_length`` is closed there) and is padded with the model's pad id to the longest row. The decoder
re-reads the whole prefix at every step (no key/value cache), which is simple and, for captions of a few
dozen tokens, cheap next to the image tower.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from clip_train.errors import first_line
from clip_train.tokenizer import ClipTokenizer

START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407
METHODS = ("greedy", "beam")
DEFAULT_MAX_LENGTH = 30
"""OpenCLIP's default ``seq_len`` for CoCa captions."""
EXIT_BAD_INPUT = 2


def _constrain(log_probs: torch.Tensor, length: int, min_length: int, max_length: int, eot: int) -> torch.Tensor:
    """Forbid the end token before ``min_length`` tokens, and allow only it when the next is the last slot."""
    if length < min_length:
        log_probs[:, eot] = float("-inf")
    if length + 1 >= max_length:
        allowed = log_probs[:, eot].clone()  # min_length < max_length, so the end token is not forbidden here
        log_probs.fill_(float("-inf"))
        log_probs[:, eot] = allowed
    return log_probs


def _next_log_probs(model: torch.nn.Module, image_tokens: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model.caption_logits(image_tokens, prefix)[:, -1].float(), dim=-1)


def _greedy(model, image_tokens, sot, eot, pad, min_length, max_length) -> torch.Tensor:
    batch = image_tokens.shape[0]
    out = torch.full((batch, 1), sot, dtype=torch.long, device=image_tokens.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=out.device)
    while not bool(finished.all()):
        log_probs = _constrain(_next_log_probs(model, image_tokens, out), out.shape[1], min_length, max_length, eot)
        token = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), log_probs.argmax(dim=-1))
        out = torch.cat([out, token[:, None]], dim=1)
        finished |= token == eot
    return out


def _beam_search(model, image_tokens, sot, eot, pad, min_length, max_length, num_beams, length_penalty):
    """Beam search per image: a row stops once it holds ``num_beams`` finished captions (early stopping), whose
    scores are summed log-probabilities divided by ``generated_tokens ** length_penalty``."""
    batch, device = image_tokens.shape[0], image_tokens.device
    beams = image_tokens.repeat_interleave(num_beams, dim=0)
    seqs = torch.full((batch * num_beams, 1), sot, dtype=torch.long, device=device)
    # Only the first beam is live at the start, so the first step does not pick the same token K times.
    scores = torch.full((batch, num_beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    while not all(done):
        length = seqs.shape[1]
        log_probs = _constrain(_next_log_probs(model, beams, seqs), length, min_length, max_length, eot)
        vocab = log_probs.shape[-1]
        candidates = (scores[:, :, None] + log_probs.view(batch, num_beams, vocab)).view(batch, -1)
        top_scores, top_ids = candidates.topk(min(2 * num_beams, candidates.shape[1]), dim=1)
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            chosen: list[tuple[int, int, float]] = []
            if not done[b]:
                for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                    if score == float("-inf") or len(chosen) == num_beams:
                        break
                    beam, token = divmod(flat, vocab)
                    row = b * num_beams + beam
                    if token == eot:
                        if rank < num_beams:  # an ending below the top K would never have been kept
                            caption = seqs[row].tolist() + [eot]
                            finished[b].append((score / ((len(caption) - 1) ** length_penalty), caption))
                    else:
                        chosen.append((row, token, score))
                done[b] = len(finished[b]) >= num_beams or not chosen
            while len(chosen) < num_beams:  # finished rows (or too few live candidates): inert filler beams
                chosen.append((b * num_beams, pad, float("-inf")))
            for row, token, score in chosen:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        seqs = torch.cat([seqs[next_rows], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device).view(batch, num_beams)
    best = [max(hypotheses, key=lambda h: h[0])[1] for hypotheses in finished]
    out = torch.full((batch, max(len(c) for c in best)), pad, dtype=torch.long, device=device)
    for b, caption in enumerate(best):
        out[b, : len(caption)] = torch.tensor(caption, device=device)
    return out


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    method: str = "beam",
    num_beams: int = 6,
    max_length: int | None = None,
    min_length: int = 5,
    length_penalty: float = 1.0,
    sot_token_id: int = START_OF_TEXT_ID,
    eot_token_id: int = END_OF_TEXT_ID,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Caption token ids ``(N, T)`` for normalised images ``(N, 3, H, W)``.

    Args:
        model: a CoCa model (``clip_train.models.coca.CoCa``); it runs in eval mode and is restored after.
        method: ``"beam"`` (beam search with ``num_beams`` beams) or ``"greedy"`` (argmax at every step;
            the same as ``"beam"`` with one beam).
        max_length: most tokens per caption, start and end tokens included; default: OpenCLIP's 30, or the
            decoder's context length if that is shorter.
        min_length: the end token is not allowed before the caption has this many tokens (start included).
        length_penalty: beam search ranks finished captions by summed log-probability divided by their
            generated length to this power (1.0: mean log-probability per token; 0: no normalisation).
        pad_token_id: fills rows after their end token; defaults to the model's pad id.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not hasattr(model, "caption_logits"):
        raise ValueError(f"{type(model).__name__} has no captioning decoder; generation needs a CoCa model")
    decoder_limit = model.text_decoder.context_length
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, decoder_limit)
    if not 2 <= max_length <= decoder_limit:
        raise ValueError(f"max_length must be between 2 and the decoder's context length {decoder_limit}, got {max_length}")
    if min_length >= max_length:
        raise ValueError(f"min_length ({min_length}) must be below max_length ({max_length})")
    if method == "beam" and num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    pad = model.pad_id if pad_token_id is None else pad_token_id
    was_training = model.training
    model.eval()
    try:
        _, image_tokens = model.image_latent_and_tokens(images)
        if method == "greedy":
            return _greedy(model, image_tokens, sot_token_id, eot_token_id, pad, min_length, max_length)
        return _beam_search(model, image_tokens, sot_token_id, eot_token_id, pad, min_length, max_length,
                            num_beams, length_penalty)
    finally:
        model.train(was_training)


def load_images(paths: Sequence[str | Path], image_size: int, preprocessing=None) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)``: each image resized as evaluation does (``preprocessing``: a model's
    ``config.preprocessing``; default the centre square, bicubic)."""
    from clip_train.models.config import ImagePreprocessing
    from clip_train.preprocess import ImageTransform

    transform = ImageTransform(image_size, preprocessing or ImagePreprocessing())
    return torch.stack([transform.pixels(path) for path in paths])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clip_train.generate", description="Caption images with a CoCa model.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to caption")
    parser.add_argument("--model", default=None, help="architecture name (e.g. coca_ViT-B-32); optional for "
                        "clip_train checkpoints, which record it")
    parser.add_argument("--pretrained", required=True,
                        help="weights: an OpenCLIP state dict, a clip_train run dir, checkpoint or weights file")
    parser.add_argument("--method", choices=METHODS, default="beam")
    parser.add_argument("--num-beams", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per caption, start and end included (default 30, or the decoder's context)")
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print ``IMAGE<TAB>caption`` per image; bad input exits 2 with one line on stderr."""
    args = build_parser().parse_args(argv)
    from clip_train.data import normalize_on_device
    from clip_train.load import load_model
    from clip_train.models import CheckpointError

    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} was asked for but no CUDA device is available; use --device cpu")
        model = load_model(args.pretrained, name=args.model, device=args.device)
        if not hasattr(model, "caption_logits"):
            raise ValueError(f"{args.pretrained} holds a contrastive-only model ({model.config.name}); captions "
                             "need a CoCa model (e.g. --model coca_ViT-B-32)")
        preprocessing = model.config.preprocessing
        images = normalize_on_device(load_images(args.images, model.image_size, preprocessing).to(args.device),
                                     mean=preprocessing.mean, std=preprocessing.std)
        tokens = generate(model, images, method=args.method, num_beams=args.num_beams, max_length=args.max_length,
                          min_length=args.min_length)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        print(f"clip_train.generate: error: {first_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    tokenizer = ClipTokenizer()
    for path, row in zip(args.images, tokens):
        print(f"{path}\t{tokenizer.decode(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
