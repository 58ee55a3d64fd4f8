"""What ``logitcache repack`` costs and what it buys: a zstd cache rewritten for reading speed.

On the reader benchmark's synthetic caches (``bench_reader.write_caches``: 32k vocabulary,
k = 64, 10 shards of 262,144 tokens, Parquet with zstd level 3; q8 values, and float16, the
default codec), this repacks each cache with ``repack_cache`` into lz4 and uncompressed
Parquet and into Zarr with lz4, and reports for each copy:

- **repack s / Mtok/s**: wall seconds of one ``repack_cache`` call into a fresh directory
  (read and sha256 check of every source shard, encode, write, fsync, commit; the encode and
  write run on the committer thread beside the next read), best of ``--repeats``;
- **CPU %**: the process's CPU seconds (all threads) per wall second of that call;
- **B/token**: shard bytes per token of source and copy;
- **reader Mtok per CPU-s**: one warm in-process epoch of ``bench_reader.run_loader`` (stored
  batches, pinned to one CPU), best of ``--repeats``: the training-side rate before and after.

Usage::

    python benchmarks/bench_repack.py [--codecs q8,float16] [--repeats 3] [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_codecs import machine_lines
from bench_reader import (
    ALL_CPUS,
    BATCH_TOKENS,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_TOKENS,
    MAX_LENGTH,
    QUICK_SHARD_TOKENS,
    QUICK_SHUFFLE_BUFFER,
    QUICK_TOKENS,
    SHUFFLE_BUFFER,
    cap_thread_pools,
    layout_for,
    pin_to,
    progress,
    run_loader,
    write_caches,
)
from publish import command_line, publish

from logitcache.pipeline.distill.collate import TokenPacker, rows_for
from logitcache.stages.repack_cache import repack_cache
from logitcache.storage_schemas.shard_reader import CacheReader

K = 64
#: (label, storage changes) of each copy
TARGETS = (
    ("parquet, lz4", {"compression": "lz4"}),
    ("parquet, none", {"compression": "none"}),
    ("zarr, lz4", {"backend": "zarr", "compression": "lz4"}),
)


def reader_rate(url: str, codec: str, backend: str, *, shuffle_buffer: int, repeats: int, stats_dir: Path) -> float:
    """Best in-process tokens per CPU-second over ``repeats`` warm epochs."""
    packer = TokenPacker(layout_for(K, codec), rows=rows_for(BATCH_TOKENS, MAX_LENGTH), length=MAX_LENGTH,
                         decode=False)
    best = 0.0
    for _ in range(repeats):
        run = run_loader(url, (K, backend, codec, "-"), workers=0, shuffle_buffer=shuffle_buffer,
                         packer=packer, stats_dir=stats_dir)
        best = max(best, run.tokens / run.reader_cpu_s)
    return best


def timed_repack(source: str, dest: Path, changes: dict, repeats: int) -> tuple[float, float]:
    """(best wall seconds, its CPU share) of repacking ``source`` into a fresh ``dest``."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        shutil.rmtree(dest, ignore_errors=True)
        pin_to(ALL_CPUS)  # reading on this thread, writing on the committer's: both CPUs (run_loader pins to one)
        cpu, started = time.process_time(), time.perf_counter()
        repack_cache(source, str(dest), storage=changes, progress=False)
        wall = time.perf_counter() - started
        best = min(best, (wall, (time.process_time() - cpu) / wall))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", default="q8,float16", help="value codecs of the source caches (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, best reported (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny caches, one run: a smoke test, numbers too small to quote")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the caches go (default: system temp dir)")
    args = parser.parse_args(argv)
    tokens, shard_tokens = (QUICK_TOKENS, QUICK_SHARD_TOKENS) if args.quick else (DEFAULT_TOKENS, DEFAULT_SHARD_TOKENS)
    shuffle_buffer = QUICK_SHUFFLE_BUFFER if args.quick else SHUFFLE_BUFFER
    repeats = args.repeats or (1 if args.quick else 3)
    command = command_line("bench_repack.py", argv)
    cap_thread_pools()  # one thread per pool; the repack's committer thread is its own
    started = time.perf_counter()
    lines = ["| source | copy | repack s | repack Mtok/s | CPU % | B/token source -> copy | reader Mtok per CPU-s "
             "source -> copy |", "|---|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="bench_repack-", dir=args.tmp_dir) as tmp:
        workdir = Path(tmp)
        stats_dir = workdir / "stats"
        stats_dir.mkdir()
        configs = [(K, "parquet", codec, "zstd") for codec in args.codecs.split(",")]
        for cfg, url in write_caches(workdir, tokens, shard_tokens, configs).items():
            codec = cfg[2]
            source_bytes = CacheReader(url).manifest.total_bytes
            source_rate = reader_rate(url, codec, "parquet", shuffle_buffer=shuffle_buffer, repeats=repeats,
                                      stats_dir=stats_dir)
            progress(f"{codec} zstd source: {source_bytes / tokens:.1f} B/token, reader {source_rate / 1e6:.2f} M")
            for label, changes in TARGETS:
                dest = workdir / f"copy-{codec}-{label.replace(', ', '-')}"
                wall, cpu_share = timed_repack(url, dest, changes, repeats)
                copy_bytes = CacheReader(str(dest)).manifest.total_bytes
                rate = reader_rate(str(dest), codec, changes.get("backend", "parquet"), shuffle_buffer=shuffle_buffer,
                                   repeats=repeats, stats_dir=stats_dir)
                progress(f"{codec} -> {label}: {wall:.2f} s, reader {rate / 1e6:.2f} M")
                lines.append(f"| parquet, zstd, {codec} | {label} | {wall:.2f} | {tokens / wall / 1e6:.2f} | "
                             f"{100 * cpu_share:.0f} | {source_bytes / tokens:.1f} -> {copy_bytes / tokens:.1f} | "
                             f"{source_rate / 1e6:.2f} -> **{rate / 1e6:.2f}** |")
                shutil.rmtree(dest, ignore_errors=True)
    report = "\n".join([
        "## Repack: a zstd cache rewritten for reading speed", "",
        f"Command: `{command}`", "", *machine_lines(),
        f"- {tokens:,} tokens at k={K} in shards of {shard_tokens:,}; best of {repeats}; "
        f"whole benchmark {time.perf_counter() - started:.0f} s"
        + (" (--quick: numbers too small to quote)" if args.quick else ""), "", *lines, "",
    ])
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
