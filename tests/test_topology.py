"""The global batch sequence does not depend on the topology: same samples, crops and losses at 1x16 and
2x8, with 0 or 2 workers, and a run stopped on one shape continues on another (torchrun, CPU gloo)."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from clip_train.data import DataConfig, build_train_loader
from clip_train.data.manifest import write_manifest
from clip_train.tokenizer import get_tokenizer
from clip_train.train import checkpoint as ckpt
from tests.cli_helpers import run_cli, train_losses
from tests.data.data_helpers import good_sample, write_tar

SIZES = [37, 21, 30, 28]  # 116 samples, uneven: 7 global batches of 16 per epoch, 4 samples left over
GLOBAL_BATCH = 16


def _write_shards(folder: Path, bad: range = range(0)) -> str:
    """Shards of SIZES samples with manifest; the samples numbered in ``bad`` have an undecodable image."""
    entries, index = [], 0
    for s, size in enumerate(SIZES):
        samples = [{"__key__": f"{i:06d}", "png": b"not an image", "txt": b"bad"} if i in bad else good_sample(i)
                   for i in range(index, index + size)]
        index += size
        path = folder / f"{s:05d}.tar"
        write_tar(str(path), samples)
        entries.append((path.name, size, path.stat().st_size))
    write_manifest(str(folder), entries)
    return str(folder / f"{{00000..{len(SIZES) - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return _write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> str:
    """The same shards with every 9th sample undecodable: bad positions spread over batches, slices and blocks."""
    return _write_shards(tmp_path_factory.mktemp("bad_shards"), bad=range(4, sum(SIZES), 9))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _loader(shards: str, world_size: int, rank: int, workers: int, shuffle_shards: int = 2):
    cfg = DataConfig(train_shards=shards, batch_size=GLOBAL_BATCH // world_size, num_workers=workers,
                     resampled=False, shuffle_buffer=20, shuffle_shards=shuffle_shards)
    return build_train_loader(cfg, 16, get_tokenizer(context_length=16), rank=rank, world_size=world_size, seed=7)


def _keys(tokens, tokenizer) -> list[str]:
    return [tokenizer.decode(row.tolist()).replace(" ", "") for row in tokens]


def _epoch_keys(shards: str, world_size: int, workers: int, shuffle_shards: int = 2) -> list[list[str]]:
    """The sample keys of each global batch of epoch 0: every rank's slice, in rank order."""
    tokenizer = get_tokenizer(context_length=16)
    batches: list[list[str]] = [[] for _ in range(7)]
    for rank in range(world_size):
        loader = _loader(shards, world_size, rank, workers, shuffle_shards)
        for b, (_, tokens) in enumerate(loader):
            batches[b] += _keys(tokens, tokenizer)
        loader.close()
    return batches


def test_global_batches_depend_on_shuffle_shards_not_on_ranks_or_workers(shards):
    """data.shuffle_shards is part of the order: 1 rank x 0 workers and 2 ranks x 2 workers give the same
    global batches (sample keys, in order); another data.shuffle_shards gives another order of the same
    epoch."""
    one = _epoch_keys(shards, 1, 0)
    assert _epoch_keys(shards, 2, 2) == one
    wider = _epoch_keys(shards, 1, 0, shuffle_shards=4)
    assert wider != one
    for keys in (one, wider):  # both are orders of the epoch: no sample twice
        flat = [k for batch in keys for k in batch]
        assert len(flat) == 7 * GLOBAL_BATCH and len(set(flat)) == len(flat)


RENAMED_LINE = ("data.shards_per_block was renamed data.shuffle_shards: it sets the global order's mixing, which "
                "is the same at every world size and worker count")


def test_the_old_shards_per_block_key_is_refused_in_one_line_naming_its_new_name(shards, cache_dir, tmp_path):
    """On the command line (any prefix, also in a sweep), in a YAML file and in a dict config."""
    from clip_train.config import ConfigError, register_configs
    from clip_train.config_source import hydra_config_path
    from clip_train.data.pipeline import as_data_config
    from clip_train.train import preflight

    result = run_cli(["+experiment=demo", "data.shards_per_block=4", f"hydra.run.dir={tmp_path / 'run'}"],
                     cache_dir, timeout=120)
    assert result.returncode == 2
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert errors == [f"clip_train: error: {RENAMED_LINE}"]
    assert not (tmp_path / "run").exists()  # refused before Hydra writes anything
    result = run_cli(["-m", "+experiment=demo", "data.shards_per_block=2,4", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                     cache_dir, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"clip_train: error: {RENAMED_LINE}"
    assert not (tmp_path / "sweep").exists()

    register_configs()  # what python -m clip_train does on import
    config_dir = str(Path(hydra_config_path()).resolve())
    experiments = tmp_path / "configs" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "old.yaml").write_text("# @package _global_\ndata:\n  shards_per_block: 2\n")
    for overrides in (["+experiment=demo", "+data.shards_per_block=4"],
                      ["+experiment=demo", "++data.shards_per_block=4"],
                      [f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "+experiment=old"]):
        with pytest.raises(ConfigError) as refused:
            preflight.check(config_dir, "train", overrides, world_size=1)
        assert str(refused.value) == RENAMED_LINE, overrides
    with pytest.raises(ConfigError, match="^data.shuffle_shards must be >= 1 .*got 0$"):
        preflight.check(config_dir, "train", ["+experiment=demo", "data.shuffle_shards=0"], world_size=1)
    with pytest.raises(ValueError, match="^data.shards_per_block was renamed data.shuffle_shards: "):
        as_data_config({"train_shards": shards, "shards_per_block": 2})


@pytest.mark.parametrize(("before", "after"), [((2, 0), (1, 2)), ((1, 2), (2, 0))], ids=["2to1", "1to2"])
def test_an_epoch_split_across_two_shapes_sees_every_sample_once(shards, before, after):
    """Stop after 3 global batches at one (ranks, workers) shape, resume at another: the epoch's 7 batches
    hold 112 distinct samples, and the batches after the resume are those of an uninterrupted run."""
    tokenizer = get_tokenizer(context_length=16)
    world, workers = before
    firsts = [_loader(shards, world, r, workers) for r in range(world)]
    seen: list[str] = []
    batches = [[] for _ in range(3)]
    for loader in firsts:
        it = iter(loader)
        for b in range(3):
            images, tokens = next(it)
            batches[b].append((images, tokens))
    state = [loader.state_dict(gather=False) for loader in firsts]
    for loader in firsts:
        loader.close()
    world2, workers2 = after
    resumed = [_loader(shards, world2, r, workers2) for r in range(world2)]
    for loader in resumed:
        loader.load_state_dict(state)
        assert len(loader) == 7
    tail = [[] for _ in range(4)]
    for loader in resumed:
        for b, batch in enumerate(loader):
            tail[b].append(batch)
    for parts in batches + tail:
        for _, tokens in parts:
            seen += _keys(tokens, tokenizer)
    counts = Counter(seen)
    assert len(seen) == 7 * GLOBAL_BATCH and max(counts.values()) == 1  # each sample at most once
    assert set(counts) <= {f"sample{i}" for i in range(sum(SIZES))}
    # and the same global batches as one uninterrupted loader at the new shape
    reference = [_loader(shards, world2, r, workers2) for r in range(world2)]
    expected = [[] for _ in range(7)]
    for loader in reference:
        for b, (images, tokens) in enumerate(loader):
            expected[b].append((images, tokens))
    import torch

    def joined(parts):
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    for b, parts in enumerate(batches + tail):
        got, want = joined(parts), joined(expected[b])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"global batch {b} differs"


def _args(shards: str, world_size: int, workers: int, run_dir: Path) -> list[str]:
    return ["+experiment=demo", f"data.train_shards='{shards}'", "data.resampled=false", "data.shuffle_buffer=20",
            "data.shuffle_shards=2", f"data.batch_size={GLOBAL_BATCH // world_size}",
            f"data.num_workers={workers}", "eval.zeroshot=[]", "eval.every_n_steps=0", "train.log_every_n_steps=1",
            "train.max_steps=6", "ckpt.every_n_steps=2", "ckpt.keep_last=0", "optim.warmup_steps=2",
            "train.seed=5", f"hydra.run.dir={run_dir}"]


def _close(a: dict[int, float], b: dict[int, float]) -> bool:
    return sorted(a) == sorted(b) and all(math.isclose(a[k], b[k], rel_tol=1e-5) for k in a)


def _resume_from(source: Path, step: int, target: Path) -> None:
    """``target``: a copy of run ``source`` as if it had stopped right after saving ``step``."""
    shutil.copytree(source, target, symlinks=True)
    for saved, path in ckpt.list_checkpoints(target / "checkpoints"):
        if saved > step:
            shutil.rmtree(path)
    (target / "checkpoints" / "latest").unlink()


def test_same_losses_at_1x16_and_2x8_across_resumes_at_the_other_shape(bad_shards, cache_dir, tmp_path):
    """fp32 on CPU: 1 rank x 16 (0 workers) from the start; its step-2 checkpoint continued on 2 gloo ranks
    x 8 (2 workers); that run's step-4 checkpoint continued on 1 rank x 16 (2 workers). Every step logs the
    loss of the uninterrupted 1x16 run (the global batches themselves are compared in the test above), also
    over shards where every 9th sample is bad (its slot holds the next good position's sample at any shape)."""
    shards = bad_shards
    one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "back"
    result = run_cli(_args(shards, 1, 0, one), cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = train_losses(one)
    assert sorted(reference) == list(range(1, 7))

    _resume_from(one, 2, two)
    result = run_cli(_args(shards, 2, 2, two), cache_dir, torchrun_procs=2)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "at step 2" in output and "re-planned" not in output
    assert _close(train_losses(two), reference), (train_losses(two), reference)

    _resume_from(two, 4, back)
    result = run_cli(_args(shards, 1, 2, back), cache_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "at step 4" in output and "re-planned" not in output
    assert _close(train_losses(back), reference), (train_losses(back), reference)
