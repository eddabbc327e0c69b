"""The loaders the trainer uses: ``build_train_loader`` (resumable, endless or by epoch) and ``build_eval_loader``.

Train batches are ``(images uint8 [B, 3, S, S], tokens long [B, L])``; normalise them on the device with
``normalize_on_device``. The train loader's position is its state: ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from clip_train.data.config import RENAMED_OPTIONS, DataConfig, renamed_option_message
from clip_train.data.decode import SampleDecoder
from clip_train.data.manifest import count_tar_samples, openclip_total, sample_counts
from clip_train.data.order import GlobalOrder
from clip_train.data.plan import StreamPlan, mix_seed
from clip_train.data.remote import RemoteOptions
from clip_train.data.sources import ShardSource, check_first_shard, resolve_sources
from clip_train.data.stream import DataUnavailable, GlobalBatchStream, ShardStream
from clip_train.models.config import ImagePreprocessing

log = logging.getLogger(__name__)

STATE_VERSION = 2
# The saved position continues the same global order only if these match the run that saved it (world size,
# worker count and per-rank batch size may change freely).
_ORDER_KEYS = ("global_batch_size", "mode", "seed", "num_shards", "shuffle_buffer", "shuffle_shards",
               "order_streams")
# Recorded since the block width became ``data.shuffle_shards`` (still version 2: no saved value changed
# meaning). A state saved before lacks them; nothing says what they were, so they count as unchanged: a
# resume with the same settings continues exactly, instead of every older checkpoint restarting its epoch.
_ORDER_KEYS_ADDED_LATER = ("shuffle_buffer", "shuffle_shards")
# Recorded since ``data.order_streams`` exists; every run before it had one stream.
_ORDER_KEY_DEFAULTS = {"order_streams": 1}


def _order_value(key: str, value: Any) -> Any:
    """A recorded order setting in the form that decides the order: buffers of 0 and 1 both mean none."""
    return max(int(value), 1) if key == "shuffle_buffer" and value is not None else value


_exit_hook_installed = False


class EvalBatch(NamedTuple):
    """One eval batch: uint8 images, tokens, and class labels (-1 where a sample has none)."""

    images: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor


def as_data_config(cfg: Any) -> DataConfig:
    """A ``DataConfig`` from itself, an OmegaConf node (structured or plain) or a dict; unknown keys fail."""
    if isinstance(cfg, DataConfig):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_object(cfg)
            if isinstance(cfg, DataConfig):
                return cfg
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, dict):
        known = {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(cfg) - known)
        renamed = [renamed_option_message(key) for key in unknown if key in RENAMED_OPTIONS]
        if renamed:
            raise ValueError(renamed[0])
        if unknown:
            raise ValueError(f"unknown data option(s) {unknown}; known: {sorted(known)}")
        return DataConfig(**cfg)
    return cfg  # duck-typed: any object with DataConfig's attributes


def _shard_spec(spec: Any, split: str) -> Any:
    """``demo`` names the built-in digits dataset (built into the cache on first use)."""
    if isinstance(spec, str) and spec.strip() == "demo":
        from clip_train.data.demo import ensure_demo_data

        demo = ensure_demo_data()
        return demo.train_shards if split == "train" else demo.val_shards
    return spec


def _default_tokenizer(tokenizer: Callable | None) -> Callable:
    if tokenizer is not None:
        return tokenizer
    from clip_train.tokenizer import get_tokenizer

    return get_tokenizer()


def _pin(cfg: DataConfig) -> bool:
    return torch.cuda.is_available() if cfg.pin_memory is None else bool(cfg.pin_memory)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM, SIGUSR2 and SIGINT: those ask the *training process* to checkpoint
    and stop (a terminal's Ctrl-C reaches the whole process group, workers included).

    SLURM signals every process of a job step, workers included. A worker killed by SIGTERM would make
    the main process fail with "DataLoader worker exited unexpectedly" before it could save, and one that
    inherited the main process's handler would announce a preemption it cannot act on. The workers still
    end with the main process: the DataLoader shuts them down, and they exit when their parent dies.
    """
    for signum in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At interpreter exit, SIGKILL the daemonic children (DataLoader workers) that are still alive.

    Our workers ignore SIGTERM, and multiprocessing's own exit hook stops daemonic children with SIGTERM
    and then joins them, so a worker left behind (the run stopped on an error, e.g. another worker died,
    before the DataLoader shut its workers down) would make the main process wait forever. Registered
    after multiprocessing's hook, so it runs first (atexit is last in, first out).
    """
    leftover = [child for child in multiprocessing.active_children() if child.daemon]
    if leftover:
        # The DataLoader's SIGCHLD handler would report each kill as a worker failure while exiting.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in leftover:
        child.kill()


def _dataloader(dataset: ShardStream, cfg: DataConfig, persistent: bool = False) -> DataLoader:
    global _exit_hook_installed
    workers = max(0, cfg.num_workers)
    if workers and not _exit_hook_installed:
        atexit.register(_kill_leftover_workers)
        _exit_hook_installed = True
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=_pin(cfg),
                      prefetch_factor=cfg.prefetch_factor if workers else None,
                      persistent_workers=persistent and workers > 0,
                      worker_init_fn=_ignore_stop_signals if workers else None)


class TrainLoader:
    """Resumable training loader of one rank. Iterate it for ``(images, tokens)`` batches.

    Resampled mode is endless. In epoch mode one ``for`` loop is one epoch of ``len(loader)`` batches
    (the same on every rank); the next loop starts the next epoch. Worker processes live for a whole epoch
    (in resampled mode: for the whole run), and breaking out of a loop keeps them: the next loop continues
    with the next batch.
    """

    def __init__(self, dataset: GlobalBatchStream, cfg: DataConfig, batches_per_epoch: int | None) -> None:
        self._dataset = dataset
        self._cfg = cfg
        self._order: GlobalOrder = dataset.order
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self._batches_in_epoch = 0
        self._samples_seen = 0
        # Skip counts: those of finished DataLoader iterators, plus each live worker's running count.
        self._skipped_base = [0, 0]
        self._skipped_live: dict[int, tuple[int, int]] = {}
        self._it: Iterator | None = None
        self._waiting_since: float | None = None  # set while the training loop waits for a batch
        self._watchdog: threading.Thread | None = None

    # ---- what the trainer reads -----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank."""
        return self._dataset.batch_size

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped by this rank's workers since the run began (restored by ``load_state_dict``)."""
        return self._skipped_base[0] + sum(c[0] for c in self._skipped_live.values())

    @property
    def skipped_shards(self) -> int:
        """Shards this rank's workers abandoned as unavailable (open failed, or reads past the retries)."""
        return self._skipped_base[1] + sum(c[1] for c in self._skipped_live.values())

    @property
    def samples_seen(self) -> int:
        """Samples this rank has handed to the training loop since the run began."""
        return self._samples_seen

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a resampled train loader is endless and has no length (data.resampled=true)")
        return self.batches_per_epoch

    # ---- iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._epoch_complete():  # a new loop after a finished epoch (or a resume at its very end)
            self._start_epoch(self.epoch + 1)
        while not self._epoch_complete():
            try:
                images, tokens, meta = self._next_batch()
            except StopIteration:
                self._it = None
                raise RuntimeError(f"data: the workers' streams ended after {self._batches_in_epoch} batches of "
                                   f"epoch {self.epoch}, expected {self.batches_per_epoch}") from None
            self._record(meta.tolist())
            yield images, tokens
        self._it = None  # every worker has met its quota; the next epoch starts fresh workers

    def _next_batch(self) -> Any:
        """The next batch from the workers, watched: a long wait is reported naming the shards being read."""
        if self._cfg.stall_timeout_s > 0 and self._watchdog is None:
            # A weak reference, so the watchdog does not keep the loader (and its workers) alive.
            self._watchdog = threading.Thread(target=TrainLoader._watch, args=(weakref.ref(self),),
                                              name="data-stall-watchdog", daemon=True)
            self._watchdog.start()
        self._waiting_since = time.monotonic()
        try:
            return next(self._iterator())
        except DataUnavailable as exn:
            self._it = None
            raise DataUnavailable(_worker_message(exn)) from None
        finally:
            self._waiting_since = None

    @staticmethod
    def _watch(loader_ref: weakref.ref) -> None:
        """Warn each ``data.stall_timeout_s`` the training loop has waited for one batch (a daemon thread that
        ends with the loader)."""
        loader = loader_ref()
        timeout = float(loader._cfg.stall_timeout_s) if loader is not None else 1.0
        del loader
        warned_for: tuple[float, int] | None = None
        while True:
            time.sleep(min(1.0, timeout / 4))
            loader = loader_ref()
            if loader is None:
                return
            warned_for = loader._warn_if_stalled(timeout, warned_for)
            del loader  # no strong reference while sleeping

    def _warn_if_stalled(self, timeout: float, warned_for: tuple[float, int] | None) -> tuple[float, int] | None:
        since = self._waiting_since
        if since is None:
            return warned_for
        waited = time.monotonic() - since
        periods = int(waited // timeout)
        if periods >= 1 and warned_for != (since, periods):
            log.warning("data: no batch for %.0f s (data.stall_timeout_s=%g); waiting on %s. Slow or stalled "
                        "shards are abandoned after data.read_retries tries of data.read_timeout_s=%g s",
                        waited, timeout, self.waiting_on(), self._cfg.read_timeout_s)
            return since, periods
        return warned_for

    def waiting_on(self) -> str:
        """Which worker the next batch is due from and the shards it is reading (from the plan: no IPC)."""
        workers = max(1, self._cfg.num_workers)
        worker = (self._batches_in_epoch - self._dataset.first_batch) % workers
        urls: list[str] = []
        for stream, position, _ in self._dataset.slice_runs(self._batches_in_epoch):
            order = self._dataset.layout.orders[stream]
            first = order.locate(self.epoch, position)
            for index in (first, first + 1):
                for unit in order.block(self.epoch, index).units:
                    if unit.url not in urls:
                        urls.append(unit.url)
        shown = ", ".join(urls[:8]) + (f" and {len(urls) - 8} more" if len(urls) > 8 else "")
        return f"worker {worker} of rank {self._dataset.rank}, reading {shown or 'nothing'}"

    def _epoch_complete(self) -> bool:
        return self.batches_per_epoch is not None and self._batches_in_epoch >= self.batches_per_epoch

    def _iterator(self) -> Iterator:
        if self._it is None:
            ds = self._dataset
            ds.epoch = self.epoch
            ds.first_batch = self._batches_in_epoch
            ds.end_batch = self.batches_per_epoch
            self._fold_skips()
            self._it = iter(_dataloader(ds, self._cfg))
        return self._it

    def _fold_skips(self) -> None:
        """Move the live workers' skip counts into the base (a new DataLoader iterator counts from zero)."""
        self._skipped_base = [self.skipped_samples, self.skipped_shards]
        self._skipped_live = {}

    def _record(self, meta: list[int]) -> None:
        worker, epoch, batch, skipped, skipped_shards = meta
        if epoch != self.epoch or batch != self._batches_in_epoch:
            raise RuntimeError(f"data: got global batch {batch} of epoch {epoch}, expected batch "
                               f"{self._batches_in_epoch} of epoch {self.epoch}")
        self._skipped_live[worker] = (skipped, skipped_shards)
        self._batches_in_epoch += 1
        self._samples_seen += self.batch_size

    def _start_epoch(self, epoch: int) -> None:
        self._it = None
        self.epoch = epoch
        self._batches_in_epoch = 0
        self._fold_skips()

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage collected)."""
        self._it = None

    # ---- resumable state -------------------------------------------------------------------------------------
    def _local_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self._dataset.rank,
            "world_size": self._dataset.world_size,
            "num_workers": self._cfg.num_workers,
            "batch_size": self.batch_size,
            "global_batch_size": self._dataset.global_batch,
            "mode": self._order.mode,
            "seed": self._order.seed,
            "num_shards": len(self._order.urls),
            "shuffle_buffer": max(0, int(self._dataset.shuffle_buffer)),
            "shuffle_shards": self._order.shuffle_shards,
            "order_streams": self._dataset.streams,
            "epoch": self.epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "samples_seen": self._samples_seen,
            "skipped_samples": self.skipped_samples,
            "skipped_shards": self.skipped_shards,
        }

    def state_dict(self, gather: bool | None = None) -> dict[str, Any]:
        """This rank's position as plain Python values; with ``gather`` also every rank's, under ``"ranks"``.

        The position is the global batch index within the epoch, the same on every rank, so any world size
        and worker count can continue from it. ``gather`` defaults to True when ``torch.distributed`` is
        initialised with more than one rank; it is then a collective call that every rank must make.
        """
        state = self._local_state()
        if gather is None:
            gather = (torch.distributed.is_available() and torch.distributed.is_initialized()
                      and torch.distributed.get_world_size() > 1)
        if gather:
            everyone: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, state)
            state["ranks"] = everyone
        return state

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue the saved run's global sequence: the next global batch is the one it would have used next.

        ``state`` is one ``state_dict()`` or every saved rank's (a list, or under ``"ranks"``); the saved run
        may have had any world size and worker count. Skip counts of all saved ranks are carried by rank 0
        (the trainer sums them over ranks). A change of the global batch size (or of the mode, seed, shard
        list, ``data.shuffle_buffer``, ``data.shuffle_shards`` or ``data.order_streams``) cannot continue the same sequence: the loader
        warns once and starts the saved epoch afresh in the new plan (resampled mode: the stream restarts
        from the seed). A state saved before ``shuffle_buffer``/``shuffle_shards`` were recorded is taken to
        have today's values.
        """
        entries = state if isinstance(state, list) else state.get("ranks") or [state]
        for entry in entries:
            if entry.get("version") not in (1, STATE_VERSION):
                raise ValueError(f"data loader state version {entry.get('version')!r} is not {STATE_VERSION}")
        rank, world = self._dataset.rank, self._dataset.world_size
        same_shape = len(entries) == world
        # All ranks of a run are at the same global batch; with the saved shape each takes its own entry.
        entry = entries[rank] if same_shape else entries[0]
        self._it = None  # workers restart from the loaded position
        # samples_seen is per rank: the run's total, shared out over the new world size
        self._samples_seen = (int(entry["samples_seen"]) * int(entry.get("world_size", 1))
                              // self._dataset.world_size)
        self._skipped_live = {}
        carried = [entry] if same_shape or len(entries) == 1 else entries if rank == 0 else []
        self._skipped_base = [sum(int(e.get("skipped_samples", 0)) for e in carried),
                              sum(int(e.get("skipped_shards", 0)) for e in carried)]
        now = self._local_state()
        # A version-1 state (per-worker streams, before the global order) has no global batch index to continue.
        differ = ["version"] if entry.get("version") != STATE_VERSION else \
            [k for k in _ORDER_KEYS
             if _order_value(k, entry.get(k, _ORDER_KEY_DEFAULTS.get(k))) != _order_value(k, now[k])
             and not (k in _ORDER_KEYS_ADDED_LATER and k not in entry)]
        self.epoch = int(entry["epoch"])
        if not differ:
            self._batches_in_epoch = int(entry["batches_in_epoch"])
            return
        if self._order.mode == "resampled":
            self.epoch = 0
        self._batches_in_epoch = 0
        if self._dataset.rank == 0:
            log.warning("data: %s changed (saved %s, now %s): the global order is re-planned; %s",
                        ", ".join(differ), {k: entry.get(k) for k in differ}, {k: now[k] for k in differ},
                        f"epoch {self.epoch} starts again from its first batch in the new order (its samples "
                        "already seen in this epoch are seen again)" if self._order.mode == "epoch"
                        else "the resampled stream starts again from the seed")


def _worker_message(exn: Exception) -> str:
    """The message a worker raised, without DataLoader's "Caught ... in DataLoader worker" traceback around it."""
    text = str(exn)
    marker = f"{type(exn).__name__}: "
    lines = [line for line in text.splitlines() if marker in line]
    return lines[-1].split(marker, 1)[1] if lines else text


class EvalLoader:
    """One pass over the eval shards per ``for`` loop, yielding ``EvalBatch(images, tokens, labels)``.

    Every sample appears once across all ranks and workers; the last batch of each worker may be smaller.
    """

    def __init__(self, dataset: ShardStream, cfg: DataConfig) -> None:
        self._dataset = dataset
        self._loader = _dataloader(dataset, cfg, persistent=True)
        self._skipped_before = 0
        self._pass: dict[int, int] = {}

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped over all passes so far."""
        return self._skipped_before + sum(self._pass.values())

    def __iter__(self) -> Iterator[EvalBatch]:
        self._skipped_before += sum(self._pass.values())
        self._pass = {}
        for images, tokens, labels, meta in self._loader:
            self._pass[int(meta[0])] = int(meta[5])
            yield EvalBatch(images, tokens, labels)


def _plan_for(sources: list[ShardSource], mode: str, cfg: DataConfig, *, seed: int, rank: int,
              world_size: int, counts: list[int] | None = None) -> StreamPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    # Evaluation reads one shard at a time (StreamPlan ignores the block width in eval mode).
    return StreamPlan(sources, mode, seed=seed, rank=rank, world_size=world_size, num_workers=cfg.num_workers,
                      shards_per_block=1, counts=counts, batch_size=cfg.batch_size)


def _stream(plan: StreamPlan, decoder: SampleDecoder, tokenizer: Callable | None, batch_size: int,
            shuffle_buffer: int, cfg: DataConfig, **kwargs: Any) -> ShardStream:
    return ShardStream(plan, decoder, _default_tokenizer(tokenizer), batch_size, shuffle_buffer,
                       max_pixels=cfg.max_image_pixels, remote=RemoteOptions.from_config(cfg),
                       max_failed_shards_in_row=cfg.max_failed_shards_in_row, **kwargs)


def build_train_loader(cfg: Any, image_size: int, tokenizer: Callable | None = None, rank: int = 0,
                       world_size: int = 1, seed: int = 0) -> TrainLoader:
    """The training loader of ``rank`` out of ``world_size``; raises ``ValueError`` on bad shard settings.

    The sequence of global batches (``world_size * cfg.batch_size`` samples each, and every sample's random
    crop) is a pure function of the shards, ``seed``, ``cfg.seed``, the epoch, the global batch size,
    ``cfg.shuffle_shards``, ``cfg.shuffle_buffer`` and ``cfg.order_streams``; the rank, world size and worker count only decide
    who reads what (``order.py``). Shard patterns are
    expanded and checked here, so a pattern that matches nothing fails before training.
    """
    cfg = as_data_config(cfg)
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    options = RemoteOptions.from_config(cfg)
    sources = resolve_sources(_shard_spec(cfg.train_shards, "train"), "data.train_shards", options)
    check_first_shard(sources, "data.train_shards", cfg.image_key, cfg.text_key, options=options)
    mode = "resampled" if cfg.resampled else "epoch"
    counts = None
    if mode == "epoch":
        if any(s.weight != 1.0 for s in sources):
            raise ValueError("data.train_shards weights need data.resampled=true (epoch mode reads every shard "
                             "exactly once per epoch)")
        counts = sample_counts([u for s in sources for u in s.urls], cfg.manifest, options)
    else:
        urls = [u for s in sources for u in s.urls]
        try:  # resampled mode uses counts where they are known (a manifest or img2dataset stats)
            counts = sample_counts(urls, cfg.manifest, options)
        except (OSError, ValueError):
            counts = None
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    global_batch = cfg.batch_size * world_size
    fallback = counts[0] if counts else _first_shard_count(sources, options)
    order = GlobalOrder(sources, mode, seed=mix_seed(seed, cfg.seed), shuffle_shards=cfg.shuffle_shards,
                        counts=counts, fallback_count=fallback)
    batches_per_epoch = None
    if mode == "epoch":
        total = sum(counts) if counts is not None else cfg.epoch_samples
        if total is None:
            total = openclip_total([u for s in sources for u in s.urls], options)
        if total is None:
            raise ValueError("data.resampled=false (epoch mode) needs the number of samples per epoch: put a "
                             "shards.json manifest next to the shards (python -m clip_train.data.make_shards "
                             "writes one; OpenCLIP's sizes.json or __len__ also do), set data.manifest, or set "
                             "data.epoch_samples")
        batches_per_epoch = total // global_batch
        if batches_per_epoch < 1:
            raise ValueError(f"an epoch of {total} samples is smaller than one global batch "
                             f"({world_size} ranks x data.batch_size={cfg.batch_size}); lower data.batch_size")
    decoder = SampleDecoder(image_size, cfg.image_key, cfg.text_key, train=True, crop_scale=cfg.train_crop_scale,
                            crop_ratio=cfg.train_crop_ratio, max_pixels=cfg.max_image_pixels)
    dataset = GlobalBatchStream(order, decoder, _default_tokenizer(tokenizer), global_batch, rank, world_size,
                                cfg.shuffle_buffer, max_pixels=cfg.max_image_pixels,
                                remote=RemoteOptions.from_config(cfg),
                                max_failed_shards_in_row=cfg.max_failed_shards_in_row,
                                streams=cfg.order_streams, batches_per_epoch=batches_per_epoch)
    return TrainLoader(dataset, cfg, batches_per_epoch)


def _first_shard_count(sources: list[ShardSource], options: RemoteOptions) -> int:
    """Samples in the first shard that has any (of the first four): the global positions given to each shard
    whose count is unknown (its real length only decides how many of them are filled)."""
    for url in [u for s in sources for u in s.urls][:4]:
        try:
            count = count_tar_samples(url, options)
        except Exception as exn:  # noqa: BLE001 - an unreadable or empty tar: try the next one
            log.debug("data: cannot count %s (%s); trying the next shard", url, exn)
            continue
        if count > 0:
            return count
    return 1000


def build_eval_loader(cfg: Any, image_size: int, tokenizer: Callable | None = None, rank: int = 0,
                      world_size: int = 1, option: str = "data.val_shards",
                      preprocessing: ImagePreprocessing | None = None) -> EvalLoader:
    """The eval loader over ``cfg.val_shards``: resized as ``preprocessing`` (the model's; default shorter
    side + center crop, bicubic), no shuffling, one pass.

    Samples with a class label in ``cfg.label_key`` need no caption. ``option`` is how errors name the shards.
    """
    cfg = as_data_config(cfg)
    options = RemoteOptions.from_config(cfg)
    sources = resolve_sources(_shard_spec(cfg.val_shards, "val"), option, options)
    check_first_shard(sources, option, cfg.image_key, cfg.text_key, label_key=cfg.label_key, options=options)
    plan = _plan_for(sources, "eval", cfg, seed=0, rank=rank, world_size=world_size)
    preprocessing = preprocessing or ImagePreprocessing()
    decoder = SampleDecoder(image_size, cfg.image_key, cfg.text_key, train=False, max_pixels=cfg.max_image_pixels,
                            label_key=cfg.label_key, resize_mode=preprocessing.resize_mode,
                            interpolation=preprocessing.interpolation)
    dataset = _stream(plan, decoder, tokenizer, cfg.eval_batch_size or cfg.batch_size, 0, cfg, with_labels=True,
                      partial_last=True)
    return EvalLoader(dataset, cfg)
