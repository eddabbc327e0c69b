"""Bad samples do not make the global batches depend on the topology: a bad position holds a copy of the sample
at the next good position of the global order (decoded with that position's own crop), so 1 rank and 2 ranks,
0 and 2 workers, give tensor-equal global batches and the same skip count (issue 16)."""

from __future__ import annotations

import os

import pytest
import torch
from data_helpers import good_sample, write_tar

from clip_train.data import DataConfig, build_train_loader
from clip_train.data.manifest import write_manifest
from clip_train.tokenizer import get_tokenizer

SIZES = [21, 14, 18, 13]  # 66 samples: 4 global batches of 16 and 2 positions left over
GLOBAL_BATCH = 16
BATCHES = sum(SIZES) // GLOBAL_BATCH
SHAPES = [(1, 0), (1, 2), (2, 0), (2, 2)]  # (ranks, workers)
TOKENIZER = get_tokenizer(context_length=16)


def _bad(key: str) -> dict[str, bytes]:
    return {"__key__": key, "png": b"<html>404 not found</html>", "txt": b"an undecodable image"}


def _write(folder, bad: set[int] = frozenset()) -> str:
    """Shards of SIZES good samples numbered 0..65 (captions "sample N"), those in ``bad`` undecodable."""
    os.makedirs(folder, exist_ok=True)
    entries, index = [], 0
    for s, size in enumerate(SIZES):
        samples = [_bad(f"{i:06d}") if i in bad else good_sample(i) for i in range(index, index + size)]
        index += size
        path = os.path.join(folder, f"{s:05d}.tar")
        write_tar(path, samples)
        entries.append((os.path.basename(path), size, os.path.getsize(path)))
    write_manifest(str(folder), entries)  # the counts of the clean shards, also for a shard cut short later
    return os.path.join(str(folder), f"{{00000..{len(SIZES) - 1:05d}}}.tar")


def _epoch(pattern: str, world_size: int, workers: int, streams: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Epoch 0's global batches, every rank's slices in rank order (images, tokens), and the skips of all ranks."""
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(BATCHES)]
    skipped = 0
    for rank in range(world_size):
        cfg = DataConfig(train_shards=pattern, batch_size=GLOBAL_BATCH // world_size, num_workers=workers,
                         resampled=False, shuffle_buffer=8, shuffle_shards=2, order_streams=streams)
        loader = build_train_loader(cfg, 16, TOKENIZER, rank=rank, world_size=world_size, seed=3)
        for b, (images, tokens) in enumerate(loader):
            parts[b].append((images, tokens))
        skipped += loader.skipped_samples
        loader.close()
    images = torch.cat([torch.cat([p[0] for p in batch]) for batch in parts])
    tokens = torch.cat([torch.cat([p[1] for p in batch]) for batch in parts])
    return images, tokens, skipped


def _indices(tokens: torch.Tensor) -> list[int]:
    """The sample number in each slot (captions "sample N")."""
    return [int(TOKENIZER.decode(row.tolist()).replace(" ", "").removeprefix("sample")) for row in tokens]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[list[int], int]:
    """The sample number at each position of the clean epoch, and where block 1 (of two shards each) starts."""
    _, tokens, skipped = _epoch(_write(tmp_path_factory.mktemp("clean")), 1, 0)
    assert skipped == 0
    order = _indices(tokens)
    shard_of = [s for s, size in enumerate(SIZES) for _ in range(size)]
    first_two = list(dict.fromkeys(shard_of[i] for i in order))[:2]
    block_end = SIZES[first_two[0]] + SIZES[first_two[1]]
    assert [shard_of[i] in first_two for i in order] == [p < block_end for p in range(len(order))]
    assert 24 < block_end < BATCHES * GLOBAL_BATCH - 8  # block 1 holds positions of the last batches
    return order, block_end


def _same_at_every_shape(pattern: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    reference = _epoch(pattern, 1, 0)
    assert reference[0].shape == (BATCHES * GLOBAL_BATCH, 3, 16, 16)  # full batches
    for world_size, workers in SHAPES[1:]:
        images, tokens, skipped = _epoch(pattern, world_size, workers)
        assert torch.equal(images, reference[0]), f"images differ at {world_size} ranks x {workers} workers"
        assert torch.equal(tokens, reference[1]), f"captions differ at {world_size} ranks x {workers} workers"
        assert skipped == reference[2], f"skip count differs at {world_size} ranks x {workers} workers"
    return reference


def _assert_filled_from_the_next_good_position(images, tokens, bad: set[int]) -> None:
    held = _indices(tokens)
    for p in range(len(held)):
        q = min(q for q in range(p, len(held)) if q not in bad)
        assert held[p] == held[q] and torch.equal(images[p], images[q]), f"position {p} is not a copy of {q}"
        if p not in bad:
            assert held.count(held[p]) == 1 + sum(1 for b in bad if held[b] == held[p])


@pytest.mark.parametrize("where", ["in slices and across their edges", "at the end of a block"])
def test_undecodable_images_give_the_same_batches_and_skips_at_every_shape(tmp_path, clean, where):
    """Two adjacent bad positions on the edge of the 2-rank slices (7 | 8), one ending a global batch (its
    copy comes from the next batch, another worker's at 2 workers), a pair inside a slice; or the last two
    positions of block 0, whose copy is the first sample of block 1."""
    order, block_end = clean
    positions = {3, 7, 8, 15, 20, 21} if where.startswith("in") else {block_end - 2, block_end - 1}
    pattern = _write(tmp_path / "shards", bad={order[p] for p in positions})
    images, tokens, skipped = _same_at_every_shape(pattern)
    assert skipped == len(positions)
    _assert_filled_from_the_next_good_position(images, tokens, positions)
    clean_held = order[:BATCHES * GLOBAL_BATCH]
    assert [h for p, h in enumerate(_indices(tokens)) if p not in positions] == \
        [h for p, h in enumerate(clean_held) if p not in positions]  # the good positions are untouched


def test_a_tar_cut_short_gives_the_same_batches_and_skips_at_every_shape(tmp_path, clean):
    """Shard cut inside the image of its 4th sample from the end: that sample is bad, the 3 after it are not
    delivered, so block 0's last 3 positions are bad and take the first sample of block 1. Counted: the bad
    sample and the read error that cut the shard (once, whoever reads it)."""
    import tarfile

    order, block_end = clean
    shard = next(s for s, size in enumerate(SIZES) if sum(SIZES[:s]) <= order[0] < sum(SIZES[:s + 1]))
    pattern = _write(tmp_path / "shards")
    path = pattern.replace(f"{{00000..{len(SIZES) - 1:05d}}}", f"{shard:05d}")
    with tarfile.open(path) as tar:
        image = [m for m in tar.getmembers() if m.name.endswith(".png")][-4]
    with open(path, "r+b") as f:
        f.truncate(image.offset_data + image.size // 2)
    images, tokens, skipped = _same_at_every_shape(pattern)
    assert skipped == 2
    held = _indices(tokens)
    lost = {sum(SIZES[:shard]) + SIZES[shard] - k for k in range(1, 5)}  # the cut sample and the 3 after it
    assert not lost & set(held)
    bad = {p for p in range(len(held)) if p + 1 < len(held) and held[p] == held[p + 1]}
    assert len(bad) == 4 and {block_end - 3, block_end - 2, block_end - 1} <= bad
    _assert_filled_from_the_next_good_position(images, tokens, bad)
    assert order.index(held[block_end - 1]) >= block_end  # filled from block 1


def test_with_parallel_streams_bad_samples_give_the_same_batches_and_skips_at_every_shape(tmp_path, clean):
    """data.order_streams=4: each batch takes 4 positions from each of 4 segments of the epoch's order; a bad
    sample's copy still comes from the next good position of the order, whoever reads it."""
    order, _ = clean
    streams_ref = _epoch(_write(tmp_path / "clean"), 1, 0, streams=4)
    held = _indices(streams_ref[1])
    bad = {held[p] for p in (0, 3, 4, 13, 14)}  # a stream's first position, the edge between two streams
    pattern = _write(tmp_path / "bad", bad=bad)
    reference = _epoch(pattern, 1, 0, streams=4)
    assert reference[2] == len(bad)
    for world_size, workers in SHAPES[1:]:
        images, tokens, skipped = _epoch(pattern, world_size, workers, streams=4)
        assert torch.equal(images, reference[0]) and torch.equal(tokens, reference[1]), (world_size, workers)
        assert skipped == reference[2]
    assert _indices(reference[1]) != order[:BATCHES * GLOBAL_BATCH]  # the streams are another order
