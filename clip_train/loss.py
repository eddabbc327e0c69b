"""Contrastive losses over the global batch: CLIP's InfoNCE and SigLIP's pairwise sigmoid loss, and CoCa's
InfoNCE plus captioning loss.

Both losses take each rank's *local*, L2-normalised features and do their own cross-rank exchange when
``torch.distributed`` is initialised with more than one rank, so the trainer calls them the same way on a
laptop and on 512 GPUs.

**Scaling convention (both losses).** Let ``L`` be the loss one process would compute on the whole global
batch of ``N = W * b`` pairs (``W`` ranks with ``b`` pairs each), and ``L_r`` rank ``r``'s share of it
(``sum_r L_r = L``): the terms of its own rows and columns. Every rank returns a tensor whose

- *value* is ``L`` itself, the same on every rank (one scalar all-reduce; no host sync), and whose
- *gradient* is that of ``W * L_r``: after DDP *averages* the parameter gradients over ranks they equal
  ``dL/dθ``, i.e. one process on the whole global batch (``tests/test_loss.py`` checks this with two and
  three gloo processes).

The factor ``W`` is what compensates DDP's averaging: every cross-rank gradient term reaches the rank that
owns the features through the all-gather's reduce-scatter backward (or the ring's gradient pass) and is
*summed* there.

**Memory.** ``implementation="tiled"`` (the default) never holds the ``b x N`` logits: it walks
``tile_size x tile_size`` blocks with an online log-sum-exp (Inf-CL, Lin et al. 2024) and recomputes each
block in backward, so memory is O((b + N) * D + tile_size**2). ``implementation="exact"`` builds the
logits matrix and calls ``cross_entropy``; it is the readable reference and fine for small batches.

**Precision.** Features may arrive in bf16/fp16 (autocast). Both losses disable autocast internally and
compute logits, soft-max statistics and gradient sums in float32 (float64 stays float64), then return
feature gradients in the features' own dtype.

Nothing here calls ``.item()`` or otherwise waits for the device: tile loops use only tensor shapes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clip_train.distributed_ops import (
    ProcessGroup,
    all_gather_with_grad,
    ring_send_recv,
    wait_all,
    world_info,
)

DEFAULT_TILE_SIZE = 4096
"""Tile edge for the tiled losses. 4096 keeps one fp32 tile at 64 MiB while the per-tile matmul is large
enough to run near peak on CPU; see docs/benchmarks.md for the measurements behind it."""

IMPLEMENTATIONS = ("tiled", "exact")

# Tags keep the two rings of the SigLIP backward (features forward, gradient accumulators behind them)
# apart on backends that match point-to-point messages by tag (gloo). NCCL orders them per stream.
_TAG_FEATURES = 17
_TAG_GRADIENTS = 18


# ----------------------------------------------------------------------------------------------- helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Soft-max statistics need float32 at least; float64 inputs (tests) keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast would run our matmuls in bf16 and round logits to 3 significant digits; switch it off."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support: nothing to disable
        return contextlib.nullcontext()


def _spans(length: int, size: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` spans of at most ``size`` covering ``range(length)``."""
    for start in range(0, length, size):
        yield start, min(start + size, length)


def _as_tensor(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Accept a Python float for the scale/bias (e.g. a frozen temperature) as well as a 0-d tensor."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(float(value), dtype=_compute_dtype(like.dtype), device=like.device)


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "expected image and text features of the same shape (local_batch, dim), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def _with_global_value(local_share: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``local_share`` (this rank's ``W * L_r``) with its value replaced by the mean over ranks, ``L``.

    The correction term is detached, so gradients still flow through ``local_share`` alone: the returned
    value is what users log, the gradient is what DDP's averaging needs.
    """
    world, _ = world_info(group)
    if world == 1:
        return local_share
    global_value = local_share.detach().clone()
    dist.all_reduce(global_value, group=group)
    return local_share + (global_value / world - local_share.detach())


class _TileScratch:
    """Reusable flat buffers, viewed as ``rows x cols`` per tile, so the tile loops allocate nothing.

    Sized for the largest tile that actually occurs, so a small batch does not pay for a large
    ``tile_size``.
    """

    def __init__(self, tile: int, n_rows: int, n_cols: int, like: torch.Tensor, count: int = 2) -> None:
        numel = min(tile, n_rows) * min(tile, n_cols)
        self.buffers = [like.new_empty(numel) for _ in range(count)]

    def views(self, rows: int, cols: int) -> list[torch.Tensor]:
        n = rows * cols
        return [buffer[:n].view(rows, cols) for buffer in self.buffers]


# ------------------------------------------------------------------------------------ InfoNCE (CLIP), tiled


def _infonce_statistics(
    rows_scaled: torch.Tensor, cols: torch.Tensor, tile: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the logits ``rows_scaled @ cols.T``, tile by tile.

    Returns the log-sum-exp of every row (complete: each row sees all columns) and, for every column, the
    running maximum and the sum of ``exp(logit - maximum)`` over *these* rows only (partial when the rows
    are one rank's share; ranks merge them afterwards).
    """
    n_rows, n_cols = rows_scaled.shape[0], cols.shape[0]
    row_lse = rows_scaled.new_empty(n_rows)
    col_max = rows_scaled.new_full((n_cols,), -math.inf)
    col_sum = rows_scaled.new_zeros(n_cols)
    scratch = _TileScratch(tile, n_rows, n_cols, rows_scaled)
    for r0, r1 in _spans(n_rows, tile):
        block = rows_scaled[r0:r1]
        run_max = block.new_full((r1 - r0,), -math.inf)
        run_sum = block.new_zeros(r1 - r0)
        for c0, c1 in _spans(n_cols, tile):
            logits, expd = scratch.views(r1 - r0, c1 - c0)
            torch.mm(block, cols[c0:c1].T, out=logits)
            # Row direction: online log-sum-exp. Shifting by the *new* maximum makes the tile's sum
            # directly addable once the old sum is rescaled (exp(-inf) = 0 handles the first tile).
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            torch.sub(logits, new_max[:, None], out=expd).exp_()
            run_sum.mul_(torch.exp(run_max - new_max)).add_(expd.sum(dim=1))
            run_max = new_max
            # Column direction: the same recurrence on this tile's slice of the column statistics. A
            # separate exp (rather than reusing the row-shifted one) keeps it exact when a column's
            # values sit far below the tile's maximum, where a shared shift would underflow in fp32.
            old_cmax = col_max[c0:c1]
            new_cmax = torch.maximum(old_cmax, logits.amax(dim=0))
            torch.sub(logits, new_cmax[None, :], out=expd).exp_()
            col_sum[c0:c1].mul_(torch.exp(old_cmax - new_cmax)).add_(expd.sum(dim=0))
            col_max[c0:c1] = new_cmax
        row_lse[r0:r1] = run_max + run_sum.log()
    return row_lse, col_max, col_sum


def _infonce_gradient_sums(
    rows_scaled: torch.Tensor,
    cols: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    diag_offset: int,
    tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G @ cols, G.T @ rows_scaled)`` with ``G = softmax_rows + softmax_cols - 2 * I`` (tile by tile).

    ``G`` is, up to the factor ``1 / (2 b)``, the gradient of the symmetric loss with respect to the logits;
    row ``i`` of ``rows_scaled`` is the positive of column ``i + diag_offset``.
    """
    n_rows, n_cols = rows_scaled.shape[0], cols.shape[0]
    g_rows = torch.zeros_like(rows_scaled)
    g_cols = torch.zeros_like(cols)
    scratch = _TileScratch(tile, n_rows, n_cols, rows_scaled)
    for r0, r1 in _spans(n_rows, tile):
        block = rows_scaled[r0:r1]
        for c0, c1 in _spans(n_cols, tile):
            logits, probs = scratch.views(r1 - r0, c1 - c0)
            torch.mm(block, cols[c0:c1].T, out=logits)  # recomputed: cheaper than storing b x N
            torch.sub(logits, row_lse[r0:r1, None], out=probs).exp_()
            torch.sub(logits, col_lse[None, c0:c1], out=logits).exp_()
            probs.add_(logits)
            k = diag_offset + r0 - c0  # the positives lie on this diagonal of the tile (col - row = k)
            if -(r1 - r0) < k < (c1 - c0):
                probs.diagonal(k).sub_(2.0)
            g_rows[r0:r1].addmm_(probs, cols[c0:c1])
            g_cols[c0:c1].addmm_(probs.T, block)
    return g_rows, g_cols


class _TiledInfoNCE(torch.autograd.Function):
    """Symmetric InfoNCE of this rank's rows and columns, never materialising the logits.

    Inputs: local images ``(b, D)``, *all* texts ``(N, D)`` (gathered, rank ``r``'s at ``row_offset``), the
    exp'ed scale. Only the texts are gathered: the text->image direction needs each column's log-sum-exp
    over all images, and each rank contributes the partial statistics of its own images, merged with two
    all-reduces of ``N`` floats instead of gathering ``N x D`` image features.

    The backward returns the gradient of this rank's *slab* of the global loss: complete for the local
    images, partial (this rank's rows) for every text and for the scale. Summed over ranks (the gather's
    reduce-scatter for texts, DDP for the scale) these are exactly ``W * dL``; see the module docstring.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        image: torch.Tensor,
        text_all: torch.Tensor,
        scale: torch.Tensor,
        row_offset: int,
        tile: int,
        group: ProcessGroup | None,
    ) -> torch.Tensor:
        world, _ = world_info(group)
        local = image.shape[0]
        dtype = _compute_dtype(image.dtype)
        with torch.no_grad(), _no_autocast(image.device):
            # Folding the scale into the b x D rows costs one multiply per feature, not one per logit.
            rows_scaled = image.to(dtype) * scale.to(dtype)
            cols = text_all.to(dtype)
            row_lse, col_max, col_sum = _infonce_statistics(rows_scaled, cols, tile)
            if world > 1:
                global_max = col_max.clone()
                dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
                col_sum.mul_(torch.exp(col_max - global_max))
                dist.all_reduce(col_sum, op=dist.ReduceOp.SUM, group=group)
                col_max = global_max
            col_lse = col_max + col_sum.log()
            positives = (rows_scaled * cols[row_offset : row_offset + local]).sum(dim=1)
            own_cols = col_lse[row_offset : row_offset + local]
            loss = (row_lse.sum() + own_cols.sum() - 2.0 * positives.sum()) / (2 * local)
        ctx.save_for_backward(image, text_all, scale, row_lse, col_lse)
        ctx.row_offset, ctx.tile = row_offset, tile
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        image, text_all, scale, row_lse, col_lse = ctx.saved_tensors
        dtype = row_lse.dtype
        with torch.no_grad(), _no_autocast(image.device):
            s = scale.to(dtype)
            img = image.to(dtype)
            rows_scaled = img * s
            g_img, g_txt = _infonce_gradient_sums(
                rows_scaled, text_all.to(dtype), row_lse, col_lse, ctx.row_offset, ctx.tile
            )
            coef = grad_loss.to(dtype) / (2 * image.shape[0])
            d_image = (g_img * (coef * s)).to(image.dtype) if ctx.needs_input_grad[0] else None
            d_text = (g_txt * coef).to(text_all.dtype) if ctx.needs_input_grad[1] else None
            # d loss / d scale = sum_ij dlogit_ij * <img_i, txt_j> = sum_i <img_i, (G @ txt)_i> * coef.
            d_scale = (coef * (img * g_img).sum()).to(scale.dtype) if ctx.needs_input_grad[2] else None
        return d_image, d_text, d_scale, None, None, None


def _exact_clip_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, group: ProcessGroup | None
) -> torch.Tensor:
    """Reference InfoNCE: gather both modalities with gradients, materialise ``b x N`` logits twice."""
    _, rank = world_info(group)
    dtype = _compute_dtype(image.dtype)
    local = image.shape[0]
    with _no_autocast(image.device):
        all_images = all_gather_with_grad(image, group).to(dtype)
        all_texts = all_gather_with_grad(text, group).to(dtype)
        s = scale.to(dtype)
        logits_per_image = s * image.to(dtype) @ all_texts.T
        logits_per_text = s * text.to(dtype) @ all_images.T
        targets = torch.arange(local, device=image.device) + rank * local
        return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE over the global batch (image->text and text->image cross-entropy).

    Args:
        tile_size: edge of the logit tiles of the tiled implementation (memory ~ ``3 * tile_size**2``
            floats); ignored by ``"exact"``.
        implementation: ``"tiled"`` (default; O(B) memory, custom backward) or ``"exact"`` (materialised
            logits; the reference). Both return the same value and gradients.
        group: process group to gather over (default: the world when distributed is initialised).

    Call it as ``loss_fn(image_features, text_features, logit_scale)`` with this rank's L2-normalised
    features of shape ``(b, D)`` (same ``b`` on every rank) and the exp'ed temperature as a 0-d tensor (or
    float). Returns a 0-d float32 tensor (float64 for float64 inputs) holding the global loss, the same on
    every rank; its gradient is this rank's share scaled by the world size, so DDP-averaged gradients equal
    single-process gradients on the global batch (see the module docstring).
    """

    def __init__(
        self,
        tile_size: int = DEFAULT_TILE_SIZE,
        implementation: str = "tiled",
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.tile_size = tile_size
        self.implementation = implementation
        self.group = group

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        """The loss of this rank's pairs against the global batch (see the class docstring)."""
        _check_features(image_features, text_features)
        scale = _as_tensor(logit_scale, image_features)
        if self.implementation == "exact":
            share = _exact_clip_loss(image_features, text_features, scale, self.group)
        else:
            _, rank = world_info(self.group)
            all_texts = all_gather_with_grad(text_features, self.group)
            offset = rank * image_features.shape[0]
            share = _TiledInfoNCE.apply(image_features, all_texts, scale, offset, self.tile_size, self.group)
        return _with_global_value(share, self.group)

    def extra_repr(self) -> str:
        return f"implementation={self.implementation!r}, tile_size={self.tile_size}"


# ----------------------------------------------------------------------------------------------- SigLIP


def _siglip_block_loss(
    rows_scaled: torch.Tensor, cols: torch.Tensor, bias: torch.Tensor, diag_offset: int | None, tile: int
) -> torch.Tensor:
    """``sum_ij -log sigmoid(z_ij * logit_ij)`` over ``rows_scaled @ cols.T + bias``, tile by tile.

    ``z_ij = +1`` for the positives (row ``i`` with column ``i + diag_offset``; none when ``diag_offset`` is
    ``None``) and ``-1`` elsewhere. Every pair is first scored as a negative, ``softplus(logit)``, then the
    positives are corrected with ``softplus(-x) = softplus(x) - x``, so the tiles need no label mask.
    """
    n_rows, n_cols = rows_scaled.shape[0], cols.shape[0]
    total = rows_scaled.new_zeros(())
    scratch = _TileScratch(tile, n_rows, n_cols, rows_scaled, count=1)
    for r0, r1 in _spans(n_rows, tile):
        for c0, c1 in _spans(n_cols, tile):
            (block,) = scratch.views(r1 - r0, c1 - c0)
            torch.mm(rows_scaled[r0:r1], cols[c0:c1].T, out=block).add_(bias)
            # softplus(x) = -logsigmoid(-x); logsigmoid is exact everywhere (F.softplus linearises x > 20).
            total -= F.logsigmoid(block.neg_()).sum()
    if diag_offset is not None:
        positives = (rows_scaled * cols[diag_offset : diag_offset + n_rows]).sum(dim=1) + bias
        total -= positives.sum()
    return total


def _siglip_block_gradient_sums(
    rows_scaled: torch.Tensor,
    cols: torch.Tensor,
    bias: torch.Tensor,
    diag_offset: int | None,
    tile: int,
    g_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate ``G @ cols`` into ``g_rows``; return ``(G.T @ rows_scaled, G.sum())``.

    ``G = sigmoid(logits) - I_positives`` is the gradient of the block's loss sum with respect to its logits.
    """
    n_rows, n_cols = rows_scaled.shape[0], cols.shape[0]
    g_cols = torch.zeros_like(cols)
    g_sum = rows_scaled.new_zeros(())
    scratch = _TileScratch(tile, n_rows, n_cols, rows_scaled, count=1)
    for r0, r1 in _spans(n_rows, tile):
        block = rows_scaled[r0:r1]
        for c0, c1 in _spans(n_cols, tile):
            (probs,) = scratch.views(r1 - r0, c1 - c0)
            torch.mm(block, cols[c0:c1].T, out=probs).add_(bias).sigmoid_()
            if diag_offset is not None:
                k = diag_offset + r0 - c0
                if -(r1 - r0) < k < (c1 - c0):
                    probs.diagonal(k).sub_(1.0)
            g_sum += probs.sum()
            g_rows[r0:r1].addmm_(probs, cols[c0:c1])
            g_cols[c0:c1].addmm_(probs.T, block)
    return g_cols, g_sum


class _RingSigLip(torch.autograd.Function):
    """SigLIP of the local images against every rank's texts, visited around a ring.

    Forward: at step ``k`` rank ``r`` holds the texts of rank ``r - k`` and scores its images against them
    while the chunk moves on to rank ``r + 1`` (communication overlaps compute). The positives are all in
    step 0 (its own texts).

    Backward: the chunks travel the same ring again, each followed by a gradient accumulator: a rank adds
    its contribution for the chunk it holds and passes the sum on, so after ``W`` hops every accumulator
    arrives home holding the full gradient of that rank's texts. The accumulator of step ``k`` is in
    flight while step ``k + 1`` computes.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        tile: int,
        group: ProcessGroup | None,
    ) -> torch.Tensor:
        world, _ = world_info(group)
        dtype = _compute_dtype(image.dtype)
        with torch.no_grad(), _no_autocast(image.device):
            rows_scaled = image.to(dtype) * scale.to(dtype)
            b = bias.to(dtype)
            chunk = text.contiguous()  # travels in its own dtype: bf16 halves the traffic
            total = rows_scaled.new_zeros(())
            for step in range(world):
                works, incoming = None, None
                if step < world - 1:
                    incoming = torch.empty_like(chunk)
                    works = ring_send_recv(chunk, incoming, group, tag=_TAG_FEATURES)
                total += _siglip_block_loss(rows_scaled, chunk.to(dtype), b, 0 if step == 0 else None, tile)
                wait_all(works)
                if incoming is not None:
                    chunk = incoming
            loss = total / image.shape[0]
        ctx.save_for_backward(image, text, scale, bias)
        ctx.tile, ctx.group = tile, group
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        image, text, scale, bias = ctx.saved_tensors
        group = ctx.group
        world, _ = world_info(group)
        dtype = _compute_dtype(image.dtype)
        with torch.no_grad(), _no_autocast(image.device):
            s = scale.to(dtype)
            img = image.to(dtype)
            rows_scaled = img * s
            b = bias.to(dtype)
            g_img = torch.zeros_like(rows_scaled)
            g_sum = rows_scaled.new_zeros(())
            chunk = text.contiguous()
            acc_out = acc_in = acc_works = None
            for step in range(world):
                chunk_works, incoming = None, None
                if step < world - 1:
                    incoming = torch.empty_like(chunk)
                    chunk_works = ring_send_recv(chunk, incoming, group, tag=_TAG_FEATURES)
                g_chunk, g_block_sum = _siglip_block_gradient_sums(
                    rows_scaled, chunk.to(dtype), b, 0 if step == 0 else None, ctx.tile, g_img
                )
                g_sum += g_block_sum
                if step > 0:  # add what the ranks before us contributed to this chunk
                    wait_all(acc_works)
                    g_chunk += acc_in
                if world > 1:
                    acc_out, acc_in = g_chunk, torch.empty_like(g_chunk)
                    acc_works = ring_send_recv(acc_out, acc_in, group, tag=_TAG_GRADIENTS)
                wait_all(chunk_works)
                if incoming is not None:
                    chunk = incoming
            if world > 1:
                wait_all(acc_works)  # the last hop brings our own texts' gradient home
                g_txt = acc_in
            else:
                g_txt = g_chunk
            del acc_out
            coef = grad_loss.to(dtype) / image.shape[0]
            d_image = (g_img * (coef * s)).to(image.dtype) if ctx.needs_input_grad[0] else None
            d_text = (g_txt * coef).to(text.dtype) if ctx.needs_input_grad[1] else None
            d_scale = (coef * (img * g_img).sum()).to(scale.dtype) if ctx.needs_input_grad[2] else None
            d_bias = (coef * g_sum).to(bias.dtype) if ctx.needs_input_grad[3] else None
        return d_image, d_text, d_scale, d_bias, None, None


def _exact_siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    group: ProcessGroup | None,
) -> torch.Tensor:
    """Reference SigLIP: gather the texts with gradients and materialise the ``b x N`` logits."""
    _, rank = world_info(group)
    dtype = _compute_dtype(image.dtype)
    local = image.shape[0]
    with _no_autocast(image.device):
        all_texts = all_gather_with_grad(text, group).to(dtype)
        logits = scale.to(dtype) * image.to(dtype) @ all_texts.T + bias.to(dtype)
        signs = -torch.ones_like(logits)
        idx = torch.arange(local, device=logits.device)
        signs[idx, idx + rank * local] = 1.0
        return -F.logsigmoid(signs * logits).sum() / local


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) over the global batch.

    ``L = -(1/N) sum_{i,j} log sigmoid(z_ij (t * <img_i, txt_j> + b))`` with ``z_ij = 1`` for matching pairs
    and ``-1`` otherwise, ``N`` the global batch: every image is scored against every text, summed, and
    divided by the number of images, as in the paper. The model owns the learnable temperature and bias:
    ``logit_scale`` initialised to ``ln 10`` and passed here exp'ed (so 10 at init), and ``logit_bias``
    initialised to ``-10`` and passed as is (:attr:`init_logit_scale`, :attr:`init_logit_bias`).

    Args:
        tile_size: tile edge of the tiled implementation (memory ~ ``tile_size**2`` floats).
        implementation: ``"tiled"`` (default; texts visit every rank around a ring, logits never held
            whole) or ``"exact"`` (all-gather and materialised logits; the reference).
        group: process group (default: the world when distributed is initialised).

    Call it as ``loss_fn(image_features, text_features, logit_scale, logit_bias)``. Returns, like :class:`ClipLoss`,
    the global loss ``L`` on every rank, with the gradient of ``(1/b) * sum`` over this rank's images and
    all texts, so DDP-averaged gradients equal the single-process gradient on the global batch.
    """

    init_logit_scale: float = math.log(10.0)
    """Initial value of the model's ``logit_scale`` parameter (the loss receives its exp)."""
    init_logit_bias: float = -10.0
    """Initial value of the model's ``logit_bias`` parameter."""

    def __init__(
        self,
        tile_size: int = DEFAULT_TILE_SIZE,
        implementation: str = "tiled",
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.tile_size = tile_size
        self.implementation = implementation
        self.group = group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float,
    ) -> torch.Tensor:
        """The loss of this rank's images against the global batch of texts (see the class docstring)."""
        _check_features(image_features, text_features)
        scale = _as_tensor(logit_scale, image_features)
        bias = _as_tensor(logit_bias, image_features)
        if self.implementation == "exact":
            share = _exact_siglip_loss(image_features, text_features, scale, bias, self.group)
        else:
            share = _RingSigLip.apply(image_features, text_features, scale, bias, self.tile_size, self.group)
        return _with_global_value(share, self.group)

    def extra_repr(self) -> str:
        return f"implementation={self.implementation!r}, tile_size={self.tile_size}"


# ----------------------------------------------------------------------------------------------- CoCa


class CocaLoss(nn.Module):
    """CoCa's objective: ``clip_loss_weight * InfoNCE + caption_loss_weight * captioning cross-entropy``.

    The contrastive term is :class:`ClipLoss` over the global batch (local features in, gathered inside,
    same scaling convention). The captioning term is the mean next-token cross-entropy of this rank's
    captions, padding (``pad_id``) ignored, computed in float32; its value is averaged over ranks (so every
    rank reports the same number) while its gradient stays local, so DDP's averaging gives the gradient
    of that mean. OpenCLIP's training defaults are ``caption_loss_weight=2.0``, ``clip_loss_weight=1.0``;
    a zero ``clip_loss_weight`` skips the contrastive term altogether (captioning only).

    Call it as ``loss_fn(image_features, text_features, logit_scale, caption_logits, caption_labels)`` with
    the logits ``(b, L, vocab)`` the decoder predicted and the ids ``(b, L)`` they should predict (the
    caption shifted by one); ``terms(...)`` takes the same arguments and returns both terms, weighted.
    After each call ``last_terms`` holds both terms (detached), which the trainer logs.
    """

    def __init__(
        self,
        caption_loss_weight: float = 2.0,
        clip_loss_weight: float = 1.0,
        pad_id: int = 0,
        tile_size: int = DEFAULT_TILE_SIZE,
        implementation: str = "tiled",
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.caption_loss_weight = caption_loss_weight
        self.clip_loss_weight = clip_loss_weight
        self.pad_id = pad_id
        self.group = group
        self.contrastive = ClipLoss(tile_size=tile_size, implementation=implementation, group=group)
        self.last_terms: dict[str, torch.Tensor] = {}

    def terms(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        caption_logits: torch.Tensor,
        caption_labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``{"contrastive_loss": ..., "caption_loss": ...}``, each already multiplied by its weight."""
        if caption_logits.shape[:2] != caption_labels.shape:
            raise ValueError(
                f"caption logits {tuple(caption_logits.shape)} do not match labels {tuple(caption_labels.shape)}: "
                "expected (batch, length, vocab) and (batch, length)"
            )
        with _no_autocast(caption_logits.device):
            logits = caption_logits.to(_compute_dtype(caption_logits.dtype))
            caption = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), caption_labels.reshape(-1), ignore_index=self.pad_id
            )
        caption = _with_global_value(caption, self.group) * self.caption_loss_weight
        if self.clip_loss_weight:
            contrastive = self.contrastive(image_features, text_features, logit_scale) * self.clip_loss_weight
        else:
            contrastive = torch.zeros((), dtype=caption.dtype, device=caption.device)
        return {"contrastive_loss": contrastive, "caption_loss": caption}

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        caption_logits: torch.Tensor,
        caption_labels: torch.Tensor,
    ) -> torch.Tensor:
        """The weighted sum of both terms (see the class docstring)."""
        terms = self.terms(image_features, text_features, logit_scale, caption_logits, caption_labels)
        self.last_terms = {name: value.detach() for name, value in terms.items()}  # for logging; no host sync
        return terms["contrastive_loss"] + terms["caption_loss"]

    def extra_repr(self) -> str:
        return (
            f"caption_loss_weight={self.caption_loss_weight}, clip_loss_weight={self.clip_loss_weight}, "
            f"pad_id={self.pad_id}"
        )
