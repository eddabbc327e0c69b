"""The contrastive losses: tiled == exact == a written-out reference, and DDP equivalence across ranks.

The distributed tests start real gloo process groups: this file re-runs itself as a worker script
(``python tests/test_loss.py --worker ...``) so no extra helper module is needed, and each launch has a
timeout so a collective that hangs fails the test instead of blocking CI.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_train.loss import ClipLoss, SigLipLoss

# --------------------------------------------------------------------------------- written-out references


def reference_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE spelled out pair by pair: no cross_entropy, no gather, no tiles."""
    logits = scale * image @ text.T
    n = logits.shape[0]
    image_to_text = torch.stack([torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(n)]).mean()
    text_to_image = torch.stack([torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(n)]).mean()
    return (image_to_text + text_to_image) / 2


def reference_siglip_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP as in the paper: -sum_ij log sigmoid(z_ij * (t <x_i, y_j> + b)) / N, z = +1 on the diagonal."""
    n = image.shape[0]
    total = image.new_zeros(())
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale * image[i] @ text[j] + bias))
    return total / n


def unit_features(n: int, dim: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=1)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# -------------------------------------------------------------------------------- single-process behaviour

TILES = [1, 3, 4, 7, 13, 64]  # 13 = B (one tile), 64 > B, the others do not divide B


@pytest.mark.parametrize("implementation,tile", [("exact", 0)] + [("tiled", t) for t in TILES])
def test_clip_loss_matches_reference_value_and_gradients(implementation: str, tile: int) -> None:
    image, text = leaf(unit_features(13, 8, seed=1)), leaf(unit_features(13, 8, seed=2))
    scale = torch.tensor(17.0, dtype=torch.float64, requires_grad=True)
    expected = reference_clip_loss(image, text, scale)
    expected_grads = torch.autograd.grad(expected, (image, text, scale))

    loss = ClipLoss(tile_size=max(tile, 1), implementation=implementation)(image, text, scale)
    grads = torch.autograd.grad(loss, (image, text, scale))

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("implementation,tile", [("exact", 0)] + [("tiled", t) for t in TILES])
def test_siglip_loss_matches_reference_value_and_gradients(implementation: str, tile: int) -> None:
    image, text = leaf(unit_features(13, 8, seed=3)), leaf(unit_features(13, 8, seed=4))
    # Make a few pairs similar so positives and negatives both carry weight.
    with torch.no_grad():
        text[:5] = F.normalize(image[:5] + 0.3 * text[:5], dim=1)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    expected = reference_siglip_loss(image, text, scale, bias)
    expected_grads = torch.autograd.grad(expected, (image, text, scale, bias))

    loss = SigLipLoss(tile_size=max(tile, 1), implementation=implementation)(image, text, scale, bias)
    grads = torch.autograd.grad(loss, (image, text, scale, bias))

    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_has_the_textbook_value_for_perfect_alignment() -> None:
    """Guards the reference itself: orthogonal matching pairs give log(1 + (n-1) e^-s) in both directions."""
    n, s = 4, 5.0
    eye = torch.eye(n, dtype=torch.float64)
    expected = math.log(1 + (n - 1) * math.exp(-s))
    assert reference_clip_loss(eye, eye, torch.tensor(s, dtype=torch.float64)).item() == pytest.approx(
        expected
    )
    assert ClipLoss(tile_size=3)(eye, eye, s).item() == pytest.approx(expected, rel=1e-12)


def test_tiled_float32_stays_exact_with_extreme_logits() -> None:
    """At scale 100 some columns sit ~150 below a tile's maximum: a shared exp shift would underflow."""
    n, dim = 48, 16
    image = unit_features(n, dim, dtype=torch.float32, seed=5)
    # Half the texts point away from every image, so their columns peak far below the tile maximum.
    text = torch.cat([image[: n // 2], -image[n // 2 :]])
    text = F.normalize(text + 0.05 * unit_features(n, dim, dtype=torch.float32, seed=6), dim=1)
    scale = torch.tensor(100.0)
    expected = reference_clip_loss(image.double(), text.double(), scale.double())
    image32, text32 = leaf(image), leaf(text)
    loss = ClipLoss(tile_size=16)(image32, text32, scale)
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(image32.grad).all() and torch.isfinite(text32.grad).all()


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_bf16_features_close_to_fp32_and_keep_their_dtype(loss_name: str) -> None:
    image, text = unit_features(64, 32, torch.float32, seed=7), unit_features(64, 32, torch.float32, seed=8)
    with torch.no_grad():
        text[:32] = F.normalize(image[:32] + 0.5 * text[:32], dim=1)
    scale, bias = torch.tensor(30.0), torch.tensor(-10.0)

    def run(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img, txt = leaf(image.to(dtype)), leaf(text.to(dtype))
        if loss_name == "clip":
            loss = ClipLoss(tile_size=24)(img, txt, scale)
        else:
            loss = SigLipLoss(tile_size=24)(img, txt, scale, bias)
        loss.backward()
        return loss, img.grad, txt.grad

    loss32, gi32, gt32 = run(torch.float32)
    loss16, gi16, gt16 = run(torch.bfloat16)
    assert loss16.dtype == torch.float32  # statistics in float32, not bf16
    assert gi16.dtype == torch.bfloat16 and gt16.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits of each feature; at scale 30 that moves the loss by ~1%.
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)
    for got, want in ((gi16, gi32), (gt16, gt32)):
        assert F.cosine_similarity(got.float().flatten(), want.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("implementation", ["tiled", "exact"])
def test_autocast_does_not_lower_the_loss_precision(implementation: str) -> None:
    image, text = unit_features(32, 16, torch.float32, seed=9), unit_features(32, 16, torch.float32, seed=10)
    scale = torch.tensor(50.0)
    plain = ClipLoss(tile_size=8, implementation=implementation)(image, text, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = ClipLoss(tile_size=8, implementation=implementation)(image, text, scale)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)


def test_no_host_synchronisation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward never read a tensor value on the host (``.item()``, ``bool``, ``float``...)."""
    image, text = leaf(unit_features(10, 4, seed=11)), leaf(unit_features(10, 4, seed=12))
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)

    def sync(*args: object, **kwargs: object) -> None:
        raise AssertionError("host synchronisation inside the loss")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    losses = [
        ClipLoss(tile_size=3)(image, text, scale),
        ClipLoss(implementation="exact")(image, text, scale),
        SigLipLoss(tile_size=3)(image, text, scale, bias),
    ]
    torch.autograd.backward(losses)
    monkeypatch.undo()
    assert image.grad is not None and scale.grad is not None and bias.grad is not None


def test_frozen_scale_and_python_floats() -> None:
    image, text = leaf(unit_features(6, 4, seed=13)), leaf(unit_features(6, 4, seed=14))
    from_float = ClipLoss(tile_size=4)(image, text, 20.0)
    from_tensor = ClipLoss(tile_size=4)(image, text, torch.tensor(20.0, dtype=torch.float64))
    torch.testing.assert_close(from_float, from_tensor)
    from_float.backward()
    assert image.grad is not None
    siglip = SigLipLoss(tile_size=4)(image.detach(), text.detach(), 10.0, -10.0)
    assert siglip.requires_grad is False and torch.isfinite(siglip)


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="implementation"):
        ClipLoss(implementation="fast")
    with pytest.raises(ValueError, match="tile_size"):
        SigLipLoss(tile_size=0)
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(torch.zeros(4, 8), torch.zeros(5, 8), 1.0)


def test_siglip_documents_the_paper_initialisation() -> None:
    assert SigLipLoss.init_logit_scale == pytest.approx(math.log(10.0))
    assert SigLipLoss.init_logit_bias == -10.0


def test_tiled_loss_never_holds_the_logits_matrix(tmp_path: Path) -> None:
    """B = 12,288: the logits matrix alone is 576 MiB in fp32; the tiled loss must stay far below."""
    script = (
        "import resource, torch, torch.nn.functional as F\n"
        "from clip_train.loss import ClipLoss\n"
        "torch.set_num_threads(1)\n"
        "img = F.normalize(torch.randn(12288, 8), dim=1).requires_grad_()\n"
        "txt = F.normalize(torch.randn(12288, 8), dim=1).requires_grad_()\n"
        "ClipLoss(tile_size=256)(img[:512], txt[:512], 10.0).backward()  # warm up allocator and kernels\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "ClipLoss(tile_size=512)(img, txt, torch.tensor(10.0)).backward()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    peak_growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert peak_growth_mib < 64, f"peak RSS grew by {peak_growth_mib:.0f} MiB"


# --------------------------------------------------------------------------------------- distributed (gloo)

GLOBAL_BATCH = 10  # odd local batch of 5 per rank at world 2; 10 does not split evenly over 3 ranks
IN_DIM, EMBED_DIM = 6, 4
DIST_CASES = {
    "clip_tiled": lambda: (ClipLoss(tile_size=3, implementation="tiled"), False),
    "clip_exact": lambda: (ClipLoss(implementation="exact"), False),
    "siglip_tiled": lambda: (SigLipLoss(tile_size=2, implementation="tiled"), True),
    "siglip_exact": lambda: (SigLipLoss(implementation="exact"), True),
}


class TinyClip(nn.Module):
    """Two linear towers and the learnable temperature (and SigLIP bias): enough to test DDP equivalence."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(42)
        self.image_proj = nn.Linear(IN_DIM, EMBED_DIM, dtype=torch.float64)
        self.text_proj = nn.Linear(IN_DIM, EMBED_DIM, dtype=torch.float64)
        with torch.no_grad():
            for p in (*self.image_proj.parameters(), *self.text_proj.parameters()):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64)) if with_bias else None

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = F.normalize(self.image_proj(images), dim=1)
        text = F.normalize(self.text_proj(texts), dim=1)
        return image, text, self.logit_scale.exp()


def dist_inputs(global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(global_batch, IN_DIM, generator=generator, dtype=torch.float64)
    texts = images + 0.7 * torch.randn(global_batch, IN_DIM, generator=generator, dtype=torch.float64)
    return images, texts


def single_process_reference(case: str, global_batch: int) -> tuple[float, dict[str, torch.Tensor]]:
    with_bias = case.startswith("siglip")
    model = TinyClip(with_bias)
    image, text, scale = model(*dist_inputs(global_batch))
    if with_bias:
        loss = reference_siglip_loss(image, text, scale, model.logit_bias)
    else:
        loss = reference_clip_loss(image, text, scale)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: its slice of the batch through a DDP-wrapped TinyClip, every loss case, grads saved."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from clip_train.train.distributed import shutdown

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    local = GLOBAL_BATCH // world
    global_batch = local * world
    images, texts = dist_inputs(global_batch)
    rows = slice(rank * local, (rank + 1) * local)
    results = {}
    for case, make in DIST_CASES.items():
        loss_fn, with_bias = make()
        model = TinyClip(with_bias)
        ddp = DistributedDataParallel(model)
        image, text, scale = ddp(images[rows], texts[rows])
        loss = loss_fn(image, text, scale, model.logit_bias) if with_bias else loss_fn(image, text, scale)
        loss.backward()
        results[case] = {
            "loss": loss.item(),
            "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
        }
        dist.barrier()
    torch.save({"global_batch": global_batch, "results": results}, out)
    shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_gradients_equal_one_process_on_the_global_batch(world: int, tmp_path: Path) -> None:
    """World 2 has an odd local batch; world 3 sends the SigLIP ring through more than one hop."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(rank),
                str(world),
                str(port),
                str(tmp_path / f"{rank}.pt"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:  # a hung collective must fail the test, not leave processes behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(logs)

    outputs = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    global_batch = outputs[0]["global_batch"]
    for case in DIST_CASES:
        expected_loss, expected_grads = single_process_reference(case, global_batch)
        per_rank = [out["results"][case] for out in outputs]
        # Every rank returns the global loss ...
        for rank_result in per_rank:
            assert rank_result["loss"] == pytest.approx(expected_loss, rel=1e-12), case
        # ... and DDP-averaged gradients (identical on every rank) equal one process on the whole batch.
        for rank_result in per_rank:
            for name, want in expected_grads.items():
                torch.testing.assert_close(
                    rank_result["grads"][name], want, rtol=1e-9, atol=1e-12, msg=case + name
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="distributed worker for tests/test_loss.py")
    parser.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "PORT", "OUT"), required=True)
    rank_, world_, port_, out_ = parser.parse_args().worker
    _worker(int(rank_), int(world_), int(port_), out_)
