"""The train loader: worker/rank splitting, epoch lengths, deterministic order, exact resume."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from itertools import islice

import pytest
import torch
from data_helpers import bomb_png, cut_tar, good_sample

from clip_train.data import DataConfig, build_train_loader


def config(pattern, **kw) -> DataConfig:
    base = {"train_shards": pattern, "batch_size": 3, "num_workers": 2, "shuffle_buffer": 8, "shuffle_shards": 2}
    base.update(kw)
    return DataConfig(**base)


def take(loader, n):
    """The next ``n`` batches, continuing into following epochs when an epoch ends."""
    out = []
    while len(out) < n:
        before = len(out)
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
        assert len(out) > before, "loader yielded nothing"
    return out


def test_batches_are_uint8_images_and_token_rows(make_shards, tokenizer):
    pattern, _ = make_shards([6, 6])
    loader = build_train_loader(config(pattern, num_workers=0), 16, tokenizer)
    images, tokens = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)
    assert tokens.dtype == torch.long and tokens.shape == (3, tokenizer.context_length)


def test_epoch_mode_splits_shards_over_ranks_and_workers_without_duplicates(make_shards, tokenizer, captions_of):
    pattern, captions = make_shards([12, 12, 12, 12])
    seen = []
    for rank in range(2):
        loader = build_train_loader(config(pattern, resampled=False), 16, tokenizer, rank=rank, world_size=2)
        assert len(loader) == 8  # 48 samples / (2 ranks x 3)
        for _, tokens in loader:
            seen += captions_of(tokens)
    assert Counter(seen) == Counter(captions)  # every sample exactly once across 2 ranks x 2 workers


@pytest.mark.parametrize("sizes", [[7, 13, 5, 11, 9], [23, 17]], ids=["uneven", "fewer_shards_than_workers"])
def test_epoch_mode_never_repeats_a_sample_with_uneven_shards(make_shards, tokenizer, captions_of, sizes):
    # The shuffled shards are cut into one run per worker that covers its batch quota: no worker pads
    # from another's shards, so an epoch of clean data has no sample twice (the remainder is dropped).
    pattern, captions = make_shards(sizes)
    seen = []
    for rank in range(2):
        loader = build_train_loader(config(pattern, resampled=False, batch_size=4), 16, tokenizer,
                                    rank=rank, world_size=2)
        for epoch in range(2):
            batches = [captions_of(tokens) for _, tokens in loader]
            assert len(batches) == len(loader) == sum(sizes) // 8
            if epoch == 0:
                seen += [c for batch in batches for c in batch]
    repeated = [c for c, n in Counter(seen).items() if n > 1]
    assert not repeated, f"seen twice in one epoch: {repeated}"
    assert len(seen) == sum(sizes) // 8 * 8 and set(seen) <= set(captions)


def test_epoch_mode_gives_every_rank_the_same_number_of_batches(make_shards, tokenizer):
    pattern, _ = make_shards([7, 13, 5, 11, 9])  # 45 samples in uneven shards
    counts = []
    for rank in range(2):
        loader = build_train_loader(config(pattern, resampled=False, batch_size=4), 16, tokenizer,
                                    rank=rank, world_size=2)
        per_epoch = [sum(1 for _ in loader) for _ in range(2)]
        counts.append(per_epoch)
        assert loader.epoch == 1
    assert counts[0] == counts[1] == [45 // 8, 45 // 8]


def test_epoch_mode_without_manifest_uses_epoch_samples(make_shards, tokenizer):
    pattern, _ = make_shards([6, 6], manifest=False)
    with pytest.raises(ValueError, match="epoch_samples"):
        build_train_loader(config(pattern, resampled=False), 16, tokenizer)
    loader = build_train_loader(config(pattern, resampled=False, epoch_samples=9), 16, tokenizer)
    assert len(loader) == 3 and sum(1 for _ in loader) == 3


def test_epoch_length_from_img2dataset_stats_files(make_shards, tokenizer):
    pattern, _ = make_shards([6, 4], manifest=False)
    folder = os.path.dirname(pattern)
    for name, successes in (("00000", 6), ("00001", 4)):
        with open(os.path.join(folder, f"{name}_stats.json"), "w") as f:
            json.dump({"count": successes + 1, "successes": successes}, f)
    assert len(build_train_loader(config(pattern, resampled=False, batch_size=2), 16, tokenizer)) == 5


def test_order_is_deterministic_given_the_seed(make_shards, tokenizer, captions_of):
    pattern, _ = make_shards([10, 10, 10])

    def first(seed, n=6):
        loader = build_train_loader(config(pattern), 16, tokenizer, seed=seed)
        return [b for b in islice(iter(loader), n)]

    a, b, c = first(0), first(0), first(1)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    assert [captions_of(t) for _, t in a] != [captions_of(t) for _, t in c]


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "epoch"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly_where_an_uninterrupted_run_would(make_shards, tokenizer, resampled, workers):
    # Bad samples in every shard: the skip count must survive the round trip without counting twice the
    # ones a resumed worker re-reads on its way to the saved position.
    bad = {s: [{"__key__": f"bad{s}", "png": b"not an image", "txt": b"bad one"},
               {"__key__": f"cut{s}", "png": image_bytes_bad(), "txt": b"bad two"}] for s in range(4)}
    pattern, _ = make_shards([9, 7, 8, 6], bad=bad)  # 38 samples: 6 batches per rank and epoch
    cut_tar(pattern.replace("{00000..00003}", "00002"))  # and a shard whose tar is cut short
    for rank in range(2):  # both ranks of a 2-rank run
        cfg = config(pattern, resampled=resampled, num_workers=workers)
        reference = build_train_loader(cfg, 16, tokenizer, rank=rank, world_size=2, seed=3)
        expected = take(reference, 12)

        first = build_train_loader(cfg, 16, tokenizer, rank=rank, world_size=2, seed=3)
        got = take(first, 3)  # mid-epoch, and odd: the next batch is due from worker 1, not worker 0
        state = json.loads(json.dumps(first.state_dict()))  # plain python values
        del first

        resumed = build_train_loader(cfg, 16, tokenizer, rank=rank, world_size=2, seed=3)
        resumed.load_state_dict(state)
        assert resumed.skipped_samples == state["skipped_samples"]
        got += take(resumed, 9)  # crosses an epoch boundary in epoch mode
        for i, ((ie, te), (ig, tg)) in enumerate(zip(expected, got)):
            assert torch.equal(te, tg) and torch.equal(ie, ig), f"rank {rank}: batch {i} differs after resume"
        assert resumed.skipped_samples == reference.skipped_samples
        assert resumed.epoch == reference.epoch and resumed.samples_seen == reference.samples_seen


def image_bytes_bad() -> bytes:
    return good_sample(999, fmt="jpg")["jpg"][:200]  # a JPEG cut short


def test_state_from_another_worker_count_continues_the_same_batches(make_shards, tokenizer):
    pattern, _ = make_shards([8, 8])
    expected = take(build_train_loader(config(pattern, num_workers=0), 16, tokenizer), 5)[3:]
    first = build_train_loader(config(pattern, num_workers=2), 16, tokenizer)
    take(first, 3)
    state = first.state_dict()
    resumed = build_train_loader(config(pattern, num_workers=0), 16, tokenizer)
    resumed.load_state_dict(state)
    assert resumed.samples_seen == state["samples_seen"]
    for (ie, te), (ig, tg) in zip(expected, take(resumed, 2)):
        assert torch.equal(ie, ig) and torch.equal(te, tg)


def test_state_with_another_global_batch_warns_once_and_restarts_the_epoch(make_shards, tokenizer, caplog):
    pattern, _ = make_shards([8, 8])
    first = build_train_loader(config(pattern, resampled=False), 16, tokenizer)
    take(first, 3)
    resumed = build_train_loader(config(pattern, resampled=False, batch_size=4), 16, tokenizer)
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        resumed.load_state_dict(first.state_dict())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "global_batch_size" in warnings[0] and "epoch 0 starts again" in warnings[0]
    assert len(list(resumed)) == 4  # the whole epoch of 16 samples in batches of 4


@pytest.mark.parametrize(("key", "value"), [("shuffle_buffer", 3), ("shuffle_shards", 1), ("order_streams", 3)])
def test_state_with_another_shuffle_setting_warns_once_and_restarts_the_epoch(make_shards, tokenizer, caplog, key,
                                                                              value):
    """data.shuffle_buffer, data.shuffle_shards and data.order_streams are part of the order and recorded in the state: a resume
    that changes one re-plans (one warning naming it, the epoch again from its first batch in the new
    order); with both unchanged it continues exactly, also from a state saved before they were recorded."""
    pattern, _ = make_shards([8, 8])  # 16 samples: 5 batches of 3 per epoch
    expected = take(build_train_loader(config(pattern, resampled=False), 16, tokenizer), 5)
    first = build_train_loader(config(pattern, resampled=False), 16, tokenizer)
    take(first, 3)
    state = first.state_dict()
    assert (state["shuffle_buffer"], state["shuffle_shards"]) == (8, 2)

    changed = build_train_loader(config(pattern, resampled=False, **{key: value}), 16, tokenizer)
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        changed.load_state_dict(state)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and key in warnings[0] and "epoch 0 starts again" in warnings[0], warnings
    restarted = list(changed)
    fresh = list(build_train_loader(config(pattern, resampled=False, **{key: value}), 16, tokenizer))
    assert len(restarted) == 5
    for (ir, tr), (i_f, tf) in zip(restarted, fresh):
        assert torch.equal(ir, i_f) and torch.equal(tr, tf)

    assert state["order_streams"] == 1
    # a state saved before these were recorded: shuffle settings as today's, one stream (all runs had one)
    older = {k: v for k, v in state.items() if k not in ("shuffle_buffer", "shuffle_shards", "order_streams")}
    for saved in (state, older):
        caplog.clear()
        same = build_train_loader(config(pattern, resampled=False), 16, tokenizer)
        with caplog.at_level(logging.WARNING, logger="clip_train.data"):
            same.load_state_dict(saved)
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        got = list(same)
        assert len(got) == 2
        for (ie, te), (ig, tg) in zip(expected[3:], got):
            assert torch.equal(ie, ig) and torch.equal(te, tg)


def test_shuffle_buffers_of_0_and_1_are_the_same_order_so_a_resume_between_them_continues(make_shards, tokenizer,
                                                                                          caplog):
    """Both mean no buffer: the order is the same, so switching between them is not a re-plan."""
    pattern, _ = make_shards([8, 8])
    expected = take(build_train_loader(config(pattern, resampled=False, shuffle_buffer=0), 16, tokenizer), 5)
    first = build_train_loader(config(pattern, resampled=False, shuffle_buffer=0), 16, tokenizer)
    take(first, 3)
    resumed = build_train_loader(config(pattern, resampled=False, shuffle_buffer=1), 16, tokenizer)
    with caplog.at_level(logging.WARNING, logger="clip_train.data"):
        resumed.load_state_dict(first.state_dict())
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    got = list(resumed)
    assert len(got) == 2
    for (ie, te), (ig, tg) in zip(expected[3:], got):
        assert torch.equal(ie, ig) and torch.equal(te, tg)


def test_bomb_and_bad_samples_in_training_are_counted(make_shards, tokenizer):
    bad = {0: [{"__key__": "bomb", "png": bomb_png(), "txt": b"a bomb"},
               {"__key__": "nocap", "png": good_sample(1)["png"]}]}
    pattern, _ = make_shards([6], bad=bad)
    loader = build_train_loader(config(pattern, num_workers=0, resampled=False, batch_size=2), 16, tokenizer)
    assert sum(1 for _ in loader) == 4  # 8 samples in the manifest / batch 2, padded with a second pass
    assert loader.skipped_samples >= 2


def _gather_state_in_rank(rank, init_file, pattern, queue):
    import torch.distributed as dist

    from clip_train.tokenizer import get_tokenizer
    from clip_train.train.distributed import shutdown

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loader = build_train_loader(config(pattern, num_workers=0), 16, get_tokenizer(context_length=16),
                                    rank=rank, world_size=2)
        take(loader, 2 + rank)  # ranks at different positions
        state = loader.state_dict()  # collective under torch.distributed
        queue.put((rank, state, loader.state_dict(gather=False)))
    finally:
        shutdown()  # as the trainer leaves: Queue.put's feeder thread must still get the GIL (see shutdown)


def test_state_dict_gathers_every_rank_under_torch_distributed(make_shards, tokenizer, tmp_path):
    import multiprocessing

    pattern, _ = make_shards([6, 6])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_state_in_rank, args=(r, tmp_path / "pg", pattern, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: (state, local) for rank, state, local in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, (state, local) in results.items():
        assert state["rank"] == rank and "ranks" not in local
        assert state["ranks"] == [results[0][1], results[1][1]]
    # rank 0's saved state resumes rank 1 exactly
    saved = results[0][0]
    reference = build_train_loader(config(pattern, num_workers=0), 16, tokenizer, rank=1, world_size=2)
    expected = take(reference, 5)[3:]
    resumed = build_train_loader(config(pattern, num_workers=0), 16, tokenizer, rank=1, world_size=2)
    resumed.load_state_dict(saved)
    for (ie, te), (ig, tg) in zip(expected, take(resumed, 2)):
        assert torch.equal(ie, ig) and torch.equal(te, tg)
