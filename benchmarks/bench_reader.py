"""Stage two's reader: tokens/s from a cache on disk to the packed batches a training loop gets.

On a synthetic cache (``synthetic_topk.py`` labels; 32k vocabulary; k = 64, and k = 8 for
comparison; value codecs q8 and float16; Parquet and Zarr shards) this measures the whole
path a training step sees: ``CacheDataset`` (read each block with
``CacheReader.read_block``, join a shuffle window's blocks, decode the values to float32,
shuffle, slice records) -> ``PackedBatches`` / ``TokenPacker`` (records packed into
``TokenBatch``es of ``rows x 512`` slots, ``[B, L, k]`` float32 log-probs and int64 ids) ->
``torch.utils.data.DataLoader(batch_size=None)`` with 0 (in-process), 1 or 2 worker
processes, as ``train_students`` builds it. One epoch of the cache per run. For comparison,
the same dataset and packer run in 1 or 2 threads of the main process (``CacheDataset(rank=i,
world_size=n)`` splits the windows between them) feeding a queue: no worker processes, so
no shared-memory transfer.

Reported per (k, backend, codec, readers):

- **Mtok/s**: real (non-padding) tokens delivered per wall-clock second, from creating the
  iterator (worker start-up included) to the last batch; **per reader**: divided by the
  number of reading processes or threads;
- **Mtok per reader CPU-s**: tokens per CPU-second of the reading processes (measured inside
  each with ``time.process_time``, all threads; for threads, the whole process): the per-core
  rate even when other processes share the cores; **sys %**: the kernel's share of that
  CPU time (page faults on freshly allocated memory, mostly);
- **main CPU %**: CPU time of the consuming process per wall second (with workers it
  unpickles batches from shared memory and does nothing else here);
- **peak RSS +MB**: the largest growth of one reading process's resident memory (``VmHWM``
  after resetting it through ``/proc/self/clear_refs``): the shuffle window and its decoded
  columns live there.

Where the time goes, in-process, in CPU nanoseconds per token, timed in place during one
epoch of ``PackedBatches(CacheDataset)`` in this process: ``CacheReader.read_block``,
``RecordBlock.concat`` and ``RecordBlock.decoded_topk_logprobs`` are wrapped on their
classes for the epoch, the window's int64 widening is timed through an ndarray subclass
whose ``astype`` keeps time, ``TokenPacker.collate`` through an instance attribute; the rest
of the epoch is selection, shuffle, per-record slicing and the packer's loop. *to shm* is
what a DataLoader worker adds per batch: moving the batch's tensors into shared memory
(``share_memory_()``, as torch's multiprocessing reductions do when a worker queues a batch).

A prototype of three changes put numbers on them before they landed: (1) decode q8 values
``Q8_CHUNK_ROWS`` rows at a time, so that the running sum over k columns stays in cache;
(2) keep the window's top-k ids in their stored type (uint16 here) in the records and widen
them while packing; (3) in the packer, allocate the ``[B, L, k]`` outputs with ``np.empty``
and fill only the slots with no label. All three are now in the library (``value_codecs``,
``dataset``, ``collate``), so the prototype's decode and packer are the library's and the
prototype table shows what is left: its records skip the dataset's bookkeeping. Also timed: the shared-memory transfer of a
batch with int32 ids, and with ids and values in their stored types.

Per core as in ``bench_codecs.py``: numpy, Arrow, Zarr and torch thread pools are capped at
one thread (at n for the n-thread runs); in-process runs pin themselves to one CPU; each
DataLoader worker pins itself to a CPU of its own (worker i to the i-th allowed CPU); with one
worker the main process is pinned to the other CPU, with two it is left unpinned. Every cache
is read once untimed first (page cache warm; first touch of fresh memory is slow on a VM;
not with ``--quick``), then each figure is the best of ``--repeats`` runs.

Usage::

    python benchmarks/bench_reader.py [--tokens N] [--quick] [--out FILE.md]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: thread pools read these once

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import queue  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from bench_codecs import encode_block, machine_lines, make_template  # noqa: E402
from synthetic_topk import SyntheticRecords, make_records  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402

from logitcache.pipeline.collate import (  # noqa: E402
    PackedBatches,
    TokenBatch,
    TokenPacker,
    rows_for,
)
from logitcache.pipeline.dataset import CacheDataset, CachedRecord  # noqa: E402
from logitcache.storage_schemas.id_codec import id_type_for_vocab  # noqa: E402
from logitcache.storage_schemas.layout import RecordLayout  # noqa: E402
from logitcache.storage_schemas.manifest import Manifest  # noqa: E402
from logitcache.storage_schemas.records import RecordBlock  # noqa: E402
from logitcache.storage_schemas.shard_reader import CacheReader  # noqa: E402
from logitcache.storage_schemas.shard_writer import ShardWriter  # noqa: E402
from logitcache.storage_schemas.value_codecs import get_value_codec  # noqa: E402

VOCAB = 32_000
KS = (64, 8)
BACKENDS = ("parquet", "zarr")
CODECS = ("q8", "float16")
WORKERS = (0, 1, 2)  # DataLoader worker processes (0 = in-process)
THREADS = (1, 2)  # reader threads in the main process (an alternative to worker processes)
SHM_BATCHES = 32  # batches per repetition moved to shared memory to time it
MAX_LENGTH = 512
BATCH_TOKENS = 16_384
SHUFFLE_BUFFER = 4096
SEED = 0
# 10 shards of one 262,144-token block each (the default row_group_tokens): with a shuffle
# buffer of 4096 records (~4.5 blocks) the dataset cuts them into 2 windows of 5 blocks, so
# two workers get one equal window each and nobody idles at the end of the epoch.
DEFAULT_TOKENS = 2_621_440
DEFAULT_SHARD_TOKENS = 262_144
QUICK_TOKENS, QUICK_SHARD_TOKENS, QUICK_SHUFFLE_BUFFER, QUICK_CODECS = 65_536, 16_384, 100, "q8"
TARGET_TOKENS_S = 3e6  # per core, k = 64
Q8_CHUNK_ROWS = 4096  # prototype q8 decode: 256 KiB of uint8 levels per chunk


# ---------------------------------------------------------------- processes and cores


def cap_thread_pools() -> None:
    """One thread for Arrow, Zarr and torch in this process (numpy's are capped above)."""
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})
    torch.set_num_threads(1)


ALL_CPUS: list[int] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def pin_to(cpus: Sequence[int]) -> None:
    if ALL_CPUS:
        os.sched_setaffinity(0, set(cpus))


def _pin_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: worker i on the i-th CPU, one thread per pool."""
    cap_thread_pools()
    if ALL_CPUS:
        pin_to([ALL_CPUS[worker_id % len(ALL_CPUS)]])


def _proc_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class _Measured(IterableDataset):
    """Wraps a batch iterable; each reading process writes its CPU time, tokens and peak
    RSS growth to ``stats_dir`` when its share of the epoch is done."""

    def __init__(self, inner: IterableDataset, stats_dir: str) -> None:
        super().__init__()
        self.inner, self.stats_dir = inner, stats_dir

    def __iter__(self) -> Iterator[TokenBatch]:
        info = get_worker_info()
        rss0 = _proc_kb("VmRSS")
        _reset_peak_rss()
        cpu0, times0, tokens, batches = time.process_time(), os.times(), 0, 0
        for batch in self.inner:
            tokens += batch.tokens
            batches += 1
            yield batch
        times = os.times()
        user, system = times.user - times0.user, times.system - times0.system
        stats = {"worker": -1 if info is None else info.id, "cpu_s": time.process_time() - cpu0,
                 "sys_s": system, "user_s": user,
                 "tokens": tokens, "batches": batches,
                 "peak_mb": max(0, _proc_kb("VmHWM") - rss0) / 1024}
        Path(self.stats_dir, f"{os.getpid()}-{stats['worker']}.json").write_text(json.dumps(stats))


# ---------------------------------------------------------------- the synthetic cache


def shard_records(base: SyntheticRecords, index: int) -> SyntheticRecords:
    """Shard ``index``: ``base``'s records with fresh record ids and doc keys and its
    positions (top-k rows, input ids) permuted. The generator draws every position
    independently, so a permutation is another sample of the same distribution, and
    generating ~2.6M positions at k = 64 once per shard would take a minute."""
    rng = np.random.default_rng([SEED, index, 0x5A4D])
    rows = rng.permutation(base.num_tokens)
    records = len(base.record_id)
    return dataclasses.replace(
        base,
        record_id=rng.integers(0, 2**64, size=records, dtype=np.uint64),
        doc_key=np.array([f"{h:016x}" for h in rng.integers(0, 2**64, size=records, dtype=np.uint64).tolist()],
                         dtype=object),
        input_ids=base.input_ids[rng.permutation(base.num_tokens)],
        topk_ids=base.topk_ids[rows], topk_logprobs=base.topk_logprobs[rows],
    )


def layout_for(k: int, codec: str) -> RecordLayout:
    return RecordLayout(kind="token_topk", id_type=id_type_for_vocab(VOCAB), vocab_size=VOCAB, k=k,
                        value_codec=codec)


def write_caches(workdir: Path, tokens: int, shard_tokens: int,
                 configs: list[tuple[int, str, str]]) -> dict[tuple[int, str, str], str]:
    """One cache per (k, backend, codec), each of ceil(tokens / shard_tokens) shards."""
    urls = {cfg: str(workdir / "cache-k{}-{}-{}".format(*cfg)) for cfg in configs}
    writers = {cfg: ShardWriter(urls[cfg], template=make_template(layout_for(cfg[0], cfg[2]), cfg[1]))
               for cfg in configs}
    top_k = max(k for k, _, _ in configs)
    sizes = [shard_tokens] * (tokens // shard_tokens) + ([tokens % shard_tokens] if tokens % shard_tokens else [])
    base: SyntheticRecords | None = None
    for index, size in enumerate(sizes):
        if base is None or base.num_tokens != size:
            started = time.perf_counter()
            base = make_records(tokens=size, k=top_k, vocab_size=VOCAB, seed=SEED)
            progress(f"generated {size:,} positions at k={top_k} in {time.perf_counter() - started:.1f} s")
        shard = shard_records(base, index)
        for k in sorted({k for k, _, _ in configs}, reverse=True):
            records = shard.with_k(k) if k != top_k else shard
            for cfg in configs:
                if cfg[0] == k:
                    writers[cfg].commit(encode_block(records, layout_for(k, cfg[2])), unit_id=f"u{index:05d}")
        progress(f"shard {index + 1}/{len(sizes)} ({size:,} tokens) written to {len(writers)} caches")
    return urls


def window_blocks(manifest: Manifest, shuffle_buffer: int) -> int:
    """Blocks per shuffle window, as ``CacheDataset`` computes it from the manifest."""
    blocks = sum(s.blocks for s in manifest.shards)
    mean_records = max(manifest.total_records / max(blocks, 1), 1e-9)
    return max(1, math.ceil(shuffle_buffer / mean_records)) if shuffle_buffer else 1


# ---------------------------------------------------------------- prototype (this file only)


def proto_decode(block: RecordBlock, layout: RecordLayout) -> np.ndarray:
    # the chunked q8 decode this prototype measured is now the library's own
    return block.decoded_topk_logprobs(layout).astype(np.float32, copy=False)


def _add(acc: dict[str, float] | None, name: str, started: float) -> None:
    if acc is not None:
        acc[name] = acc.get(name, 0.0) + time.process_time() - started


def proto_records(block: RecordBlock, layout: RecordLayout, rows: np.ndarray, where: tuple[int, int],
                  acc: dict[str, float] | None = None) -> Iterator[CachedRecord]:
    """The dataset's per-record slicing with two changes: values decoded by
    :func:`proto_decode`, top-k ids left in their stored type (no int64 copy of the window)."""
    tok = block.token_offsets - block.token_offsets[0]
    lab = block.label_offsets
    ids = block.input_ids.astype(np.int64)
    context = block.context_length.astype(np.int64)
    topk_ids = block.topk_ids
    started = time.process_time()
    topk_lp = proto_decode(block, layout)
    _add(acc, "decode", started)
    entropy = None if block.entropy is None else block.entropy.astype(np.float32)
    record_ids, langs = block.record_id.tolist(), block.lang.tolist()
    size = len(rows)
    for index, r in enumerate(rows.tolist()):
        p0, p1 = int(lab[r]), int(lab[r + 1])
        yield CachedRecord(
            record_id=record_ids[r], lang=str(langs[r]), input_ids=ids[tok[r]:tok[r + 1]],
            context_length=int(context[r]), topk_ids=topk_ids[p0:p1], topk_logprobs=topk_lp[p0:p1],
            sample_offsets=None, sample_ids=None, sample_counts=None,
            entropy=None if entropy is None else entropy[p0:p1], class_logprobs=None, label=-1,
            cursor=(*where, index, size),
        )


def proto_stream(url: str, *, shuffle_buffer: int, seed: int = SEED, epoch: int = 0,
                 acc: dict[str, float] | None = None) -> Iterator[CachedRecord]:
    """One epoch, read as ``CacheDataset`` reads it (shuffled blocks cut into windows, each
    window's records shuffled), through :func:`proto_records`. Same work per token as the
    dataset with split 'all' and no language sampling; not the same order. ``acc`` collects
    CPU seconds of read, concat and decode."""
    reader = CacheReader(url)
    layout = reader.layout
    refs = [(entry, i) for entry in reader.shards for i in range(entry.blocks)]
    per_window = window_blocks(reader.manifest, shuffle_buffer)
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(refs))
    for window, start in enumerate(range(0, len(order), per_window)):
        parts = []
        for b in order[start:start + per_window].tolist():
            started = time.process_time()
            parts.append(reader.read_block(*refs[b]))
            _add(acc, "read", started)
        started = time.process_time()
        block = RecordBlock.concat(parts)
        _add(acc, "concat", started)
        del parts
        np.unique(block.lang.astype(str), return_inverse=True)  # the dataset's language bookkeeping
        rows = np.random.default_rng([seed, epoch, window, 2]).permutation(block.num_records)
        yield from proto_records(block, layout, rows, (epoch, window), acc)


# The prototype packer (outputs allocated empty, only unlabelled slots filled, stored-type
# ids widened while copied) is now the library's TokenPacker; the name stays for the report.
ProtoPacker = TokenPacker


def check_prototype(records: list[CachedRecord], layout: RecordLayout, packer: TokenPacker,
                    proto: ProtoPacker) -> None:
    """The prototype's batches equal ``TokenPacker``'s on the same records (ids narrowed)."""
    narrow = [dataclasses.replace(r, topk_ids=r.topk_ids.astype(layout.id_type)) for r in records]
    for ours, theirs in zip(proto.pack(narrow), packer.pack(records), strict=True):
        for spec in dataclasses.fields(TokenBatch):
            a, b = getattr(ours, spec.name), getattr(theirs, spec.name)
            same = (torch.equal(a, b) if isinstance(a, torch.Tensor)
                    else np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b)
            if not same:
                raise AssertionError(f"prototype packer differs from TokenPacker in {spec.name}")


# ---------------------------------------------------------------- measurements


@dataclass
class Run:
    k: int
    backend: str
    codec: str
    mode: str  # "in-process", "workers" (DataLoader processes) or "threads"
    readers: int  # reading processes or threads (1 in-process)
    tokens: int
    batches: int
    slots: int
    wall_s: float
    main_cpu_s: float  # the consuming process (nan for threads: one process does everything)
    reader_cpu_s: float  # the reading processes (threads: the whole process)
    sys_share: float  # of the readers' CPU time, the share spent in the kernel (page faults, mostly)
    peak_mb: float  # largest RSS growth of one reading process
    reader_tokens: list[int]  # tokens delivered per reader

    @property
    def label(self) -> str:
        if self.mode == "in-process":
            return "in-process"
        return f"{self.readers} {self.mode[:-1] if self.readers == 1 else self.mode}"


def _consume(batches: Iterator[TokenBatch]) -> tuple[int, int, int]:
    tokens = count = slots = 0
    for batch in batches:
        tokens += batch.tokens
        count += 1
        slots += batch.slots
    return tokens, count, slots


def run_loader(url: str, *, workers: int, shuffle_buffer: int, packer: TokenPacker, stats_dir: Path) -> Run:
    """One epoch through ``DataLoader(PackedBatches(CacheDataset))`` with ``workers`` processes."""
    for old in stats_dir.glob("*.json"):
        old.unlink()
    if workers == 0:
        pin_to(ALL_CPUS[:1])
    elif workers == 1 and len(ALL_CPUS) > 1:
        pin_to(ALL_CPUS[-1:])  # the worker takes the first CPU
    else:
        pin_to(ALL_CPUS)
    dataset = CacheDataset(url, seed=SEED, epochs=1, shuffle_buffer=shuffle_buffer)
    loader = DataLoader(_Measured(PackedBatches(dataset, packer), str(stats_dir)), batch_size=None,
                        num_workers=workers, worker_init_fn=_pin_worker if workers else None)
    cpu0, started = time.process_time(), time.perf_counter()
    iterator = iter(loader)
    tokens, batches, slots = _consume(iterator)
    wall = time.perf_counter() - started
    main_cpu = time.process_time() - cpu0
    del iterator, loader
    pin_to(ALL_CPUS[:1])
    stats = [json.loads(p.read_text()) for p in sorted(stats_dir.glob("*.json"))]
    if len(stats) != max(workers, 1) or sum(s["tokens"] for s in stats) != tokens:
        raise AssertionError(f"{url}: reader statistics incomplete ({len(stats)} files for {workers} workers)")
    layout = dataset.layout
    return Run(k=layout.k, backend=dataset.manifest.backend, codec=layout.value_codec,
               mode="workers" if workers else "in-process", readers=max(workers, 1), tokens=tokens,
               batches=batches, slots=slots, wall_s=wall, main_cpu_s=main_cpu,
               reader_cpu_s=sum(s["cpu_s"] for s in stats),
               sys_share=sum(s["sys_s"] for s in stats) / max(sum(s["sys_s"] + s["user_s"] for s in stats), 1e-9),
               peak_mb=max(s["peak_mb"] for s in stats),
               reader_tokens=[s["tokens"] for s in stats])


_DONE = object()


def run_threads(url: str, *, threads: int, shuffle_buffer: int, packer: TokenPacker) -> Run:
    """One epoch read by ``threads`` threads of this process, each iterating
    ``PackedBatches(CacheDataset(..., rank=i, world_size=threads))`` (so each reads its own
    windows, as DataLoader workers do) into a queue of ``2 x threads`` batches that the main
    thread drains: what a thread-based loader would deliver, with no shared-memory copies."""
    pin_to(ALL_CPUS)
    pa.set_cpu_count(threads)
    pa.set_io_thread_count(threads)
    zarr.config.set({"threading.max_workers": threads, "async.concurrency": threads})
    datasets = [CacheDataset(url, seed=SEED, epochs=1, shuffle_buffer=shuffle_buffer, rank=i, world_size=threads)
                for i in range(threads)]
    out: queue.Queue = queue.Queue(maxsize=2 * threads)
    delivered = [0] * threads

    def produce(index: int) -> None:
        try:
            for batch in PackedBatches(datasets[index], packer):
                delivered[index] += batch.tokens
                out.put(batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            out.put(exc)
        finally:
            out.put(_DONE)

    def batches() -> Iterator[TokenBatch]:
        running = threads
        while running:
            item = out.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    rss0 = _proc_kb("VmRSS")
    _reset_peak_rss()
    cpu0, times0, started = time.process_time(), os.times(), time.perf_counter()
    pool = [threading.Thread(target=produce, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    tokens, count, slots = _consume(batches())
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    times = os.times()
    system, user = times.system - times0.system, times.user - times0.user
    for thread in pool:
        thread.join()
    peak = max(0, _proc_kb("VmHWM") - rss0) / 1024
    cap_thread_pools()
    pin_to(ALL_CPUS[:1])
    layout = datasets[0].layout
    return Run(k=layout.k, backend=datasets[0].manifest.backend, codec=layout.value_codec, mode="threads",
               readers=threads, tokens=tokens, batches=count, slots=slots, wall_s=wall, main_cpu_s=math.nan,
               reader_cpu_s=cpu, sys_share=system / max(system + user, 1e-9), peak_mb=peak,
               reader_tokens=delivered)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(CPU seconds of this process, all threads, user + system; result of ``fn()``): CPU time,
    not wall time, so that other processes on the machine do not count."""
    started = time.process_time()
    out = fn()
    return time.process_time() - started, out


def _drain(iterable) -> int:
    n = 0
    for _ in iterable:
        n += 1
    return n


def _to_shared(batch: TokenBatch) -> None:
    """What a DataLoader worker does to each batch it queues: torch's reductions move every
    tensor's storage into shared memory (a new segment, then a copy)."""
    for spec in dataclasses.fields(batch):
        value = getattr(batch, spec.name)
        if isinstance(value, torch.Tensor):
            value.share_memory_()


_TORCH_TYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "uint32": torch.uint32, "float16": torch.float16,
                "float32": torch.float32}


def shm_costs(batch: TokenBatch, layout: RecordLayout, acc: dict[str, float]) -> None:
    """CPU seconds of moving ``batch`` to shared memory: with ids and values in their stored
    types (what a batch would weigh if they were widened and decoded after the transfer),
    with int32 ids, and as it is (int64 ids, float32 values; last, as it moves the batch)."""
    def copy(**changes: torch.Tensor) -> TokenBatch:  # fresh tensors, none of them shared yet
        tensors = {f.name: getattr(batch, f.name).clone() for f in dataclasses.fields(batch)
                   if isinstance(getattr(batch, f.name), torch.Tensor)}
        return dataclasses.replace(batch, **{**tensors, **changes})

    compact = {
        "shm_stored": copy(topk_ids=batch.topk_ids.to(_TORCH_TYPES[layout.id_type]),
                           topk_logprobs=batch.topk_logprobs.to(
                               _TORCH_TYPES[get_value_codec(layout.value_codec).storage_dtype])),
        "shm_int32": copy(topk_ids=batch.topk_ids.to(torch.int32)),
    }
    for name, variant in compact.items():
        acc[name] = acc.get(name, 0.0) + _timed(lambda variant=variant: _to_shared(variant))[0]
    del compact
    acc["shm"] = acc.get("shm", 0.0) + _timed(lambda: _to_shared(batch))[0]
    acc["shm_tokens"] = acc.get("shm_tokens", 0) + batch.tokens


class _TimedArray(np.ndarray):
    """A window column whose ``astype`` (the dataset's int64 widening) is timed into ``acc``."""

    acc: dict[str, float] = {}

    def astype(self, dtype, *args, **kwargs):
        started = time.process_time()
        out = np.asarray(self).astype(dtype, *args, **kwargs)
        _add(_TimedArray.acc, "widen", started)
        return out


def _timed_collate(packer: TokenPacker, acc: dict[str, float], layout: RecordLayout,
                   shm_batches: int) -> None:
    """Time ``packer.collate`` into ``acc["pack"]`` (an instance attribute shadowing the
    method; ``del packer.collate`` undoes it). The first ``shm_batches`` batches are also
    moved to shared memory (:func:`shm_costs`), timed into ``acc["excluded"]`` too."""
    collate = type(packer).collate.__get__(packer)

    def timed(records):
        started = time.process_time()
        batch = collate(records)
        done = time.process_time()
        acc["pack"] = acc.get("pack", 0.0) + done - started
        if acc.get("shm_batches", 0) < shm_batches:
            acc["shm_batches"] = acc.get("shm_batches", 0) + 1
            shm_costs(batch, layout, acc)
            _add(acc, "excluded", done)
        return batch

    packer.collate = timed


def instrumented_epoch(url: str, *, shuffle_buffer: int, packer: TokenPacker,
                       shm_batches: int) -> dict[str, float]:
    """One in-process epoch of ``PackedBatches(CacheDataset)`` (no DataLoader) with its parts
    timed in place: ``CacheReader.read_block``, ``RecordBlock.concat`` and
    ``RecordBlock.decoded_topk_logprobs`` wrapped on their classes, the window's int64
    widening through :class:`_TimedArray` columns, ``TokenPacker.collate`` on the instance.
    *records* = total - those: selection, shuffle, per-record slicing, the packer's loop."""
    layout = packer.layout
    acc: dict[str, float] = {}
    orig_read = CacheReader.read_block
    orig_concat = RecordBlock.__dict__["concat"]
    orig_decode = RecordBlock.decoded_topk_logprobs

    def read_block(self, entry, index):
        started = time.process_time()
        try:
            return orig_read(self, entry, index)
        finally:
            _add(acc, "read", started)

    def concat(blocks):
        started = time.process_time()
        window = orig_concat.__func__(blocks)
        for name in ("topk_ids", "input_ids"):
            if getattr(window, name) is not None:
                setattr(window, name, getattr(window, name).view(_TimedArray))
        _add(acc, "concat", started)
        return window

    def decoded(self, layout_):
        started = time.process_time()
        try:
            return orig_decode(self, layout_)
        finally:
            _add(acc, "decode", started)

    _TimedArray.acc = acc
    _timed_collate(packer, acc, layout, shm_batches)
    CacheReader.read_block, RecordBlock.concat, RecordBlock.decoded_topk_logprobs = (
        read_block, staticmethod(concat), decoded)
    try:
        dataset = CacheDataset(url, seed=SEED, epochs=1, shuffle_buffer=shuffle_buffer)
        times = os.times()
        acc["total"] = _timed(lambda: _drain(PackedBatches(dataset, packer)))[0]
        after = os.times()
    finally:
        CacheReader.read_block, RecordBlock.concat, RecordBlock.decoded_topk_logprobs = (
            orig_read, orig_concat, orig_decode)
        del packer.collate
        _TimedArray.acc = {}
    acc["sys"] = (after.system - times.system) / max(after.system - times.system + after.user - times.user, 1e-9)
    acc["total"] -= acc.get("excluded", 0.0)
    return acc


def prototype_epoch(url: str, *, shuffle_buffer: int, proto: ProtoPacker) -> dict[str, float]:
    """One in-process epoch of the prototype, its read, concat, decode and collate timed in
    place; also its peak RSS growth."""
    acc: dict[str, float] = {}
    _timed_collate(proto, acc, proto.layout, 0)
    rss0 = _proc_kb("VmRSS")
    _reset_peak_rss()
    try:
        times = os.times()
        acc["total"] = _timed(lambda: _drain(proto.pack(proto_stream(url, shuffle_buffer=shuffle_buffer, acc=acc))))[0]
        after = os.times()
    finally:
        del proto.collate
    acc["sys"] = (after.system - times.system) / max(after.system - times.system + after.user - times.user, 1e-9)
    acc["peak_mb"] = max(0, _proc_kb("VmHWM") - rss0) / 1024
    return acc


def breakdown(url: str, *, shuffle_buffer: int, packer: TokenPacker, proto: ProtoPacker,
              repeats: int, shm_batches: int) -> dict[str, dict[str, float]]:
    """In-process, one core: the parts of the best of ``repeats`` instrumented epochs, now
    (``now``) and with the prototype (``proto``), in CPU seconds; shared-memory costs per
    token (best of the repetitions)."""
    pin_to(ALL_CPUS[:1])
    layout = packer.layout
    records = list(itertools.islice(CacheDataset(url, seed=SEED, epochs=1, shuffle_buffer=shuffle_buffer), 300))
    check_prototype(records, layout, packer, proto)
    del records
    best: dict[str, dict[str, float]] = {"now": {"total": math.inf}, "proto": {"total": math.inf}, "shm": {}}
    for _ in range(repeats):
        now = instrumented_epoch(url, shuffle_buffer=shuffle_buffer, packer=packer, shm_batches=shm_batches)
        if now["total"] < best["now"]["total"]:
            best["now"] = now
        for name in ("shm", "shm_int32", "shm_stored"):
            best["shm"][name] = min(best["shm"].get(name, math.inf), now[name] / now["shm_tokens"])
        proto_run = prototype_epoch(url, shuffle_buffer=shuffle_buffer, proto=proto)
        if proto_run["total"] < best["proto"]["total"]:
            best["proto"] = proto_run
    tokens = CacheReader(url).manifest.total_tokens
    for part in (best["now"], best["proto"]):
        part["records"] = part["total"] - sum(part.get(x, 0.0) for x in ("read", "concat", "decode", "widen", "pack"))
        part["tokens"] = tokens
    return best


# ---------------------------------------------------------------- report


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _m(x: float) -> str:
    return "-" if x != x else f"{x / 1e6:.2f}"


PARTS = ("read", "concat", "decode", "widen", "records", "pack")
Parts = dict[tuple[int, str, str], dict[str, dict[str, float]]]


def _ns(part: dict[str, float], *names: str) -> str:
    return f"{1e9 * sum(part.get(n, 0.0) for n in names) / part['tokens']:.0f}"


def render(runs: list[Run], parts: Parts, *, command: str, tokens: int, shard_tokens: int,
           shuffle_buffer: int, windows: tuple[int, int], repeats: int, seconds: float,
           load: tuple[tuple[float, ...], tuple[float, ...]], quick: bool = False) -> str:
    rows = rows_for(BATCH_TOKENS, MAX_LENGTH)
    fill = sum(r.tokens for r in runs) / max(sum(r.slots for r in runs), 1)
    budget = 1e9 / TARGET_TOKENS_S
    out = [
        f"Command: `{command}`",
        "",
        *machine_lines(),
        f"- torch {torch.__version__}; DataLoader start method {torch.multiprocessing.get_start_method()}, "
        f"sharing strategy {torch.multiprocessing.get_sharing_strategy()}",
        f"- cache: {tokens:,} tokens (every one a labelled position) in {math.ceil(tokens / shard_tokens)} "
        f"shards of up to {shard_tokens:,} tokens, one block each; records of 64..512 tokens; vocab "
        f"{VOCAB // 1000}k; synthetic labels (`synthetic_topk.py`, seed {SEED}; each shard permutes the "
        "positions of one generated sample)",
        f"- reader: `CacheDataset(seed={SEED}, epochs=1, shuffle_buffer={shuffle_buffer:,})`: "
        f"{windows[0]} windows of {windows[1]} blocks; `TokenPacker(rows={rows}, length={MAX_LENGTH})` "
        f"(batch_tokens {BATCH_TOKENS:,}); slots holding real tokens: {100 * fill:.1f}%",
        f"- {'no warm-up (--quick)' if quick else 'each cache read once untimed first (page cache, first touch of memory)'}"
        f", then the best of {repeats} run(s); thread pools capped at 1 (n-thread runs: at n); in-process runs pinned to "
        "one CPU, each worker to its own (the main process to the other CPU with 1 worker, unpinned "
        f"with 2); load average before / after: {' '.join(f'{x:.2f}' for x in load[0])} / "
        f"{' '.join(f'{x:.2f}' for x in load[1])}; wall time {seconds:.0f} s",
        "",
        "### Tokens/s to packed batches",
        "",
        "One epoch per run. *Mtok/s*: real tokens delivered per wall second, start-up included. *per "
        "reader*: divided by the readers (processes or threads; 1 in-process). *per reader CPU-s*: "
        "tokens per CPU-second of the reading processes (threads: of the whole process), the per-core "
        "rate whatever else runs on the machine. *sys %*: the kernel's share of that CPU time (page "
        "faults on freshly allocated memory, mostly). *main CPU %*: the consuming process's CPU time "
        "per wall second (it only receives batches here). *peak RSS +MB*: the largest growth of one "
        "reading process's resident memory. *threads*: `CacheDataset(rank=i, world_size=n)` + "
        "`PackedBatches` in n threads of the main process feeding a queue, no DataLoader (an "
        "alternative, not what `train_students` does).",
        "",
        "| k | backend | codec | readers | Mtok/s | Mtok/s per reader | Mtok per reader CPU-s | sys % "
        "| main CPU % | peak RSS +MB |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        main = "-" if r.main_cpu_s != r.main_cpu_s else f"{100 * r.main_cpu_s / r.wall_s:.0f}"
        out.append(f"| {r.k} | {r.backend} | {r.codec} | {r.label} | {_m(r.tokens / r.wall_s)} "
                   f"| {_m(r.tokens / r.wall_s / r.readers)} | {_m(r.tokens / r.reader_cpu_s)} "
                   f"| {100 * r.sys_share:.0f} | {main} | {r.peak_mb:.0f} |")
    in_process = {(r.k, r.backend, r.codec): r for r in runs if r.mode == "in-process"}
    out += [
        "",
        "### Where the time goes (in-process, one core)",
        "",
        "CPU nanoseconds per token (`time.process_time`: user + system, page faults included, other "
        "processes excluded), all timed in place during one epoch of `PackedBatches(CacheDataset)` "
        "in this process (best of the runs by total): *read* = `CacheReader.read_block`; *concat* = "
        "`RecordBlock.concat` of a window's blocks; *decode* = `decoded_topk_logprobs` of a window; "
        "*widen* = the dataset's `astype(int64)` of the window's top-k ids and input ids; *pack* = "
        "`TokenPacker.collate`; *records* = the rest (selection, shuffle, per-record slicing into "
        "`CachedRecord`s, the packer's loop); *total* = the epoch; *sys %* = the kernel's share of "
        "it; *DataLoader* = the in-process DataLoader run above, for comparison; *to shm* = moving a "
        "packed batch into shared memory (`share_memory_()` on its tensors, as a DataLoader worker's "
        "queue does with every batch), on top of the total in a worker. At "
        f"{_m(TARGET_TOKENS_S)} M tokens/s a token may take {budget:.0f} ns.",
        "",
        "| k | backend | codec | read | concat | decode | widen | records | pack | total | sys % "
        "| DataLoader | to shm | total -> Mtok/s | read alone -> Mtok/s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (k, backend, codec), p in parts.items():
        now, n = p["now"], p["now"]["tokens"]
        run = in_process.get((k, backend, codec))
        loader = f"{1e9 * run.reader_cpu_s / n:.0f}" if run else "-"
        out.append(f"| {k} | {backend} | {codec} | " + " | ".join(_ns(now, x) for x in PARTS)
                   + f" | {_ns(now, 'total')} | {100 * now['sys']:.0f} | {loader} | {1e9 * p['shm']['shm']:.0f} "
                   f"| {_m(n / now['total'])} | {_m(n / now['read'])} |")
    out += [
        "",
        "### Prototype: chunked q8 decode, stored-type ids in records, no pre-fill in the packer",
        "",
        "*now -> prototype*, CPU nanoseconds per token timed in place as above. *decode*: "
        f"`decoded_topk_logprobs` -> q8 decoded {Q8_CHUNK_ROWS:,} rows at a time (float16 unchanged). "
        "*widen + records + pack*: the dataset's int64 widening, record slicing and `TokenPacker` -> "
        "records that keep the stored ids (uint16) and the prototype packer. *total*: the epoch "
        "(`proto_stream` + `ProtoPacker`: the same reads, windows and shuffles as the dataset, not the "
        "same order), with its tokens per CPU-second and the gain. *peak RSS*: the in-process "
        "DataLoader run above -> the prototype's epoch. *to shm*: moving a batch into shared memory "
        "as now (int64 ids, float32 values) / with int32 ids / with ids and values in their stored "
        "types. The prototype's batches are checked equal to `TokenPacker`'s.",
        "",
        "| k | backend | codec | decode | widen + records + pack | total | Mtok per CPU-s | gain "
        "| peak RSS +MB | to shm: now / int32 ids / stored types |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (k, backend, codec), p in parts.items():
        now, new, n = p["now"], p["proto"], p["now"]["tokens"]
        run = in_process.get((k, backend, codec))
        peak = f"{run.peak_mb:.0f}" if run else "-"
        rest = ("widen", "records", "pack")
        out.append(
            f"| {k} | {backend} | {codec} | {_ns(now, 'decode')} -> {_ns(new, 'decode')} "
            f"| {_ns(now, *rest)} -> {_ns(new, *rest)} | {_ns(now, 'total')} -> {_ns(new, 'total')} "
            f"| {_m(n / now['total'])} -> {_m(n / new['total'])} | {100 * (now['total'] / new['total'] - 1):+.0f}% "
            f"| {peak} -> {new['peak_mb']:.0f} "
            f"| {1e9 * p['shm']['shm']:.0f} / {1e9 * p['shm']['shm_int32']:.0f} / {1e9 * p['shm']['shm_stored']:.0f} |")
    out += ["", "### Against the target", "", *verdict(runs, parts)]
    return "\n".join(out) + "\n"


def verdict(runs: list[Run], parts: Parts) -> list[str]:
    lines = []
    k64 = [r for r in runs if r.k == 64]
    if not k64:
        return lines
    per_core = {(r.backend, r.codec, r.label): r.tokens / r.reader_cpu_s for r in k64}
    best_key = max(per_core, key=per_core.get)
    wall = {(r.backend, r.codec, r.label): r.tokens / r.wall_s / r.readers for r in k64}
    met = [key for key, rate in per_core.items() if rate >= TARGET_TOKENS_S]
    lines.append(
        f"- Target >= {_m(TARGET_TOKENS_S)} M tokens/s per core at k=64: "
        + ("met by " + ", ".join("/".join(key) for key in met) if met else "**not met** by any cell")
        + f". Best: {'/'.join(best_key)} at {_m(per_core[best_key])} M tokens per reader CPU-second "
        f"(range {_m(min(per_core.values()))}..{_m(max(per_core.values()))}); per reader and wall second "
        f"{_m(min(wall.values()))}..{_m(max(wall.values()))}.")
    for (k, backend, codec), p in parts.items():
        if k != 64:
            continue
        now, n = p["now"], p["now"]["tokens"]
        shares = {x: now.get(x, 0.0) / now["total"] for x in PARTS}
        top = sorted(shares, key=shares.get, reverse=True)[:3]
        over = ", more than the whole budget" if n / now["read"] < TARGET_TOKENS_S else ""
        lines.append(
            f"- k=64 {backend}/{codec}: {_ns(now, 'total')} ns/token in-process against a budget of "
            f"{1e9 / TARGET_TOKENS_S:.0f}; read_block alone {_ns(now, 'read')} ns "
            f"({_m(n / now['read'])} M tokens/s{over}); largest parts "
            + ", ".join(f"{x} {100 * shares[x]:.0f}%" for x in top)
            + f"; a DataLoader worker adds {1e9 * p['shm']['shm']:.0f} ns per token to move the batch to "
            f"shared memory; the prototype's epoch takes {_ns(p['proto'], 'total')} ns "
            f"({_m(n / p['proto']['total'])} M tokens per CPU-second).")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"tokens in the cache (default {DEFAULT_TOKENS:,}; {QUICK_TOKENS:,} with --quick)")
    parser.add_argument("--shard-tokens", type=int, default=None,
                        help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, one row group / block; "
                             f"{QUICK_SHARD_TOKENS:,} with --quick)")
    parser.add_argument("--shuffle-buffer", type=int, default=None,
                        help=f"CacheDataset shuffle_buffer (default {SHUFFLE_BUFFER}; {QUICK_SHUFFLE_BUFFER} "
                             "with --quick, so that its tiny cache still has 2 windows)")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="top-k sizes (default %(default)s)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="default %(default)s")
    parser.add_argument("--codecs", default=None,
                        help=f"value codecs (default {','.join(CODECS)}; {QUICK_CODECS} with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, best reported (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny cache, one run: a smoke test, numbers too small to quote")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the caches go (default: system temp dir)")
    args = parser.parse_args(argv)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    shard_tokens = args.shard_tokens or (QUICK_SHARD_TOKENS if args.quick else DEFAULT_SHARD_TOKENS)
    shuffle_buffer = args.shuffle_buffer if args.shuffle_buffer is not None else (
        QUICK_SHUFFLE_BUFFER if args.quick else SHUFFLE_BUFFER)
    repeats = args.repeats or (1 if args.quick else 3)
    if tokens < 1 or shard_tokens < 1 or repeats < 1 or shuffle_buffer < 0:
        parser.error("--tokens, --shard-tokens and --repeats must be positive, --shuffle-buffer >= 0")
    codecs = args.codecs or (QUICK_CODECS if args.quick else ",".join(CODECS))
    configs = [(int(k), backend, codec) for k in args.ks.split(",") for backend in args.backends.split(",")
               for codec in codecs.split(",")]
    command = "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    cap_thread_pools()
    pin_to(ALL_CPUS[:1])
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs: list[Run] = []
    parts: Parts = {}
    rows = rows_for(BATCH_TOKENS, MAX_LENGTH)
    with tempfile.TemporaryDirectory(prefix="bench_reader-", dir=args.tmp_dir) as tmp:
        workdir = Path(tmp)
        stats_dir = workdir / "stats"
        stats_dir.mkdir()
        urls = write_caches(workdir, tokens, shard_tokens, configs)
        first = CacheReader(urls[configs[0]]).manifest
        per_window = window_blocks(first, shuffle_buffer)
        windows = (math.ceil(sum(s.blocks for s in first.shards) / per_window), per_window)
        for (k, backend, codec), url in urls.items():
            layout = layout_for(k, codec)
            packer = TokenPacker(layout, rows=rows, length=MAX_LENGTH)
            proto = ProtoPacker(layout, rows=rows, length=MAX_LENGTH)
            if not args.quick:  # warm-up: page cache, first touch of memory
                run_loader(url, workers=0, shuffle_buffer=shuffle_buffer, packer=packer, stats_dir=stats_dir)
            measurements = [("workers", w) for w in WORKERS] + [("threads", t) for t in THREADS]
            for mode, count in measurements:
                best = None
                for _ in range(repeats):
                    if mode == "workers":
                        run = run_loader(url, workers=count, shuffle_buffer=shuffle_buffer, packer=packer,
                                         stats_dir=stats_dir)
                    else:
                        run = run_threads(url, threads=count, shuffle_buffer=shuffle_buffer, packer=packer)
                    if run.tokens != tokens:
                        raise AssertionError(f"{url}: an epoch delivered {run.tokens} tokens, not {tokens}")
                    if best is None or run.wall_s < best.wall_s:
                        best = run
                runs.append(best)
                progress(f"k={k} {backend}/{codec} {best.label}: {_m(best.tokens / best.wall_s)} Mtok/s, "
                         f"{_m(best.tokens / best.reader_cpu_s)} Mtok per reader CPU-s, "
                         f"main CPU {best.main_cpu_s:.2f} s, peak +{best.peak_mb:.0f} MB, "
                         f"tokens per reader {best.reader_tokens}")
            parts[(k, backend, codec)] = breakdown(url, shuffle_buffer=shuffle_buffer, packer=packer, proto=proto,
                                                   repeats=repeats, shm_batches=SHM_BATCHES)
            p = parts[(k, backend, codec)]
            for name in ("now", "proto"):
                progress(f"k={k} {backend}/{codec} breakdown {name} (CPU ns/token): " + ", ".join(
                    f"{x} {_ns(p[name], x)}" for x in (*PARTS, "total")) + f", sys {100 * p[name]['sys']:.0f}%")
            progress(f"k={k} {backend}/{codec} to shm (CPU ns/token): "
                     + ", ".join(f"{x} {1e9 * v:.0f}" for x, v in p["shm"].items())
                     + f"; prototype peak +{p['proto']['peak_mb']:.0f} MB")
    report = render(runs, parts, command=command, tokens=tokens, shard_tokens=shard_tokens,
                    shuffle_buffer=shuffle_buffer, windows=windows, repeats=repeats,
                    seconds=time.perf_counter() - started, load=(load_before, os.getloadavg()),
                    quick=args.quick)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
