"""Stage two's reader: tokens/s from a cache on disk to the packed batches a training loop gets.

On a synthetic cache (``synthetic_topk.py`` labels; 32k vocabulary; k = 64, and k = 8 for
comparison; value codecs q8 and float16; Parquet and Zarr shards, compressed with zstd, with lz4 or not at all)
this measures the whole path a training step sees: ``CacheDataset`` (read each block with
``CacheReader.read_block``, shuffle a window's records, slice them) -> ``PackedBatches`` /
``TokenPacker`` (records packed into ``TokenBatch``es of ``rows x 512`` slots) ->
``torch.utils.data.DataLoader(batch_size=None)`` with 0 (in-process), 1 or 2 worker
processes, as ``train_students`` builds it (persistent workers). Each run takes two epochs
of the cache on one loader and times the second, when the reading processes are warm, as
they are for most of a training run.

With ``--cache PATH`` the labels are a trained teacher's instead (a top-k cache, e.g. one of
``bench_quality.py --caches-only``'s): its records, repeated with fresh record ids to fill the
shards, values re-encoded in each codec. Synthetic ids are independent draws; a real teacher's
neighbouring positions share many top ids, which format 4's gap rows turn into fewer bytes to
decompress, so the read side's cost on real outputs differs.

Two forms of batch: *stored*, what ``train_students`` ships (``TokenPacker(decode=False)``:
top-k ids and values in the cache's stored types, widened by ``TokenBatch.decoded()`` on the
trainer's device), and *decoded* (int64 ids, float32 log-probs packed on the host), run
in-process for comparison.

Reported per (k, backend, codec, compression, form, readers):

- **Mtok/s**: real (non-padding) tokens delivered per wall-clock second, from creating the
  timed epoch's iterator (workers already running) to its last batch; **per reader**: divided by the
  number of reading processes;
- **Mtok per reader CPU-s**: tokens per CPU-second of the reading processes (measured inside
  each with ``time.process_time``): the per-core rate even when other processes share the
  cores; **sys %**: the kernel's share of that CPU time (page faults on freshly allocated
  and shared memory, mostly);
- **main CPU %**: CPU time of the consuming process per wall second (with workers it
  maps the workers' batches and does nothing else here);
- **peak RSS +MB**: the largest growth of one reading process's resident memory over both
  epochs (``VmHWM`` after resetting it through ``/proc/self/clear_refs``).

Where the time goes, in-process, stored form, in CPU nanoseconds per token, timed in place
during one epoch: ``CacheReader.read_block`` (wrapped on its class), ``TokenPacker.collate``
(an instance attribute), the rest (selection, shuffle, per-record slicing, the packer's
loop); *to shm* is what a DataLoader worker would add per batch if it packed into ordinary
memory (``share_memory_()`` on its tensors, as torch's multiprocessing reductions do when a
worker queues a batch): the cost that ``PackedBatches``' slot ring (reused shared memory,
``pipeline/distill/shared_batches.py``) saves a worker; *decode*
is what ``TokenBatch.decoded()`` costs a trainer on the CPU (on a GPU it is a few
elementwise kernels).

Per core as in ``bench_codecs.py``: numpy, Arrow, Zarr and torch thread pools are capped at
one thread; in-process runs pin themselves to one CPU; each DataLoader worker pins itself to
a CPU of its own (worker i to the i-th allowed CPU); with one worker the main process is
pinned to the other CPU, with two it is left unpinned. Every cache is read once untimed
first (page cache warm; first touch of fresh memory is slow on a VM; not with ``--quick``),
then each figure is the best of ``--repeats`` runs.

Usage::

    python benchmarks/bench_reader.py [--ks 64] [--compressions zstd,lz4,none] [--quick] [--out FILE.md]
        [--cache PATH --ks K]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: thread pools read these once

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from bench_codecs import Source, encode_block, machine_lines, make_template, read_source, reencode  # noqa: E402
from synthetic_topk import SyntheticRecords, make_records  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402

from logitcache.pipeline.distill.collate import (  # noqa: E402
    PackedBatches,
    TokenBatch,
    TokenPacker,
    rows_for,
)
from logitcache.pipeline.distill.dataset import CacheDataset  # noqa: E402
from logitcache.storage_schemas.id_codec import id_type_for_vocab  # noqa: E402
from logitcache.storage_schemas.layout import RecordLayout  # noqa: E402
from logitcache.storage_schemas.manifest import Manifest  # noqa: E402
from logitcache.storage_schemas.records import RecordBlock  # noqa: E402
from logitcache.storage_schemas.shard_reader import CacheReader  # noqa: E402
from logitcache.storage_schemas.shard_writer import ShardWriter  # noqa: E402

VOCAB = 32_000
KS = (64, 8)
BACKENDS = ("parquet", "zarr")
CODECS = ("q8", "float16")
COMPRESSIONS = ("zstd", "lz4", "none")
WORKERS = (0, 1, 2)  # DataLoader worker processes (0 = in-process)
TIMED_BATCHES = 32  # batches per epoch also moved to shared memory and decoded, to time both
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

Config = tuple[int, str, str, str]  # (k, backend, codec, compression)


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
    RSS growth (since its first epoch began) to ``stats_dir`` when its share of an epoch is
    done."""

    def __init__(self, inner: IterableDataset, stats_dir: str) -> None:
        super().__init__()
        self.inner, self.stats_dir = inner, stats_dir
        self.rss0: int | None = None

    def __iter__(self) -> Iterator[TokenBatch]:
        info = get_worker_info()
        if self.rss0 is None:
            self.rss0 = _proc_kb("VmRSS")
            _reset_peak_rss()
        rss0 = self.rss0
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


def layout_for(k: int, codec: str, real: Source | None = None) -> RecordLayout:
    if real is not None:  # the source's columns, in another value codec
        return dataclasses.replace(real.layout, value_codec=codec)
    return RecordLayout(kind="token_topk", id_type=id_type_for_vocab(VOCAB), vocab_size=VOCAB, k=k,
                        value_codec=codec)


def real_source(url: str, tokens: int) -> Source:
    """Up to ``tokens`` labelled positions (whole records) of a top-k cache built by a trained teacher."""
    source, _ = read_source(url, tokens)
    if source.layout.kind != "token_topk":
        raise SystemExit(f"--cache {url}: a {source.layout.kind} cache; the reader benchmark takes a token_topk one")
    return source


def real_shard(source: Source, size: int, index: int) -> Source:
    """Shard ``index``: ``source``'s records from where shard ``index - 1`` stopped, round and round,
    until ``size`` tokens (whole records, so a shard may hold a few more), with fresh record ids and
    doc keys. The labels stay the teacher's own, with their structure (shared ids between
    neighbouring positions) that a synthetic generator lacks."""
    block = source.block
    ends = block.token_offsets
    record = int(np.searchsorted(ends, (index * size) % int(ends[-1]), side="right")) - 1
    ranges, total = [], 0  # contiguous record ranges, round and round the source
    while total < size:
        full_at = int(np.searchsorted(ends, ends[record] + size - total, side="left"))  # first record end past it
        stop = min(max(full_at, record + 1), block.num_records)
        ranges.append((record, stop))
        total += int(ends[stop] - ends[record])
        record = stop % block.num_records
    shard = RecordBlock.concat([block.take_records(a, b) for a, b in ranges])
    rng = np.random.default_rng([SEED, index, 0x5A4E])
    keys = rng.integers(0, 2**64, size=shard.num_records, dtype=np.uint64)
    shard = dataclasses.replace(shard, record_id=keys,
                                doc_key=np.array([f"{h:016x}" for h in keys.tolist()], dtype=object))
    labels = block.label_offsets
    lp = np.concatenate([source.logprobs[labels[a]:labels[b]] for a, b in ranges])
    return Source(name=source.name, block=shard, layout=source.layout, logprobs=lp)


def write_caches(workdir: Path, tokens: int, shard_tokens: int, configs: list[Config],
                 real: Source | None = None) -> dict[Config, str]:
    """One cache per (k, backend, codec, compression), each of ceil(tokens / shard_tokens) shards:
    synthetic labels, or ``real``'s records when given."""
    urls = {cfg: str(workdir / "cache-k{}-{}-{}-{}".format(*cfg)) for cfg in configs}
    writers = {}
    for cfg in configs:
        template = make_template(layout_for(cfg[0], cfg[2], real), cfg[1])
        template.storage["compression"] = cfg[3]
        writers[cfg] = ShardWriter(urls[cfg], template=template)
    top_k = max(cfg[0] for cfg in configs)
    sizes = [shard_tokens] * (tokens // shard_tokens) + ([tokens % shard_tokens] if tokens % shard_tokens else [])
    if real is not None:
        for index, size in enumerate(sizes):
            shard = real_shard(real, size, index)
            for cfg in configs:
                writers[cfg].commit(reencode(shard, layout_for(cfg[0], cfg[2], real)), unit_id=f"u{index:05d}")
            progress(f"shard {index + 1}/{len(sizes)} ({shard.block.token_offsets[-1]:,} tokens of {real.name}) "
                     f"written to {len(writers)} caches")
        return urls
    base: SyntheticRecords | None = None
    for index, size in enumerate(sizes):
        if base is None or base.num_tokens != size:
            started = time.perf_counter()
            base = make_records(tokens=size, k=top_k, vocab_size=VOCAB, seed=SEED)
            progress(f"generated {size:,} positions at k={top_k} in {time.perf_counter() - started:.1f} s")
        shard = shard_records(base, index)
        for k in sorted({cfg[0] for cfg in configs}, reverse=True):
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


# ---------------------------------------------------------------- measurements


@dataclass
class Run:
    k: int
    backend: str
    codec: str
    compression: str
    form: str  # "stored" (what train_students ships) or "decoded"
    readers: int  # reading processes (1 in-process)
    in_process: bool
    tokens: int
    batches: int
    slots: int
    wall_s: float
    main_cpu_s: float  # the consuming process
    reader_cpu_s: float  # the reading processes
    sys_share: float  # of the readers' CPU time, the share spent in the kernel (page faults, mostly)
    peak_mb: float  # largest RSS growth of one reading process
    reader_tokens: list[int]  # tokens delivered per reader

    @property
    def label(self) -> str:
        if self.in_process:
            return "in-process"
        return f"{self.readers} worker{'s' if self.readers > 1 else ''}"


def _consume(batches: Iterator[TokenBatch]) -> tuple[int, int, int]:
    tokens = count = slots = 0
    for batch in batches:
        tokens += batch.tokens
        count += 1
        slots += batch.slots
    return tokens, count, slots


def run_loader(url: str, cfg: Config, *, workers: int, shuffle_buffer: int, packer: TokenPacker,
               stats_dir: Path) -> Run:
    """One timed epoch through ``DataLoader(PackedBatches(CacheDataset))`` with ``workers``
    processes, after an untimed one on the same loader: persistent workers, as
    ``train_students`` has them, so the timed epoch sees warm processes, as a long run does."""
    if workers == 0:
        pin_to(ALL_CPUS[:1])
    elif workers == 1 and len(ALL_CPUS) > 1:
        pin_to(ALL_CPUS[-1:])  # the worker takes the first CPU
    else:
        pin_to(ALL_CPUS)
    dataset = CacheDataset(url, seed=SEED, epochs=1, shuffle_buffer=shuffle_buffer)
    loader = DataLoader(_Measured(PackedBatches(dataset, packer), str(stats_dir)), batch_size=None,
                        num_workers=workers, worker_init_fn=_pin_worker if workers else None,
                        persistent_workers=workers > 0)
    _consume(iter(loader))  # the untimed epoch
    for old in stats_dir.glob("*.json"):
        old.unlink()
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
    return Run(k=cfg[0], backend=cfg[1], codec=cfg[2], compression=cfg[3],
               form="decoded" if packer.decode else "stored", readers=max(workers, 1), in_process=workers == 0,
               tokens=tokens, batches=batches, slots=slots, wall_s=wall, main_cpu_s=main_cpu,
               reader_cpu_s=sum(s["cpu_s"] for s in stats),
               sys_share=sum(s["sys_s"] for s in stats) / max(sum(s["sys_s"] + s["user_s"] for s in stats), 1e-9),
               peak_mb=max(s["peak_mb"] for s in stats),
               reader_tokens=[s["tokens"] for s in stats])


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(CPU seconds of this process, user + system; result of ``fn()``): CPU time, not wall
    time, so that other processes on the machine do not count."""
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


def instrumented_epoch(url: str, *, shuffle_buffer: int, packer: TokenPacker) -> dict[str, float]:
    """One in-process epoch of ``PackedBatches(CacheDataset)`` (no DataLoader) with its parts
    timed in place: ``CacheReader.read_block`` wrapped on its class, ``TokenPacker.collate``
    on the instance; *records* = total - those. The first ``TIMED_BATCHES`` batches are also
    moved to shared memory and decoded (on copies), timed apart and left out of the total."""
    acc: dict[str, float] = {}
    orig_read = CacheReader.read_block
    collate = type(packer).collate.__get__(packer)

    def read_block(self, entry, index):
        started = time.process_time()
        try:
            return orig_read(self, entry, index)
        finally:
            acc["read"] = acc.get("read", 0.0) + time.process_time() - started

    def timed_collate(records, **kwargs):
        started = time.process_time()
        batch = collate(records, **kwargs)
        done = time.process_time()
        acc["pack"] = acc.get("pack", 0.0) + done - started
        if acc.get("extra_batches", 0) < TIMED_BATCHES:
            acc["extra_batches"] = acc.get("extra_batches", 0) + 1
            acc["extra_tokens"] = acc.get("extra_tokens", 0) + batch.tokens
            fresh = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).clone()
                                                  for f in dataclasses.fields(batch)
                                                  if isinstance(getattr(batch, f.name), torch.Tensor)})
            acc["decode"] = acc.get("decode", 0.0) + _timed(fresh.decoded)[0]
            acc["shm"] = acc.get("shm", 0.0) + _timed(lambda: _to_shared(fresh))[0]
            acc["excluded"] = acc.get("excluded", 0.0) + time.process_time() - done
        return batch

    packer.collate = timed_collate
    CacheReader.read_block = read_block
    try:
        dataset = CacheDataset(url, seed=SEED, epochs=1, shuffle_buffer=shuffle_buffer)
        times = os.times()
        acc["total"] = _timed(lambda: _drain(PackedBatches(dataset, packer)))[0]
        after = os.times()
    finally:
        CacheReader.read_block = orig_read
        del packer.collate
    acc["sys"] = (after.system - times.system) / max(after.system - times.system + after.user - times.user, 1e-9)
    acc["total"] -= acc.pop("excluded", 0.0)
    acc["records"] = acc["total"] - acc.get("read", 0.0) - acc.get("pack", 0.0)
    acc["tokens"] = CacheReader(url).manifest.total_tokens
    for name in ("decode", "shm"):  # per token of the batches they were timed on
        acc[name] = acc.get(name, 0.0) / max(acc.get("extra_tokens", 0), 1) * acc["tokens"]
    return acc


def breakdown(url: str, *, shuffle_buffer: int, packer: TokenPacker, repeats: int) -> dict[str, float]:
    """In-process, one core: the parts of the best of ``repeats`` instrumented epochs."""
    pin_to(ALL_CPUS[:1])
    runs = [instrumented_epoch(url, shuffle_buffer=shuffle_buffer, packer=packer) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["total"])
    best["shm"], best["decode"] = min(r["shm"] for r in runs), min(r["decode"] for r in runs)
    return best


# ---------------------------------------------------------------- report


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _m(x: float) -> str:
    return "-" if x != x else f"{x / 1e6:.2f}"


PARTS = ("read", "records", "pack", "total", "shm", "decode")
Parts = dict[Config, dict[str, float]]


def _ns(part: dict[str, float], *names: str) -> str:
    return f"{1e9 * sum(part.get(n, 0.0) for n in names) / part['tokens']:.0f}"


def render(runs: list[Run], parts: Parts, *, command: str, tokens: int, shard_tokens: int,
           shuffle_buffer: int, windows: tuple[int, int], repeats: int, seconds: float,
           load: tuple[tuple[float, ...], tuple[float, ...]], quick: bool = False,
           real: Source | None = None) -> str:
    rows = rows_for(BATCH_TOKENS, MAX_LENGTH)
    fill = sum(r.tokens for r in runs) / max(sum(r.slots for r in runs), 1)
    budget = 1e9 / TARGET_TOKENS_S
    out = [
        f"Command: `{command}`",
        "",
        *machine_lines(),
        f"- torch {torch.__version__}; DataLoader start method {torch.multiprocessing.get_start_method()}, "
        f"sharing strategy {torch.multiprocessing.get_sharing_strategy()}",
        (f"- cache: {tokens:,} tokens (every one a labelled position) in {math.ceil(tokens / shard_tokens)} "
         f"shards of up to {shard_tokens:,} tokens, one block each; records of 64..512 tokens; vocab "
         f"{VOCAB // 1000}k (uint16 ids); synthetic labels (`synthetic_topk.py`, seed {SEED}; each shard "
         "permutes the positions of one generated sample)" if real is None else
         f"- cache: {math.ceil(tokens / shard_tokens)} shards of about {shard_tokens:,} tokens (whole records), "
         f"one block each, cut from the {real.block.num_records:,} records ({real.block.num_positions:,} "
         f"labelled positions) of `{real.name}` (vocabulary {real.layout.vocab_size:,}, {real.layout.id_type} "
         f"ids, top-{real.layout.k}), round and round with fresh record ids; values re-encoded from their "
         "float32 decode in each codec"),
        f"- reader: `CacheDataset(seed={SEED}, epochs=1, shuffle_buffer={shuffle_buffer:,})`: "
        f"{windows[0]} windows of {windows[1]} blocks; `TokenPacker(rows={rows}, length={MAX_LENGTH})` "
        f"(batch_tokens {BATCH_TOKENS:,}); slots holding real tokens: {100 * fill:.1f}%",
        f"- {'no warm-up (--quick)' if quick else 'each cache read once untimed first (page cache, first touch of memory)'}"
        f", then the best of {repeats} run(s); thread pools capped at 1; in-process runs pinned to one CPU, "
        "each worker to its own (the main process to the other CPU with 1 worker, unpinned with 2); load "
        f"average before / after: {' '.join(f'{x:.2f}' for x in load[0])} / "
        f"{' '.join(f'{x:.2f}' for x in load[1])}; wall time {seconds:.0f} s",
        "",
        "#### Tokens/s to packed batches",
        "",
        "Two epochs per run on one loader (persistent workers), the second timed. *form*: `stored` = top-k in the cache's stored types, what `train_students` "
        "ships and widens on the device; `decoded` = int64 ids and float32 log-probs packed on the host. "
        "*Mtok/s*: real tokens delivered per wall second of the timed (second) epoch. *per reader*: divided by "
        "the reading processes. *per reader CPU-s*: tokens per CPU-second of the reading processes, the "
        "per-core rate whatever else runs on the machine. *sys %*: the kernel's share of that CPU time. "
        "*main CPU %*: the consuming process's CPU time per wall second. *peak RSS +MB*: the largest "
        "growth of one reading process's resident memory.",
        "",
        "| k | backend | codec | compression | form | readers | Mtok/s | Mtok/s per reader "
        "| Mtok per reader CPU-s | sys % | main CPU % | peak RSS +MB |",
        "|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        out.append(f"| {r.k} | {r.backend} | {r.codec} | {r.compression} | {r.form} | {r.label} "
                   f"| {_m(r.tokens / r.wall_s)} | {_m(r.tokens / r.wall_s / r.readers)} "
                   f"| {_m(r.tokens / r.reader_cpu_s)} | {100 * r.sys_share:.0f} "
                   f"| {100 * r.main_cpu_s / r.wall_s:.0f} | {r.peak_mb:.0f} |")
    out += [
        "",
        "#### Where the time goes (stored form, in-process, one core)",
        "",
        "CPU nanoseconds per token (`time.process_time`: user + system, page faults included), timed in "
        "place during one epoch of `PackedBatches(CacheDataset)` in this process (best of the runs by "
        "total): *read* = `CacheReader.read_block`; *pack* = `TokenPacker.collate`; *records* = the rest "
        "(selection, shuffle, per-record slicing, the packer's loop); *total* = the epoch; *sys %* = "
        "the kernel's share of it. Not in the total: *to shm* = moving a batch into shared memory "
        "(`share_memory_()` on its tensors, as a DataLoader worker's queue does with every batch packed in "
        "ordinary memory; the workers' slot ring of reused shared memory avoids it); "
        "*decode on CPU* = `TokenBatch.decoded()` on the host, what a trainer on the CPU pays (on a GPU "
        f"it runs on the device). At {_m(TARGET_TOKENS_S)} M tokens/s a token may take {budget:.0f} ns.",
        "",
        "*shard B/token*: the cache's shard bytes per token, what the compression saves.",
        "",
        "| k | backend | codec | compression | shard B/token | read | records | pack | total | sys % | to shm "
        "| decode on CPU | total -> Mtok/s | read alone -> Mtok/s |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (k, backend, codec, compression), p in parts.items():
        n = p["tokens"]
        out.append(f"| {k} | {backend} | {codec} | {compression} | {p['shard_bytes'] / n:.1f} "
                   f"| {_ns(p, 'read')} | {_ns(p, 'records')} "
                   f"| {_ns(p, 'pack')} | {_ns(p, 'total')} | {100 * p['sys']:.0f} | {_ns(p, 'shm')} "
                   f"| {_ns(p, 'decode')} | {_m(n / p['total'])} | {_m(n / p['read'])} |")
    out += ["", "#### Against the target", "", *verdict(runs)]
    return "\n".join(out) + "\n"


def verdict(runs: list[Run]) -> list[str]:
    lines = []
    for label, chosen in (("in-process", [r for r in runs if r.in_process]),
                          ("through DataLoader workers", [r for r in runs if not r.in_process])):
        k64 = [r for r in chosen if r.k == 64]
        if not k64:
            continue
        rate = {f"{r.backend}/{r.codec}/{r.compression}/{r.form}/{r.label}": r.tokens / r.reader_cpu_s for r in k64}
        met = sorted((key for key, value in rate.items() if value >= TARGET_TOKENS_S), key=rate.get, reverse=True)
        best = max(rate, key=rate.get)
        lines.append(
            f"- k=64 {label}: target >= {_m(TARGET_TOKENS_S)} M tokens per reader CPU-second "
            + (f"met by {len(met)} of {len(rate)} cells: " + ", ".join(f"{key} ({_m(rate[key])})" for key in met)
               if met else f"**not met** by any of {len(rate)} cells")
            + f". Best {best} at {_m(rate[best])}; range {_m(min(rate.values()))}..{_m(max(rate.values()))}.")
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
    parser.add_argument("--compressions", default=",".join(COMPRESSIONS), help="shard compression (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, best reported (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny cache, one run: a smoke test, numbers too small to quote")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the caches go (default: system temp dir)")
    parser.add_argument("--cache", default=None, metavar="PATH",
                        help="labels from this top-k cache of a trained teacher instead of synthetic ones: its "
                        "records (up to --tokens), repeated with fresh record ids to fill the shards, values "
                        "re-encoded in each codec; --ks must be its k")
    args = parser.parse_args(argv)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    shard_tokens = args.shard_tokens or (QUICK_SHARD_TOKENS if args.quick else DEFAULT_SHARD_TOKENS)
    shuffle_buffer = args.shuffle_buffer if args.shuffle_buffer is not None else (
        QUICK_SHUFFLE_BUFFER if args.quick else SHUFFLE_BUFFER)
    repeats = args.repeats or (1 if args.quick else 3)
    if tokens < 1 or shard_tokens < 1 or repeats < 1 or shuffle_buffer < 0:
        parser.error("--tokens, --shard-tokens and --repeats must be positive, --shuffle-buffer >= 0")
    codecs = args.codecs or (QUICK_CODECS if args.quick else ",".join(CODECS))
    real = real_source(args.cache, tokens) if args.cache else None
    if real is not None and args.ks != str(real.layout.k):
        parser.error(f"--cache {args.cache} holds top-{real.layout.k}: pass --ks {real.layout.k}")
    configs: list[Config] = [(int(k), backend, codec, compression) for k in args.ks.split(",")
                             for backend in args.backends.split(",") for codec in codecs.split(",")
                             for compression in args.compressions.split(",")]
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
        urls = write_caches(workdir, tokens, shard_tokens, configs, real)
        first = CacheReader(urls[configs[0]]).manifest
        per_window = window_blocks(first, shuffle_buffer)
        windows = (math.ceil(sum(s.blocks for s in first.shards) / per_window), per_window)
        for cfg, url in urls.items():
            layout = layout_for(cfg[0], cfg[2], real)
            cache_tokens = CacheReader(url).manifest.total_tokens  # real records: whole ones, a few more
            stored = TokenPacker(layout, rows=rows, length=MAX_LENGTH, decode=False)
            decoded = TokenPacker(layout, rows=rows, length=MAX_LENGTH)
            if not args.quick:  # warm-up: page cache, first touch of memory
                run_loader(url, cfg, workers=0, shuffle_buffer=shuffle_buffer, packer=stored, stats_dir=stats_dir)
            for packer, workers in [(stored, w) for w in WORKERS] + [(decoded, 0)]:
                best = None
                for _ in range(repeats):
                    run = run_loader(url, cfg, workers=workers, shuffle_buffer=shuffle_buffer, packer=packer,
                                     stats_dir=stats_dir)
                    if run.tokens != cache_tokens:
                        raise AssertionError(f"{url}: an epoch delivered {run.tokens} tokens, not {cache_tokens}")
                    if best is None or run.wall_s < best.wall_s:
                        best = run
                runs.append(best)
                progress(f"{'/'.join(map(str, cfg))} {best.form} {best.label}: {_m(best.tokens / best.wall_s)} Mtok/s, "
                         f"{_m(best.tokens / best.reader_cpu_s)} Mtok per reader CPU-s, "
                         f"main CPU {best.main_cpu_s:.2f} s, peak +{best.peak_mb:.0f} MB, "
                         f"tokens per reader {best.reader_tokens}")
            parts[cfg] = breakdown(url, shuffle_buffer=shuffle_buffer, packer=stored, repeats=repeats)
            parts[cfg]["shard_bytes"] = sum(s.bytes for s in CacheReader(url).manifest.shards)
            progress(f"{'/'.join(map(str, cfg))} breakdown (CPU ns/token): "
                     + ", ".join(f"{x} {_ns(parts[cfg], x)}" for x in PARTS) + f", sys {100 * parts[cfg]['sys']:.0f}%")
    report = render(runs, parts, command=command, tokens=tokens, shard_tokens=shard_tokens, real=real,
                    shuffle_buffer=shuffle_buffer, windows=windows, repeats=repeats,
                    seconds=time.perf_counter() - started, load=(load_before, os.getloadavg()),
                    quick=args.quick)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
