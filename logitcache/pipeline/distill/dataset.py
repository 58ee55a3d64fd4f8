"""CacheDataset: stream a logit cache to a student in a reproducible, resumable order.

Order. The cache's blocks (Parquet row groups / Zarr record blocks, in manifest order)
are permuted by a generator seeded from ``(seed, epoch)`` and cut into *windows* of
consecutive blocks holding about ``shuffle_buffer`` records together. The records of a
window (after the split, the language filter and language sampling) are permuted by a
generator seeded from ``(seed, epoch, window)``. An epoch is its windows' orders, one after
the other: a pure function of the seed, the epoch and the shard list. ``shuffle_buffer=0``
reads the cache in order, one block per window.

Why windows. A window is both the bounded shuffle buffer (its memory is about
``shuffle_buffer`` records) and the unit of work: each window is read by exactly one
consumer (a DataLoader worker of a rank), so a consumer reads only its own blocks and no
data is read twice. Window g goes to rank ``g % world_size``: a rank can tell its own
windows without knowing its worker count, so its progress can be pruned and merged with
other ranks'.

Lanes. Within a rank, the rank's windows are dealt to ``lanes`` streams (window j of the
rank to lane ``j % lanes``; each lane reads its windows epoch after epoch), and the rank's
items come from the lanes in turn: item t (a record, or a batch packed from one lane, see
``collate.PackedBatches``) is the next item of lane ``t % lanes``. DataLoader takes one item
from each worker in turn, so a worker serves every ``num_workers``-th lane, starting from
the lane whose turn it is when iteration starts (the rank's count of observed items). The
rank's sequence of items is then the same for any number of workers that divides
``lanes``, and a resumed run goes on with the very item the interrupted one would have
taken next. ``lanes=None`` (the default) gives a lane per worker. Lanes beyond the rank's
windows are left out; a lane that runs dry (the end of a counted stream, or a filter that
leaves its windows empty for several epochs in a row) leaves the turn to the others, and
from then on the order holds only for the same worker count.

Split. ``split="eval"`` keeps the records whose *split key* hashes below
``held_out_fraction``, ``"train"`` the others. The key is the record id of the document's
first window (:func:`split_keys`), so every window of a document lands on the same side,
and the split depends on nothing else: not the seed, the run, or the machine.

Resume. Workers are copies of the dataset, so the copy in the training process learns
what was consumed from the records' cursors ``(epoch, window, index, window size)``
passed to :meth:`CacheDataset.observe`. A window's records reach the training loop in
order, so per window only the consumed prefix length is kept; completed epochs are
pruned. :meth:`~CacheDataset.state_dict` holds that progress, the count of observed items,
and the settings that define the order; after :meth:`~CacheDataset.load_state_dict` done
windows are skipped, partly consumed ones resume at their offset, and the rest are dealt to
the current consumers: resuming with other worker or rank counts yields every remaining
record once, and with the same lanes (and ranks) in the same order as without the stop. A window known from the manifest
to hold no kept record is never read and counts as done; one that turns out empty only
after reading (e.g. all its records held out) keeps its epoch open in the state.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from logitcache.errors import ConfigError, CorruptShardError, IncompatibleCacheError
from logitcache.pipeline.common.splits import is_held_out, mix64, split_keys, unit_interval
from logitcache.pipeline.distill.shard_checks import corrupt_shard_error
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.manifest import Manifest
from logitcache.storage_schemas.records import RecordBlock
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.value_codecs import get_value_codec

Split = Literal["train", "eval", "all"]
_STATE_FORMAT = "logitcache.CacheDataset/1"
_SALT_BLOCKS, _SALT_RECORDS, _SALT_REPEATS = 0x0B10C, 0x2EC0D, 0x2E9EA7
# an endless stream stops after this many epochs in a row gave this consumer nothing
_MAX_EMPTY_EPOCHS = 4
# rebuilt in each process rather than pickled into DataLoader workers
_PER_PROCESS = ("_reader", "_pid", "_plans", "_verified", "_block_shard", "_block_index",
                "_kept_in_shard")


@dataclass(frozen=True, kw_only=True, slots=True)
class CachedRecord:
    """One record of the cache; arrays are views into its block's columns. Top-k ids and
    values stay in their stored types (the packer copies them as they are, and batches are
    widened on the device): :meth:`decoded_topk_logprobs` gives float32."""

    record_id: int
    lang: str
    input_ids: np.ndarray  # int64 [n]
    context_length: int  # leading tokens with no label; 0 for sequence_probs
    topk_ids: np.ndarray | None  # stored id type (uint8/16/32) [n - context_length, k]
    topk_values: np.ndarray | None  # the value codec's stored values [n - context_length, k]
    sample_offsets: np.ndarray | None  # int64 [n - context_length + 1], from 0
    sample_ids: np.ndarray | None  # int64 [S]
    sample_counts: np.ndarray | None  # int64 [S]
    entropy: np.ndarray | None  # float32 [n - context_length]
    class_logprobs: np.ndarray | None  # float32 [C]
    label: int  # gold label of sequence_probs, -1 when none or not that kind
    cursor: tuple[int, int, int, int]  # (epoch, window, index in window, window size)
    value_codec: str = "float32"  # the codec of ``topk_values``
    target_logprob: np.ndarray | None = None  # float32 [n - context_length], NaN at the last token

    def decoded_topk_logprobs(self) -> np.ndarray | None:
        """float32 ``[n - context_length, k]`` top-k log-probabilities."""
        return None if self.topk_values is None else get_value_codec(self.value_codec).decode(self.topk_values)


class CacheDataset(IterableDataset):
    """The records of a cache as an iterable of :class:`CachedRecord`. Example::

        ds = CacheDataset("runs/cache", seed=1, epochs=None, split="train", held_out_fraction=0.01)
        ds.load_state_dict(checkpoint["data"])  # optional
        for rec in DataLoader(ds, batch_size=None, num_workers=4):
            ...  # train on rec
            ds.observe([rec.cursor])
        checkpoint["data"] = ds.state_dict()

    ``epochs`` is the total number of epochs (None: endless); iteration starts at the first
    epoch not yet completed (by :meth:`observe` or a loaded state). ``rank`` and
    ``world_size`` default to torch.distributed's at construction. ``verify`` checks each
    shard's sha256 once per process before reading it, and stops at a bad one with an error
    that says how to repair the cache. ``skip_shards`` (paths as the manifest lists them)
    are never read: blocks of theirs count as holding no record. ``lanes`` sets how many
    streams a rank's windows are dealt to (see the module docstring; None: one per
    DataLoader worker); :meth:`observe` must be called once per item (record, or batch).
    """

    def __init__(
        self, cache: str | CacheReader, *, seed: int = 0, epochs: int | None = 1,
        shuffle_buffer: int = 4096, split: Split = "all", held_out_fraction: float = 0.0,
        languages: list[str] | None = None, lang_alpha: float = 1.0,
        rank: int | None = None, world_size: int | None = None, verify: bool = False,
        skip_shards: Iterable[str] = (), lanes: int | None = None,
    ) -> None:
        super().__init__()
        self._reader = cache if isinstance(cache, CacheReader) else CacheReader(cache)
        self._pid: int | None = os.getpid()  # the process self._reader belongs to
        self._url = self._reader.location.url
        self._manifest = self._reader.manifest
        self.seed, self.epochs, self.shuffle_buffer, self.verify = seed, epochs, shuffle_buffer, verify
        self.split, self.held_out_fraction, self.lang_alpha = split, held_out_fraction, lang_alpha
        self.languages = sorted(set(languages)) if languages is not None else None
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.skip_shards = frozenset(skip_shards)
        self.lanes = lanes
        self._check_settings()
        blocks = sum(s.blocks for s in self._manifest.shards)
        mean_records = max(self._manifest.total_records / max(blocks, 1), 1e-9)
        self._window_blocks = max(1, math.ceil(shuffle_buffer / mean_records)) if shuffle_buffer else 1
        self._num_windows = math.ceil(blocks / self._window_blocks)
        counts = self._lang_records()
        # f_l = p_l * N / n_l: how often, on average, an epoch draws a record of language l
        self._repeat_factor = {lang: p * sum(counts.values()) / counts[lang]
                               for lang, p in self.language_weights().items()}
        self._index_blocks()
        self._first_open = 0  # epochs before it are complete for this rank's windows
        self._latest = -1  # latest epoch observed
        self._done: dict[int, set[int]] = {}  # open epoch -> done windows
        self._consumed: dict[int, dict[int, int]] = {}  # open epoch -> window -> records consumed
        self._left: dict[int, int] = {}  # open epoch -> this rank's non-empty windows not done
        self._items = 0  # items (records or batches) this rank has observed: whose lane's turn is next

    def _check_settings(self) -> None:
        present = self._manifest.lang_totals()
        missing = sorted(set(self.languages or ()) - set(present))
        held = ", ".join(f"{k} ({v['records']} records)" for k, v in present.items()) or "none"
        checks = [
            (isinstance(self.seed, int) and self.seed >= 0, f"seed must be an int >= 0, not {self.seed!r}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1 or None, got {self.epochs}"),
            (self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}"),
            (self.split in ("train", "eval", "all"), f"split must be train, eval or all, not {self.split!r}"),
            (0.0 <= self.held_out_fraction < 1.0,
             f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}"),
            (self.split != "eval" or self.held_out_fraction > 0, "split eval needs held_out_fraction > 0"),
            (self.lang_alpha >= 0.0, f"lang_alpha must be >= 0, got {self.lang_alpha}"),
            (0 <= self.rank < self.world_size, f"rank must be in [0, {self.world_size}), not {self.rank}"),
            (self.lanes is None or (isinstance(self.lanes, int) and self.lanes >= 1),
             f"lanes must be an int >= 1 or None, not {self.lanes!r}"),
            (not missing, f"languages {missing} are not in the cache, which holds: {held}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError("CacheDataset: " + "; ".join(problems))

    def _lang_records(self) -> dict[str, int]:
        """Records per kept language, from the manifest."""
        return {lang: c["records"] for lang, c in self._manifest.lang_totals().items()
                if (self.languages is None or lang in self.languages) and c["records"] > 0}

    def _settings(self) -> dict[str, Any]:
        shard_list = [[s.path, s.records, s.blocks] for s in self._manifest.shards]
        digest = hashlib.sha256(json.dumps(shard_list).encode()).hexdigest()[:16]
        return {
            "seed": self.seed, "shuffle_buffer": self.shuffle_buffer, "split": self.split,
            "held_out_fraction": self.held_out_fraction, "languages": self.languages,
            "lang_alpha": self.lang_alpha, "shards": f"{len(shard_list)} shards, sha256 {digest}",
        }

    @property
    def layout(self) -> RecordLayout:
        return self._manifest.layout

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def language_weights(self) -> dict[str, float]:
        """Sampling probability of each kept language: proportional to records ** lang_alpha."""
        weights = {lang: n ** self.lang_alpha for lang, n in self._lang_records().items()}
        return {lang: w / sum(weights.values()) for lang, w in weights.items()}

    def records_per_epoch(self) -> int:
        """Records one epoch yields: exact for split='all' and lang_alpha=1, else the
        expectation (language sampling keeps the total only on average)."""
        share = {"all": 1.0, "train": 1.0 - self.held_out_fraction, "eval": self.held_out_fraction}
        return round(sum(self._lang_records().values()) * share[self.split])

    # ------------------------------------------------------------------ reading

    def _index_blocks(self) -> None:
        shards = self._manifest.shards
        blocks = np.array([s.blocks for s in shards], dtype=np.int64)
        self._block_shard = np.repeat(np.arange(len(shards)), blocks)
        self._block_index = np.arange(int(blocks.sum())) - np.repeat(np.cumsum(blocks) - blocks, blocks)
        kept_langs = self._lang_records()
        self._kept_in_shard = np.array(
            [0 if s.path in self.skip_shards else sum(c["records"] for lang, c in s.langs.items() if lang in kept_langs)
             for s in shards], dtype=np.int64)
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._verified: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _PER_PROCESS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reader, self._pid = None, None
        self._index_blocks()

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block order, which windows may hold kept records) of ``epoch``."""
        if epoch not in self._plans:
            order = np.arange(len(self._block_shard))
            if self.shuffle_buffer > 0:
                order = np.random.default_rng([self.seed, epoch, _SALT_BLOCKS]).permutation(order)
            kept = self._kept_in_shard[self._block_shard[order]] > 0
            starts = np.arange(0, len(order), self._window_blocks)
            nonempty = np.add.reduceat(kept, starts) > 0 if len(order) else np.zeros(0, bool)
            while len(self._plans) >= 3:  # epochs overlap only at their boundaries
                del self._plans[min(self._plans)]
            self._plans[epoch] = (order, nonempty)
        return self._plans[epoch]

    def _select(self, block: RecordBlock, epoch: int) -> np.ndarray:
        """Indices of the records of ``block`` the epoch draws, each as often as drawn."""
        keep = np.ones(block.num_records, dtype=bool)
        if self.split != "all":
            held = is_held_out(split_keys(block.doc_key), self.held_out_fraction)
            keep &= held if self.split == "eval" else ~held
        langs, inverse = np.unique(block.lang.astype(str), return_inverse=True)
        if self.languages is not None:
            keep &= np.isin(langs, self.languages)[inverse]
        counts = keep.astype(np.int64)
        if self.lang_alpha != 1.0:  # floor(f) draws, plus one with probability frac(f)
            factor = np.array([self._repeat_factor.get(lang, 0.0) for lang in langs])[inverse]
            key = mix64(np.array([self.seed], np.uint64))
            key = mix64(mix64(key ^ np.uint64(epoch)) ^ np.uint64(_SALT_REPEATS))
            draw = unit_interval(mix64(block.record_id.astype(np.uint64) ^ key))
            counts *= np.floor(factor).astype(np.int64) + (draw < factor - np.floor(factor))
        return np.repeat(np.arange(block.num_records), counts)

    @property
    def own_windows(self) -> int:
        """How many of the cache's reading windows (of about ``shuffle_buffer`` records) this rank reads."""
        return len(range(self.rank, self._num_windows, self.world_size))

    def lanes_for(self, workers: int) -> int:
        """How many lanes this rank reads with ``workers`` DataLoader workers (0: in-process);
        raises ConfigError when the workers cannot share them evenly."""
        own = self.own_windows
        consumers = max(workers, 1)
        lanes = min(self.lanes if self.lanes is not None else consumers, own)
        if lanes and lanes > consumers and lanes % consumers:
            raise ConfigError(
                f"{lanes} reading lanes cannot be shared evenly by {consumers} DataLoader workers; "
                "use a worker count that divides the lanes (train.lanes), or no lanes setting"
            )
        return lanes

    def lane_streams(self) -> list[Iterator[CachedRecord]]:
        """This consumer's lanes, each a stream of records, in the order of their turns: the
        consumer's next item comes from the first, the one after from the second, and so on
        around (see the module docstring)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (0, 0)
        lanes = self.lanes_for(workers)
        consumers = min(max(workers, 1), lanes)
        if worker >= consumers:
            return []
        own = list(range(self.rank, self._num_windows, self.world_size))
        done, consumed = copy.deepcopy(self._done), copy.deepcopy(self._consumed)
        turns = [(self._items + worker + k * consumers) % lanes for k in range(lanes // consumers)]
        return [self._lane_records(own[lane::lanes], done, consumed) for lane in turns]

    def __iter__(self) -> Iterator[CachedRecord]:
        return round_robin(self.lane_streams())

    def _lane_records(self, windows: list[int], done: dict[int, set[int]],
                      consumed: dict[int, dict[int, int]]) -> Iterator[CachedRecord]:
        """The records of a lane's ``windows``, epoch after epoch, from the first open one."""
        epoch, empty_epochs = self._first_open, 0
        while self.epochs is None or epoch < self.epochs:
            order, nonempty = self._plan(epoch)
            yielded = 0
            for window in windows:
                if not nonempty[window] or window in done.get(epoch, ()):
                    continue
                blocks = order[window * self._window_blocks:(window + 1) * self._window_blocks]
                start = consumed.get(epoch, {}).get(window, 0)
                for record in self._read_window(epoch, window, blocks, start):
                    yielded += 1
                    yield record
            # without shuffling or sampling every epoch is the same: an endless stream whose
            # share of one was empty would spin forever (and stall a DataLoader)
            if not (yielded or done.get(epoch) or self.shuffle_buffer or self.lang_alpha != 1.0):
                return
            # with shuffling, an epoch can leave this lane empty by chance, but not many in
            # a row unless the split itself is empty (e.g. every record held out)
            empty_epochs = 0 if yielded else empty_epochs + 1
            if empty_epochs >= _MAX_EMPTY_EPOCHS:
                return
            epoch += 1

    def _read_window(self, epoch: int, window: int, blocks: np.ndarray,
                     start: int) -> Iterator[CachedRecord]:
        if self._pid != os.getpid():  # a DataLoader worker (pickled or forked): its own reader
            self._reader, self._pid, self._verified = CacheReader(self._url), os.getpid(), set()
            if self._reader.manifest.config_fingerprint != self._manifest.config_fingerprint:
                raise IncompatibleCacheError(f"{self._url} was rebuilt with another configuration")
        parts = []
        for b in blocks.tolist():
            shard = int(self._block_shard[b])
            entry = self._manifest.shards[shard]
            if entry.path in self.skip_shards:
                continue
            try:
                if self.verify and shard not in self._verified:
                    self._reader.check_shard(entry)
                    self._verified.add(shard)
                parts.append(self._reader.read_block(entry, int(self._block_index[b])))
            except CorruptShardError as error:
                raise corrupt_shard_error(str(error), cache=self._url) from None
        if not parts:
            return
        # the window's records are numbered across its blocks, which are never concatenated:
        # a copy of every column would cost more than the per-record lookup of its block
        firsts = np.cumsum([0] + [part.num_records for part in parts])
        rows = np.concatenate([self._select(part, epoch) + first for part, first in zip(parts, firsts[:-1], strict=True)])
        if self.shuffle_buffer > 0:
            rng = np.random.default_rng([self.seed, epoch, window, _SALT_RECORDS])
            rows = rows[rng.permutation(len(rows))]
        if start < len(rows):
            yield from _records(parts, firsts, self.layout, rows, start, (epoch, window))

    # ------------------------------------------------------------------ progress

    def observe(self, cursors: Iterable[tuple[int, int, int, int]] | Any) -> None:
        """Note that the training loop consumed one item: a record, or a batch of records,
        with these cursors (a sequence of cursors, or an array / tensor of shape [B, 4]).
        Call it once per item, in the order the items came: the count says whose turn is next."""
        if not hasattr(cursors, "__len__"):
            cursors = list(cursors)
        self._items += 1
        for epoch, window, index, size in np.asarray(cursors, dtype=np.int64).reshape(-1, 4).tolist():
            if epoch < self._first_open or window in self._done.get(epoch, ()):
                continue
            self._latest = max(self._latest, epoch)
            consumed = self._consumed.setdefault(epoch, {})
            consumed[window] = max(consumed.get(window, 0), index + 1)
            if consumed[window] >= size:
                del consumed[window]
                self._done.setdefault(epoch, set()).add(window)
                if epoch in self._left and self._needs(epoch, window):
                    self._left[epoch] -= 1
        self._prune()

    def _needs(self, epoch: int, window: int) -> bool:
        """Whether this rank must finish ``window`` to finish ``epoch``."""
        return window % self.world_size == self.rank and bool(self._plan(epoch)[1][window])

    def _prune(self) -> None:
        while self._first_open <= self._latest:
            epoch = self._first_open
            if epoch not in self._left:
                done = self._done.get(epoch, set())
                self._left[epoch] = sum(1 for g in range(self.rank, self._num_windows, self.world_size)
                                        if g not in done and self._needs(epoch, g))
            if self._left[epoch] > 0:
                return
            for table in (self._done, self._consumed, self._left):
                table.pop(epoch, None)
            self._first_open += 1

    def state_dict(self) -> dict[str, Any]:
        """Progress and order settings, JSON-serialisable; covers this rank's windows."""
        return _state(self._settings(), self._num_windows, [self.rank, self.world_size],
                      self._first_open, self._done, self._consumed,
                      items={"world_size": self.world_size, "ranks": {str(self.rank): self._items}})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state``; raises ConfigError if it was saved for another order."""
        _check_state(state, self._settings())
        rank, world = state["coverage"]
        if world != 1 and (rank, world) != (self.rank, self.world_size):
            raise ConfigError(
                f"the state holds only rank {rank} of {world}'s progress, this dataset is rank "
                f"{self.rank} of {self.world_size}; merge all ranks' states with "
                "CacheDataset.merge_states to resume with another world size"
            )
        self._first_open, self._done, self._consumed = _progress(state)
        # the turn is kept only for the world size it was counted for (another one regroups
        # the windows, so no turn would give the same order) and in states that have one
        items = state.get("items") or {}
        same_world = items.get("world_size") == self.world_size
        self._items = int(items.get("ranks", {}).get(str(self.rank), 0)) if same_world else 0
        self._latest = max([self._first_open - 1, *self._done, *self._consumed])
        self._left = {}
        self._prune()

    @staticmethod
    def merge_states(states: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """One state from the states of all ranks of a run (for a DDP checkpoint)."""
        states = list(states)
        if not states:
            raise ConfigError("merge_states needs at least one state")
        for state in states:
            _check_state(state, states[0]["settings"])
        coverage = {tuple(s["coverage"]) for s in states}
        if not any({r for r, w2 in coverage if w2 == w} == set(range(w)) for _, w in coverage):
            raise ConfigError(f"the states cover {sorted(coverage)} (rank, world size): not all ranks")
        windows = states[0]["windows_per_epoch"]
        first = min(s["first_open_epoch"] for s in states)
        done: dict[int, set[int]] = {}
        consumed: dict[int, dict[int, int]] = {}
        counted = [s["items"] for s in states if s.get("items")]
        items = {"world_size": counted[0]["world_size"] if counted else None, "ranks": {}}
        for count in counted:
            if count["world_size"] == items["world_size"]:
                items["ranks"].update(count["ranks"])
        for state in states:
            rank, world = state["coverage"]
            own_first, own_done, own_consumed = _progress(state)
            for epoch in range(first, own_first):  # complete for this state's windows
                done.setdefault(epoch, set()).update(range(rank, windows, world))
            for epoch, finished in own_done.items():
                done.setdefault(epoch, set()).update(finished)
            for epoch, counts in own_consumed.items():
                slot = consumed.setdefault(epoch, {})
                for window, n in counts.items():
                    slot[window] = max(slot.get(window, 0), n)
        for epoch, counts in consumed.items():
            for window in done.get(epoch, set()) & set(counts):
                del counts[window]
        while windows and len(done.get(first, ())) == windows:
            done.pop(first)
            consumed.pop(first, None)
            first += 1
        return _state(states[0]["settings"], windows, [0, 1], first, done, consumed, items=items)


# ---------------------------------------------------------------------- helpers


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        running = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if running else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if running else 1)
    return rank, world_size


class _Columns:
    """One block's columns as records are sliced from them (offsets from zero, input ids
    int64, small columns decoded; top-k left in their stored types)."""

    def __init__(self, block: RecordBlock, layout: RecordLayout) -> None:
        self.value_codec = layout.value_codec
        self.tok = block.token_offsets - block.token_offsets[0]
        self.lab = block.label_offsets
        self.ids = block.input_ids.astype(np.int64)
        self.context = (block.context_length.astype(np.int64) if layout.is_token_level
                        else np.zeros(block.num_records, np.int64))
        self.topk_ids, self.topk_values = block.topk_ids, block.topk_logprobs
        self.s_off = self.s_ids = self.s_counts = self.entropy = self.class_lp = self.labels = None
        self.target_logprob = None
        if layout.has_samples:
            self.s_off = block.sample_offsets - block.sample_offsets[0]
            self.s_ids, self.s_counts = block.sample_ids.astype(np.int64), block.sample_counts.astype(np.int64)
        if block.entropy is not None:
            self.entropy = block.entropy.astype(np.float32)
        if block.target_logprob is not None:
            self.target_logprob = block.target_logprob.astype(np.float32)
        if block.class_logprobs is not None:
            self.class_lp = block.decoded_class_logprobs(layout).astype(np.float32, copy=False)
            self.labels = block.label.astype(np.int64)
        self.record_ids, self.langs = block.record_id.tolist(), block.lang.tolist()

    def record(self, r: int, cursor: tuple[int, int, int, int]) -> CachedRecord:
        p0, p1 = int(self.lab[r]), int(self.lab[r + 1])
        s_off = self.s_off
        return CachedRecord(
            record_id=self.record_ids[r], lang=str(self.langs[r]), input_ids=self.ids[self.tok[r]:self.tok[r + 1]],
            context_length=int(self.context[r]),
            topk_ids=None if self.topk_ids is None else self.topk_ids[p0:p1],
            topk_values=None if self.topk_values is None else self.topk_values[p0:p1],
            sample_offsets=None if s_off is None else s_off[p0:p1 + 1] - s_off[p0],
            sample_ids=None if s_off is None else self.s_ids[s_off[p0]:s_off[p1]],
            sample_counts=None if s_off is None else self.s_counts[s_off[p0]:s_off[p1]],
            entropy=None if self.entropy is None else self.entropy[p0:p1],
            class_logprobs=None if self.class_lp is None else self.class_lp[r],
            label=-1 if self.labels is None else int(self.labels[r]),
            cursor=cursor, value_codec=self.value_codec,
            target_logprob=None if self.target_logprob is None else self.target_logprob[p0:p1],
        )


def _records(blocks: list[RecordBlock], firsts: np.ndarray, layout: RecordLayout, rows: np.ndarray,
             start: int, where: tuple[int, int]) -> Iterator[CachedRecord]:
    """The records ``rows[start:]`` of a window, numbered across its ``blocks`` (block b's
    records are ``firsts[b]:firsts[b + 1]``)."""
    columns = [_Columns(block, layout) for block in blocks]
    owner = np.searchsorted(firsts, rows, side="right") - 1
    local = rows - firsts[owner]
    for index in range(start, len(rows)):
        yield columns[owner[index]].record(int(local[index]), (*where, index, len(rows)))


def _to_ranges(values: set[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for value in sorted(values):
        if ranges and ranges[-1][1] == value:
            ranges[-1][1] = value + 1
        else:
            ranges.append([value, value + 1])
    return ranges


def round_robin(streams: Iterable[Iterator[Any]]) -> Iterator[Any]:
    """One item of each stream in turn, leaving out a stream once it is exhausted."""
    turns = deque(streams)
    while turns:
        stream = turns.popleft()
        for item in stream:
            yield item
            turns.append(stream)
            break


def _state(settings: dict[str, Any], windows: int, coverage: list[int], first: int,
           done: dict[int, set[int]], consumed: dict[int, dict[int, int]], *,
           items: dict[str, Any]) -> dict[str, Any]:
    epochs = sorted(e for e in set(done) | set(consumed) if e >= first)
    open_epochs = {str(e): {"done": _to_ranges(done.get(e, set())),  # [start, stop) ranges
                            "consumed": {str(g): n for g, n in sorted(consumed.get(e, {}).items())}}
                   for e in epochs}
    # coverage [rank, world]: the progress is that of the windows g with g % world == rank
    return {"format": _STATE_FORMAT, "settings": dict(settings), "windows_per_epoch": windows,
            "coverage": list(coverage), "first_open_epoch": first, "open_epochs": open_epochs,
            # items observed per rank, counted for this world size: whose lane's turn is next
            "items": items}


def _progress(state: dict[str, Any]) -> tuple[int, dict[int, set[int]], dict[int, dict[int, int]]]:
    epochs = state["open_epochs"].items()
    done = {int(e): {g for a, b in ep["done"] for g in range(a, b)} for e, ep in epochs}
    consumed = {int(e): {int(g): int(n) for g, n in ep["consumed"].items()} for e, ep in epochs}
    return int(state["first_open_epoch"]), done, consumed


def _check_state(state: dict[str, Any], settings: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ConfigError(f"not a CacheDataset state (expected format {_STATE_FORMAT!r})")
    saved = state["settings"]
    differences = [f"{key}: state {saved.get(key)!r}, dataset {value!r}"
                   for key, value in settings.items() if saved.get(key) != value]
    if differences:
        raise ConfigError("the state was saved for another data order; settings that differ:\n  "
                          + "\n  ".join(differences))
