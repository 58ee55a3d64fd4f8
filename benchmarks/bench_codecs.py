"""Value codecs x backends: bytes per token, write/read throughput, reconstruction error.

For vocabularies of 32k and 150k ids, k in {8, 32, 64, 128}, every value codec
(``value_codec_names()``) and both shard backends (parquet, zarr), on synthetic top-k
labels from ``synthetic_topk.py`` (the "synthetic grid"), this measures:

- **bytes/token**: the committed shard's bytes (every column, Parquet footer or Zarr
  metadata included) per labelled position; split into top-k ids, top-k values and the
  rest, from Parquet column-chunk ``total_compressed_size`` or the sizes of a Zarr
  array's files;
- **write Mtok/s**: value-codec encode + ``ShardWriter.commit`` (Arrow or Zarr
  conversion, compression, fsync, sha256, rename, manifest save) into a temporary cache;
- **read Mtok/s**: ``CacheReader.read_shard`` + ``RecordBlock.decoded_topk_logprobs``,
  i.e. decoding a whole shard to float32 numpy, from the page cache (the shard was just
  written); the share of that time spent in the value codec's decode is reported too;
- **max |lp err|** over all stored log-probs, and **mean KL(p || p_hat)** per position
  over the top-k plus a tail bucket, ``tail = 1 - sum(exp(lp))`` and
  ``tail_hat = max(0, 1 - sum(exp(lp_hat)))``. A position whose decoded top-k sum to 1 or
  more has ``tail_hat = 0``: its KL is infinite. Those positions are counted in
  "tail lost %" and left out of the mean.

A breakdown of one shard's read (32k vocab, k=64, float16 and q8) shows where the read
time goes: each top-k column alone, the rest of ``read_shard``, the value decode, and a
zstd-only floor (numcodecs decompressing the same arrays from memory).

A sweep of Parquet compression settings (zstd levels 3, 1 and the fast negative levels -1,
-3, -7, lz4, none) on the same shard gives bytes per token against ``read_shard`` time per
token: how much of the stage-two reader's budget each setting's decompression takes.

Plus a naive baseline per (vocab, k): ``pyarrow.parquet.write_table`` with zstd at Arrow's
default level, default dictionary encoding, no BYTE_STREAM_SPLIT, of just two columns,
uint16/uint32 ids and float16 values in ``list<fixed_size_list<_, k>>`` per record. And the
information content of the ids: the empirical entropy of the pooled id histogram ("id
entropy floor", what a coder of independent ids cannot beat), and the exact entropy of
the generator's ordered top-k rows (what no lossless coder can beat on this data).

The synthetic ids have none of the structure of a real teacher's top-k sets (neighbouring
positions share many ids, sets cluster on frequent tokens), so the same measurements run on
**real teacher outputs** too: ``--cache PATH`` (repeatable) takes the first ``--tokens``
labelled positions (whole records, manifest order) of an existing cache of any token-level
kind, as ``CacheReader.iter_blocks`` reads them, and writes them again with ``ShardWriter``
into a temporary cache, exactly as the grid does: a top-k cache through every value codec,
both backends and the compressions zstd, lz4 and none; a sampled or hybrid cache (top-k head
plus draws) through both backends and the three compressions in its own value codec. Each
setting reports bytes per labelled position (total, and top-k ids, top-k values, the sample
columns and the rest, by column name), write and read tokens/s per core as above, and the
error and KL of the decoded values against the source's stored values decoded to float32
(a real error only when the source was float32 or float16; a q8 source's reference already
carries q8's error). The top-k ids and the rows' order are kept as the source stores them,
and the values are re-encoded with the codec's ``encode`` of their float32 decode. For
each source with top-k ids the report adds what explains their size: the mean number of a
position's top-k ids that the previous position of the same record also has, and the
empirical entropy of the pooled id histogram. ``--demo-cache`` builds (or finds under
``--tmp-dir``) two caches of ``logitcache run``'s demo teacher on the shipped multilingual
corpus, stage one of the embedded default job with top-64 float16 and with 16 draws per
position, and measures them like ``--cache``; ``--real-only`` skips the synthetic grid.

Throughput is per core: the process pins itself to one CPU (``sched_setaffinity``) and
caps every thread pool at one thread (``OMP_NUM_THREADS=1`` and friends, set below before
numpy is imported; ``pa.set_cpu_count(1)`` and ``pa.set_io_thread_count(1)`` for Arrow;
Zarr's ``threading.max_workers`` and ``async.concurrency`` at 1), so that no library
counts a second core's work as its own, and the numbers scale with cores by the number of
independent shards read at once. Each timing is repeated (3 times by default) and the
best repetition is reported.

Usage::

    python benchmarks/bench_codecs.py [--tokens N] [--quick] [--repeats N] [--out FILE.md]
        [--cache PATH ...] [--demo-cache] [--real-only] [--tmp-dir DIR]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: thread pools read these once

import argparse  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, fields, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numcodecs  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import zarr  # noqa: E402
from machine import cpu_model  # noqa: E402
from synthetic_topk import (  # noqa: E402
    SyntheticRecords,
    make_records,
    marginal_entropy_bits,
    sequence_entropy_bits,
)

import logitcache  # noqa: E402
from logitcache.config import StorageConfig, config_to_dict, load_config  # noqa: E402
from logitcache.storage_schemas.id_codec import id_type_for_vocab  # noqa: E402
from logitcache.storage_schemas.layout import RecordLayout  # noqa: E402
from logitcache.storage_schemas.legacy_formats import legacy_table, sort_topk_by_id  # noqa: E402
from logitcache.storage_schemas.manifest import Manifest, ShardEntry  # noqa: E402
from logitcache.storage_schemas.records import RecordBlock  # noqa: E402
from logitcache.storage_schemas.shard_reader import CacheReader  # noqa: E402
from logitcache.storage_schemas.shard_writer import ShardWriter  # noqa: E402
from logitcache.storage_schemas.value_codecs import get_value_codec, value_codec_names  # noqa: E402

VOCABS = (32_000, 150_000)
KS = (8, 32, 64, 128)
BACKENDS = ("parquet", "zarr")
COMPRESSIONS = ("zstd", "lz4", "none")  # of the real-label settings (``storage.compression``)
DEFAULT_TOKENS = 131_072
QUICK_TOKENS = 4_096
BREAKDOWN = (32_000, 64)  # (vocab, k) of the read-time breakdown
BREAKDOWN_CODECS = ("float16", "q8")
TARGET_BYTES_K64 = 80.0  # synthetic ids, which carry more information than a trained teacher's
TARGET_DECODE_TOKENS_S = 3e6
#: format 4's size targets on real teacher outputs, B/labelled position of a Parquet shard at
#: the default compression: (kind, k or draws, value codec or "") -> at most
REAL_TARGETS = {("token_topk", 64, "q8"): 64.0, ("token_topk", 64, "float16"): 100.0,
                ("token_sampled", 16, ""): 16.0}
DEMO_DIR = "bench_codecs-demo"  # under --tmp-dir: the demo teacher and its caches, kept between runs
#: the demo caches of --demo-cache: name -> overrides of the default job's soft labels
DEMO_LABELS = {
    "topk-64": ("soft_labels.mode=topk", "soft_labels.k=64", "soft_labels.values=float16"),
    "sampled-16": ("soft_labels.mode=sampled", "soft_labels.samples=16"),
}


def pin_to_one_core() -> str:
    """Restrict this process (and the threads it starts) to one CPU; say which."""
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    return "not pinned (no sched_setaffinity); thread pools capped at 1"


# ---------------------------------------------------------------- one measurement


@dataclass
class Row:
    vocab: int
    k: int
    backend: str
    compression: str
    codec: str
    bytes_per_token: float
    id_bytes: float
    value_bytes: float
    sample_bytes: float
    other_bytes: float
    write_tok_s: float
    read_tok_s: float
    decode_share: float  # of the best read repetition, the part spent in the codec decode
    max_abs_err: float
    mean_kl: float
    tail_lost: float  # fraction of positions with tail_hat == 0 < tail


def make_template(layout: RecordLayout, backend: str, compression: str = "zstd") -> Manifest:
    """A manifest template with no shards, as stage one makes one (default storage settings
    but ``compression``)."""
    storage = config_to_dict(StorageConfig(backend=backend, compression=compression))
    return Manifest(
        layout=layout, backend=backend, storage=storage,
        teacher={"name_or_path": "synthetic-teacher", "revision": None, "dtype": "float32",
                 "task": "causal_lm"},
        tokenizer={"name_or_path": "synthetic-teacher", "fingerprint": "synthetic",
                   "vocab_size": layout.vocab_size},
        windows={"max_length": 512, "stride": 0},
        soft_labels={"kind": layout.kind, "k": layout.k, "samples": layout.samples,
                     "values": layout.value_codec},
        fingerprint_fields={"soft_labels": {"k": layout.k, "samples": layout.samples,
                                            "values": layout.value_codec}},
    )


@dataclass
class Source:
    """Labels to store again: a block as its cache holds it, the cache's layout, and the block's
    top-k log-probabilities decoded to float32 (None without top-k), the reference of the errors."""

    name: str
    block: RecordBlock
    layout: RecordLayout
    logprobs: np.ndarray | None


def synthetic_source(records: SyntheticRecords, vocab: int) -> Source:
    """The synthetic records as a float32 top-k source, each row in ascending id order as a cache
    stores it (the generator gives rank order)."""
    layout = RecordLayout(kind="token_topk", id_type=id_type_for_vocab(vocab), vocab_size=vocab,
                          k=records.topk_ids.shape[1], value_codec="float32")
    ids, logprobs = sort_topk_by_id(records.topk_ids, records.topk_logprobs)
    block = RecordBlock(
        record_id=records.record_id, doc_key=records.doc_key, lang=records.lang,
        token_offsets=records.token_offsets, input_ids=records.input_ids,
        context_length=records.context_length, topk_ids=ids, topk_logprobs=logprobs,
    )
    return Source(name="synthetic", block=block, layout=layout, logprobs=logprobs)


def reencode(source: Source, layout: RecordLayout) -> RecordBlock:
    """``source``'s block with its top-k ids in ``layout``'s id type (rows in the source's order)
    and its float32 log-probs through ``layout``'s value codec; every other column as it is."""
    if not layout.has_topk:
        return source.block
    return replace(source.block, topk_ids=source.block.topk_ids.astype(layout.id_type),
                   topk_logprobs=get_value_codec(layout.value_codec).encode(source.logprobs))


def encode_block(records: SyntheticRecords, layout: RecordLayout) -> RecordBlock:
    return reencode(synthetic_source(records, layout.vocab_size), layout)


def parquet_column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes of each top-level column of a Parquet file, over all row groups."""
    meta = pq.ParquetFile(path).metadata
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            top = col.path_in_schema.split(".")[0]
            sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    return sizes


def column_bytes(cache: Path, entry: ShardEntry, backend: str) -> dict[str, int]:
    """Bytes of each column (Parquet) or array directory (Zarr) of a committed shard, by name."""
    path = cache / entry.path
    if backend == "parquet":
        return parquet_column_bytes(path)
    return {array.name: sum(f.stat().st_size for f in array.rglob("*") if f.is_file())
            for array in path.iterdir() if array.is_dir()}


def split_bytes(sizes: dict[str, int], total: int) -> tuple[int, int, int, int]:
    """(top-k ids, top-k values, sample columns, the rest) of a shard of ``total`` bytes whose
    columns have ``sizes``; the rest is every other column and the file's own metadata."""
    ids, values = sizes.get("topk_ids", 0), sizes.get("topk_logprobs", 0)
    samples = sum(size for name, size in sizes.items() if name.startswith("sample_"))
    return ids, values, samples, total - ids - values - samples


def kl_stats(lp: np.ndarray, lp_hat: np.ndarray) -> tuple[float, float, float]:
    """(max |lp_hat - lp|, mean finite KL(p || p_hat) over top-k + tail, fraction tail lost)."""
    lp, lp_hat = lp.astype(np.float64), lp_hat.astype(np.float64)
    p = np.exp(lp)
    tail = np.maximum(0.0, 1.0 - p.sum(axis=1))
    tail_hat = np.maximum(0.0, 1.0 - np.exp(lp_hat).sum(axis=1))
    kl = (p * (lp - lp_hat)).sum(axis=1)
    lost = (tail_hat == 0) & (tail > 0)
    both = (tail > 0) & ~lost
    kl[both] += tail[both] * (np.log(tail[both]) - np.log(tail_hat[both]))
    finite = kl[~lost]
    return (float(np.abs(lp_hat - lp).max()), float(finite.mean()) if finite.size else float("nan"),
            float(lost.mean()))


def timed_write(source: Source, template: Manifest, target: Path) -> tuple[float, ShardEntry, RecordBlock]:
    """(seconds, entry, block written) of re-encoding ``source`` and committing it as one shard."""
    writer = ShardWriter(str(target), template=template)
    started = time.perf_counter()
    block = reencode(source, template.layout)
    entry = writer.commit(block, unit_id="u00000")
    return time.perf_counter() - started, entry, block


def timed_read(reader: CacheReader, entry: ShardEntry) -> tuple[float, float, RecordBlock, np.ndarray | None]:
    """(seconds, share of them in the value decode, block, decoded top-k log-probs or None) of
    reading one shard back to float32 numpy."""
    started = time.perf_counter()
    block = reader.read_shard(entry)
    read_done = time.perf_counter()
    decoded = block.decoded_topk_logprobs(reader.layout) if reader.layout.has_topk else None
    elapsed = time.perf_counter() - started
    return elapsed, (elapsed - (read_done - started)) / elapsed, block, decoded


def best_write(source: Source, template: Manifest, cache: Path, repeats: int) -> tuple[float, ShardEntry, RecordBlock]:
    """:func:`timed_write` into ``cache``, the best time of ``repeats`` writes (the others into
    copies, removed); the cache of the first write stays."""
    write_s, entry, written = timed_write(source, template, cache)
    for rep in range(1, repeats):
        again = cache.with_name(f"{cache.name}-{rep}")
        write_s = min(write_s, timed_write(source, template, again)[0])
        shutil.rmtree(again)
    return write_s, entry, written


def measure(source: Source, codec: str, backend: str, workdir: Path, repeats: int,
            compression: str = "zstd") -> tuple[Row, np.ndarray | None]:
    """One (codec, backend, compression) setting of ``source``; also returns the decoded log-probs."""
    layout = replace(source.layout, value_codec=codec)
    template = make_template(layout, backend, compression)
    setting = f"{source.name} {backend}/{compression}/{codec}/k={layout.k}"
    cache = workdir / f"{backend}-{compression}-{codec}-{layout.k}"
    write_s, entry, written = best_write(source, template, cache, repeats)
    reader = CacheReader(str(cache))
    read_s, decode_share, block, decoded = min((timed_read(reader, entry) for _ in range(repeats)),
                                               key=lambda read: read[0])
    if not block.equals(written):
        raise AssertionError(f"{setting}: the labels did not survive the round trip")
    if decoded is not None and (decoded.dtype != np.float32 or decoded.shape != source.logprobs.shape):
        raise AssertionError(f"{setting}: decoded {decoded.dtype} {decoded.shape}")
    positions = source.block.num_positions
    ids_b, values_b, samples_b, other_b = split_bytes(column_bytes(cache, entry, backend), entry.bytes)
    nan = float("nan")
    max_err, mean_kl, lost = (nan, nan, nan) if decoded is None else kl_stats(source.logprobs, decoded)
    shutil.rmtree(cache)
    row = Row(
        vocab=layout.vocab_size, k=layout.k, backend=backend, compression=compression, codec=codec,
        bytes_per_token=entry.bytes / positions, id_bytes=ids_b / positions,
        value_bytes=values_b / positions, sample_bytes=samples_b / positions,
        other_bytes=other_b / positions, write_tok_s=positions / write_s, read_tok_s=positions / read_s,
        decode_share=decode_share if layout.has_topk else nan,
        max_abs_err=max_err, mean_kl=mean_kl, tail_lost=lost,
    )
    return row, decoded


def measure_codec(source: Source, codec: str, compressions: tuple[str, ...], workdir: Path,
                  repeats: int) -> list[Row]:
    """``source`` through one value codec on both backends and every compression of ``compressions``;
    every setting must decode to the same float32 values."""
    rows, decoded = [], []
    for backend in BACKENDS:
        for compression in compressions:
            row, values = measure(source, codec, backend, workdir, repeats, compression)
            rows.append(row)
            decoded.append(values)
            print(_progress(row), file=sys.stderr, flush=True)
    if decoded[0] is not None and not all(np.array_equal(decoded[0], d) for d in decoded):
        raise AssertionError(f"{source.name}: settings decode {codec} differently at k={source.layout.k}")
    return rows


def measure_naive(records: SyntheticRecords, vocab: int, k: int, workdir: Path,
                  repeats: int) -> Row:
    """Plain ``pq.write_table``: ids + float16 values, zstd default level, nothing tuned."""
    id_type = pa.uint16() if vocab <= 2**16 else pa.uint32()
    offsets = pa.array(records.token_offsets.astype(np.int32))
    path = workdir / f"naive-{vocab}-{k}.parquet"
    tokens = records.num_tokens

    def build() -> pa.Table:
        ids = pa.array(records.topk_ids.reshape(-1).astype(id_type.to_pandas_dtype()), id_type)
        values = pa.array(records.topk_logprobs.astype(np.float16).reshape(-1), pa.float16())
        return pa.table({
            "topk_ids": pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(ids, k)),
            "topk_logprobs": pa.ListArray.from_arrays(
                offsets, pa.FixedSizeListArray.from_arrays(values, k)),
        })

    write_s = read_s = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        pq.write_table(build(), path, compression="zstd")
        write_s = min(write_s, time.perf_counter() - started)
    for _ in range(repeats):
        started = time.perf_counter()
        table = pq.read_table(path)
        values = table.column("topk_logprobs").combine_chunks().flatten().flatten()
        decoded = values.to_numpy(zero_copy_only=False).reshape(-1, k).astype(np.float32)
        read_s = min(read_s, time.perf_counter() - started)
    total = path.stat().st_size
    ids_b, values_b, _, other_b = split_bytes(parquet_column_bytes(path), total)
    path.unlink()
    max_err, mean_kl, lost = kl_stats(records.topk_logprobs, decoded)
    return Row(
        vocab=vocab, k=k, backend="naive parquet", compression="zstd", codec="float16",
        bytes_per_token=total / tokens, id_bytes=ids_b / tokens, value_bytes=values_b / tokens,
        sample_bytes=0.0, other_bytes=other_b / tokens,
        write_tok_s=tokens / write_s, read_tok_s=tokens / read_s, decode_share=float("nan"),
        max_abs_err=max_err, mean_kl=mean_kl, tail_lost=lost,
    )


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def read_breakdown(records: SyntheticRecords, vocab: int, k: int, codecs: tuple[str, ...],
                   workdir: Path, repeats: int) -> list[dict[str, float | str]]:
    """Where a whole-shard read's time goes, per backend and codec (milliseconds).

    ``ids`` / ``values``: reading that one column alone through the backend's library
    (``ParquetFile.read(columns=[...])``, ``zarr.open_array(...)[...]``); ``rest`` = the
    whole ``read_shard`` minus both; ``decode`` = ``decoded_topk_logprobs``; ``zstd`` =
    ``numcodecs.Zstd`` (same level) decompressing the ids and the stored values held in
    memory as plain arrays, a floor for any zstd-compressed layout of these bytes.
    """
    out = []
    for codec in codecs:
        layout = RecordLayout(kind="token_topk", id_type=id_type_for_vocab(vocab),
                              vocab_size=vocab, k=k, value_codec=codec)
        block = encode_block(records, layout)
        level = StorageConfig().compression_level
        zstd = numcodecs.Zstd(level=level)
        packed = [zstd.encode(np.ascontiguousarray(a)) for a in (block.topk_ids, block.topk_logprobs)]
        zstd_s = _best(lambda packed=packed, zstd=zstd: [zstd.decode(p) for p in packed], repeats)
        for backend in BACKENDS:
            cache = workdir / f"breakdown-{backend}-{codec}"
            entry = ShardWriter(str(cache), template=make_template(layout, backend)).commit(
                block, unit_id="u00000")
            reader = CacheReader(str(cache))
            path = cache / entry.path
            if backend == "parquet":
                def column(name: str, path: Path = path) -> None:
                    pq.ParquetFile(path).read(columns=[name])
            else:
                def column(name: str, path: Path = path) -> None:
                    zarr.open_array(str(path / name), mode="r")[...]
            total = _best(lambda reader=reader, entry=entry: reader.read_shard(entry), repeats)
            ids_s = _best(lambda column=column: column("topk_ids"), repeats)
            values_s = _best(lambda column=column: column("topk_logprobs"), repeats)
            stored = reader.read_shard(entry)
            decode_s = _best(lambda stored=stored, layout=layout: stored.decoded_topk_logprobs(layout),
                             repeats)
            shutil.rmtree(cache)
            out.append({
                "backend": backend, "codec": codec, "read_shard": total * 1e3, "ids": ids_s * 1e3,
                "values": values_s * 1e3, "rest": (total - ids_s - values_s) * 1e3,
                "decode": decode_s * 1e3, "zstd": zstd_s * 1e3,
                "tok_s": records.num_tokens / (total + decode_s),
            })
    return out


#: Parquet compression settings of the sweep: zstd at the default level and below it, the fast
#: negative zstd levels (which ``storage.compression_level`` does not accept: set on the writer
#: past the config's check, to see what they would give), lz4 and none.
COMPRESSION_SWEEP = (("zstd", 3), ("zstd", 1), ("zstd", -1), ("zstd", -3), ("zstd", -7), ("lz4", None),
                     ("none", None))


def compression_sweep(records: SyntheticRecords, vocab: int, k: int, codecs: tuple[str, ...],
                      workdir: Path, repeats: int) -> list[dict[str, float | str]]:
    """Per value codec and Parquet compression setting: the committed shard's bytes per token
    and ``CacheReader.read_shard`` time per token (what the stage-two reader pays to read)."""
    out = []
    for codec in codecs:
        layout = RecordLayout(kind="token_topk", id_type=id_type_for_vocab(vocab),
                              vocab_size=vocab, k=k, value_codec=codec)
        block = encode_block(records, layout)
        for compression, level in COMPRESSION_SWEEP:
            cache = workdir / f"sweep-{codec}-{compression}-{level}"
            writer = ShardWriter(str(cache), template=make_template(layout, "parquet", compression))
            if level is not None:
                writer.storage = replace(writer.storage, compression_level=level)  # frozen settings
            entry = writer.commit(block, unit_id="u00000")
            reader = CacheReader(str(cache))
            read = _best(lambda reader=reader, entry=entry: reader.read_shard(entry), repeats)
            shutil.rmtree(cache)
            out.append({"codec": codec, "compression": compression, "level": "-" if level is None else str(level),
                        "bytes": entry.bytes / records.num_tokens, "read_ns": read / records.num_tokens * 1e9})
    return out


# ---------------------------------------------------------------- real teacher outputs


def read_source(url: str, max_positions: int) -> tuple[Source, Manifest]:
    """The first ``max_positions`` labelled positions (whole records, at least one, manifest order)
    of the cache at ``url``, and its manifest."""
    reader = CacheReader(url)
    blocks, positions = [], 0
    for _entry, _index, block in reader.iter_blocks():
        blocks.append(block)
        positions += block.num_positions
        if positions >= max_positions:
            break
    block = RecordBlock.concat(blocks)
    records = max(1, int(np.searchsorted(block.label_offsets, max_positions, side="right")) - 1)
    block = block.take_records(0, records) if records < block.num_records else block
    logprobs = block.decoded_topk_logprobs(reader.layout) if reader.layout.has_topk else None
    return Source(name=url, block=block, layout=reader.layout, logprobs=logprobs), reader.manifest


def mean_entropy(block: RecordBlock, manifest: Manifest) -> str:
    """The teacher's mean entropy per position: of the block's entropy column, else of the build
    statistics the manifest keeps for the whole cache, else 'not stored'."""
    if block.entropy is not None:
        return f"{np.nanmean(block.entropy.astype(np.float64)):.2f} nats (entropy column)"
    total = sum(sum(shard.stats.get("entropy_sum", {}).values()) for shard in manifest.shards)
    counted = sum(sum(shard.stats.get("entropy_positions", {}).values()) for shard in manifest.shards)
    if counted:
        return f"{total / counted:.2f} nats (whole cache, the manifest's build statistics)"
    return "not stored"


def describe_source(source: Source, manifest: Manifest) -> str:
    layout, block, teacher = source.layout, source.block, manifest.teacher
    params = teacher.get("num_parameters")
    labels = ", ".join(part for part in (
        f"top-{layout.k}" if layout.has_topk else "",
        f"{layout.samples} draws" if layout.has_samples else "",
        f"values {layout.value_codec}" if layout.has_topk else "",
    ) if part)
    return (f"Teacher `{teacher.get('name_or_path')}` ({teacher.get('model_type', 'model')}"
            f"{f', {params:,} parameters' if params else ''}), vocabulary {layout.vocab_size:,}; "
            f"{layout.kind} ({labels}); {block.num_positions:,} labelled positions in "
            f"{block.num_records:,} records (the cache has {manifest.total_positions:,}); mean "
            f"teacher entropy {mean_entropy(block, manifest)}; stored as {manifest.backend}/"
            f"{manifest.storage.get('compression', 'zstd')} at "
            f"{manifest.total_bytes / max(manifest.total_positions, 1):.1f} B/position.")


def shared_with_previous(ids: np.ndarray, label_offsets: np.ndarray) -> float:
    """Mean number of a position's top-k ids that the previous position of the same record also
    has (whatever the rows' order; top-k ids are distinct within a row)."""
    positions = ids.shape[0]
    width = int(ids.max()) + 1
    rows = np.arange(positions, dtype=np.int64)[:, None]
    here = (rows * width + ids).reshape(-1)  # position p's ids, keyed by p
    as_previous = ((rows + 1) * width + ids).reshape(-1)  # position p's ids, keyed by p + 1
    shared = np.isin(here, as_previous).reshape(ids.shape).sum(axis=1)
    first = np.zeros(positions, dtype=bool)
    first[label_offsets[:-1][label_offsets[:-1] < positions]] = True  # no previous position in its record
    return float(shared[~first].mean()) if (~first).any() else float("nan")


@dataclass
class RealResult:
    source: str
    description: str
    rows: list[Row]
    structure: dict[str, float] | None  # sources with top-k ids: what explains their size
    layout: RecordLayout | None = None
    #: codec -> (total, ids, values) B/position of the same labels as a format 3 Parquet shard
    draws: dict[str, float] | None = None  # sources with draws: what explains their size
    levels: list[dict[str, float | str]] | None = None  # top-k sources: the zstd level sweep
    format_3: dict[str, tuple[float, float, float]] | None = None


def id_structure(source: Source, rows: list[Row]) -> dict[str, float]:
    ids, k = source.block.topk_ids, source.layout.k
    bits = marginal_entropy_bits(ids, source.layout.vocab_size)
    return {"shared": shared_with_previous(ids, source.block.label_offsets), "k": k, "bits": bits,
            "floor": k * bits / 8, "stored": min(r.id_bytes for r in rows),
            "distinct": int(np.unique(ids).size)}


REAL_LEVELS = (3, 6, 9, 12, 19)  # zstd levels of the real top-k sources' level sweep


def level_sweep(source: Source, workdir: Path, repeats: int) -> list[dict[str, float | str]]:
    """``source``'s labels in q8 and float16 as Parquet zstd shards at each of REAL_LEVELS
    (``storage.compression_level``), through the real writer: B/position (ids, values), the
    commit's time and ``read_shard``'s time per position (no value decode), best of ``repeats``."""
    out = []
    for codec in ("q8", "float16"):
        layout = replace(source.layout, value_codec=codec)
        for level in REAL_LEVELS:
            template = make_template(layout, "parquet", "zstd")
            template.storage["compression_level"] = level
            cache = workdir / f"level-{codec}-{level}"
            write_s, entry, _ = best_write(source, template, cache, repeats)
            reader = CacheReader(str(cache))
            read_s = _best(lambda reader=reader, entry=entry: reader.read_shard(entry), repeats)
            ids, values, _, _ = split_bytes(column_bytes(cache, entry, "parquet"), entry.bytes)
            positions = source.block.num_positions
            out.append({"codec": codec, "level": level, "bytes": entry.bytes / positions, "ids": ids / positions,
                        "values": values / positions, "write_ns": 1e9 * write_s / positions,
                        "read_ns": 1e9 * read_s / positions})
            shutil.rmtree(cache)
            print(f"{source.name} level {level} {codec}: {out[-1]['bytes']:.1f} B/pos", file=sys.stderr, flush=True)
    return out


def format_3_bytes(source: Source, codec: str, workdir: Path) -> tuple[float, float, float]:
    """(total, top-k ids, top-k values) bytes per position of ``source``'s labels in ``codec`` as a
    format 3 Parquet shard (rows in rank order as raw little-endian bytes, q8 as differences),
    written with the writer's zstd settings. Only for ids and values of 1 and 2 bytes: format 3
    stored 4-byte ones another way."""
    layout = replace(source.layout, value_codec=codec)
    table = legacy_table(reencode(source, layout), layout, 3)
    path = workdir / f"format-3-{codec}.parquet"
    settings = StorageConfig()
    pq.write_table(table, path, compression="zstd", compression_level=settings.compression_level,
                   use_dictionary=["doc_key", "lang"], write_statistics=["record_id"], store_schema=True,
                   row_group_size=table.num_rows)
    sizes, total, positions = parquet_column_bytes(path), path.stat().st_size, source.block.num_positions
    path.unlink()
    return total / positions, sizes["topk_ids"] / positions, sizes["topk_logprobs"] / positions


def draw_structure(source: Source, rows: list[Row]) -> dict[str, float]:
    """What a sampled source's draws hold: distinct ids per position with draws, the pooled id
    entropy, and the floor of a coder that treats a position's draws as a multiset of independent
    draws from the pooled histogram: ``samples * H - E[log2(samples! / prod(counts!))]`` bits
    (the order of the draws is not stored). A coder that knew the teacher's distribution at each
    position could go lower; zstd knows neither."""
    block, samples = source.block, source.layout.samples
    s_off = block.sample_offsets - block.sample_offsets[0]
    distinct = np.diff(s_off)
    drawn = distinct > 0
    bits = marginal_entropy_bits(np.repeat(block.sample_ids, block.sample_counts.astype(np.int64)),
                                 source.layout.vocab_size)
    log2_fact = np.concatenate([[0.0], np.cumsum(np.log2(np.arange(1, samples + 1)))])
    position = np.repeat(np.arange(len(distinct)), distinct)
    per_position = log2_fact[samples] - np.bincount(position, weights=log2_fact[block.sample_counts.astype(np.int64)],
                                                    minlength=len(distinct))
    ordering = float(per_position[drawn].mean()) if drawn.any() else 0.0
    share = drawn.mean() if len(drawn) else 0.0
    return {"samples": samples, "distinct": float(distinct[drawn].mean()) if drawn.any() else 0.0, "bits": bits,
            "floor": share * (samples * bits - ordering) / 8, "drawn": float(share),
            "stored": min(r.sample_bytes for r in rows)}


def measure_source(url: str, max_positions: int, workdir: Path, repeats: int) -> RealResult:
    """Every setting of one cache's labels: a top-k cache through every value codec, a sampled or
    hybrid one in its own; both backends and every compression of COMPRESSIONS."""
    source, manifest = read_source(url, max_positions)
    codecs = value_codec_names() if source.layout.kind == "token_topk" else (source.layout.value_codec,)
    rows = [row for codec in codecs for row in measure_codec(source, codec, COMPRESSIONS, workdir, repeats)]
    two_bytes = source.layout.kind == "token_topk" and np.dtype(source.layout.id_type).itemsize <= 2
    return RealResult(source=url, description=describe_source(source, manifest), rows=rows,
                      structure=id_structure(source, rows) if source.layout.has_topk else None,
                      layout=source.layout,
                      format_3={codec: format_3_bytes(source, codec, workdir) for codec in ("float16", "q8")}
                      if two_bytes else None,
                      draws=draw_structure(source, rows) if source.layout.has_samples else None,
                      levels=level_sweep(source, workdir, repeats) if source.layout.kind == "token_topk" else None)


def demo_caches(root: Path) -> list[str]:
    """Stage one of ``logitcache run``'s embedded default job under ``root``, once per
    DEMO_LABELS setting: the demo teacher trained (or found) in ``root/teacher``, and its cache
    built (or found complete) in ``root/cache-NAME``. Returns the caches' paths."""
    import torch  # the stages need torch; the synthetic grid does not

    from logitcache.pipeline.capture.demo_teacher import prepare_demo_teacher
    from logitcache.stages.build_cache import build_cache
    from logitcache.stages.run_job import default_job

    torch.set_num_threads(os.cpu_count() or 1)  # OMP_NUM_THREADS=1 above is for the timed part only
    teacher = root / "teacher"
    caches = []
    for name, overrides in DEMO_LABELS.items():
        paths = (f"cache={root / f'cache-{name}'}", f"demo_teacher.output={teacher}", f"teacher.model={teacher}")
        # stage one only: without students, whose settings would only add their warnings
        cfg = load_config(None, [*paths, *overrides, "students=[]"], default=default_job())
        trained = prepare_demo_teacher(cfg.demo_teacher, corpus=cfg.corpus,
                                       held_out_fraction=cfg.eval.held_out_fraction, progress=False)
        print(trained.to_text(), file=sys.stderr, flush=True)
        print(build_cache(cfg, progress=False).to_text(), file=sys.stderr, flush=True)
        caches.append(cfg.cache)
    return caches


# ---------------------------------------------------------------- report


def machine_lines() -> list[str]:
    model = cpu_model()
    versions = {
        "python": platform.python_version(), "numpy": np.__version__, "pyarrow": pa.__version__,
        "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
        "logitcache": logitcache.__version__,
    }
    return [
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, CPU model {model!r}, "
        f"platform.processor() = {platform.processor()!r}, {platform.system()} {platform.release()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


def _fmt_rate(tok_s: float) -> str:
    return f"{tok_s / 1e6:.2f}"


def _fmt_err(x: float) -> str:
    if x != x:  # nan
        return "-"
    return "0" if x == 0 else f"{x:.2e}"


def _measured_cells(r: Row, *, samples: bool = False) -> str:
    """A row's measurements as table cells, from total bytes to tail lost."""
    share = "-" if r.decode_share != r.decode_share else f"{100 * r.decode_share:.0f}"
    lost = "-" if r.tail_lost != r.tail_lost else f"{100 * r.tail_lost:.2f}"
    return (f"| {r.bytes_per_token:.1f} | {r.id_bytes:.1f} | {r.value_bytes:.1f} "
            + (f"| {r.sample_bytes:.1f} " if samples else "")
            + f"| {r.other_bytes:.1f} | {_fmt_rate(r.write_tok_s)} | {_fmt_rate(r.read_tok_s)} | {share} "
            f"| {_fmt_err(r.max_abs_err)} | {_fmt_err(r.mean_kl)} | {lost} |")


@dataclass
class Synthetic:
    """The synthetic grid's results."""

    rows: list[Row]
    floors: dict[tuple[int, int], tuple[float, float]]
    breakdown: list[dict[str, float | str]]
    sweep: list[dict[str, float | str]]


def render(synthetic: Synthetic | None, real: list[RealResult], *, tokens: int, repeats: int,
           command: str, pinned: str, seconds: float) -> str:
    out = [
        f"Command: `{command}`",
        "",
        *machine_lines(),
        f"- timings are the best of {repeats} repetition(s), one core ({pinned}); wall time "
        f"{seconds:.0f} s (a demo cache's build excluded)",
        "",
    ]
    if synthetic is not None:
        out += render_synthetic(synthetic, tokens=tokens, repeats=repeats)
    if real:
        out += render_real(real, tokens=tokens)
    return "\n".join(out) + "\n"


def render_synthetic(synthetic: Synthetic, *, tokens: int, repeats: int) -> list[str]:
    rows, floors, breakdown, sweep = synthetic.rows, synthetic.floors, synthetic.breakdown, synthetic.sweep
    out = [
        "## Synthetic top-k labels",
        "",
        f"{tokens:,} labelled positions per shard (records of 64..512 tokens, 6 languages), seed 0.",
        "",
        "Bytes are per labelled position (= token here) and include every column of the shard "
        "(record_id, doc_key, lang, input_ids, context_length, top-k ids and values, file "
        "metadata): **total** = ids + values + other. Write = codec encode + `ShardWriter.commit` "
        "(incl. fsync and sha256); read = `CacheReader.read_shard` + `decoded_topk_logprobs` "
        "(float32 numpy), warm page cache; *dec %* = share of the read spent in the value "
        "codec's decode. KL in nats per position, over top-k + tail bucket; *tail lost* = "
        "positions whose decoded top-k sum to >= 1 (tail_hat = 0, KL infinite, left out of "
        "the mean). The naive row stores only ids + values.",
        "",
        "| vocab | k | backend | codec | total B/tok | ids B/tok | values B/tok | other B/tok "
        "| write Mtok/s | read Mtok/s | dec % | max abs lp err | mean KL | tail lost % |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r.vocab // 1000}k | {r.k} | {r.backend} | {r.codec} " + _measured_cells(r))
    out += [
        "",
        "Information in the top-k ids (bytes per token). *id entropy floor* = k x empirical "
        "entropy of the pooled id histogram (the best a coder of independent ids can do); "
        "*generator entropy* = mean -log2 P(row) of the ordered top-k rows under the "
        "generator itself (no lossless coder can average less on this data); *stored* = the "
        "smallest id bytes/token of any backend above.",
        "",
        "| vocab | k | id entropy bits/id | id entropy floor bytes/token | generator entropy bytes/token "
        "| stored ids bytes/token (best) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for (vocab, k), (marginal_bits, sequence_bits) in sorted(floors.items()):
        stored = min(r.id_bytes for r in rows if r.vocab == vocab and r.k == k)
        out.append(f"| {vocab // 1000}k | {k} | {marginal_bits:.2f} | {k * marginal_bits / 8:.1f} "
                   f"| {sequence_bits / 8:.1f} | {stored:.1f} |")
    out += [
        "",
        f"Where the read time goes ({BREAKDOWN[0] // 1000}k vocab, k={BREAKDOWN[1]}, one shard of "
        f"{tokens:,} positions, milliseconds, best of {max(repeats, 5)}): *ids* / *values* = that column "
        "alone through pyarrow / zarr; *rest* = `read_shard` minus both; *decode* = "
        "`decoded_topk_logprobs`; *zstd floor* = numcodecs zstd (same level) decompressing "
        "the same ids and stored values from memory, no file format around them.",
        "",
        "| backend | codec | read_shard ms | ids ms | values ms | rest ms | decode ms "
        "| zstd floor ms | read + decode Mtok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in breakdown:
        out.append(f"| {b['backend']} | {b['codec']} | {b['read_shard']:.1f} | {b['ids']:.1f} "
                   f"| {b['values']:.1f} | {b['rest']:.1f} | {b['decode']:.1f} | {b['zstd']:.1f} "
                   f"| {b['tok_s'] / 1e6:.2f} |")
    if sweep:
        out += [
            "",
            f"Compression settings of a Parquet shard ({BREAKDOWN[0] // 1000}k vocab, k={BREAKDOWN[1]}, "
            f"{tokens:,} positions, best of {max(repeats, 5)}): bytes per token of the committed shard and "
            "`read_shard` nanoseconds per token, the read the stage-two reader pays before packing (its "
            "whole budget at 3 M tokens/s/core is 333 ns). zstd levels below 1 are not accepted by "
            "`storage.compression_level`; they are set past the config's check, to show what they would give.",
            "",
            "| codec | compression | level | B/token | read ns/token |",
            "|---|---|---:|---:|---:|",
        ]
        for row in sweep:
            out.append(f"| {row['codec']} | {row['compression']} | {row['level']} | {row['bytes']:.1f} "
                       f"| {row['read_ns']:.0f} |")
    out += ["", "Against the targets:", ""]
    naive = [r for r in rows if r.backend == "naive parquet" and r.k == 64]
    if naive:
        out.append("- naive Parquet (uint16/uint32 ids + float16 values, zstd), k=64: "
                   + ", ".join(f"{r.bytes_per_token:.1f} B/token at {r.vocab // 1000}k vocab"
                               for r in naive) + ".")
    for vocab in sorted({r.vocab for r in rows}):
        cells = [r for r in rows if r.vocab == vocab and r.k == 64 and r.backend != "naive parquet"]
        if not cells:
            continue
        lossy = [r for r in cells if not get_value_codec(r.codec).lossless]
        best = min(lossy, key=lambda r: r.bytes_per_token)
        verdict = "meets" if best.bytes_per_token <= TARGET_BYTES_K64 else "misses"
        out.append(f"- {vocab // 1000}k vocab, k=64: smallest lossy shard is {best.backend}/"
                   f"{best.codec} at {best.bytes_per_token:.1f} B/token "
                   f"({verdict} <= {TARGET_BYTES_K64:.0f}); its ids alone take "
                   f"{best.id_bytes:.1f} B/token against an id entropy floor of "
                   f"{64 * floors[(vocab, 64)][0] / 8:.1f}.")
        fast = [r for r in cells if r.read_tok_s >= TARGET_DECODE_TOKENS_S]
        out.append(f"- {vocab // 1000}k vocab, k=64: shard decode to numpy >= 3 M tokens/s/core "
                   f"for {', '.join(f'{r.backend}/{r.codec}' for r in fast) or 'no cell'}; "
                   f"range {min(r.read_tok_s for r in cells) / 1e6:.2f}.."
                   f"{max(r.read_tok_s for r in cells) / 1e6:.2f} M tokens/s.")
    return out + [""]


def render_real(results: list[RealResult], *, tokens: int) -> list[str]:
    out = [
        "## Real teacher outputs",
        "",
        f"Each source's first {tokens:,} labelled positions (whole records) stored again as one shard "
        "per setting, as the synthetic shards are (default storage settings but the compression; "
        "top-k ids and rows as the source holds them, values re-encoded from their float32 decode). "
        "Bytes per labelled position, by column: *ids* = `topk_ids`, *values* = `topk_logprobs`, "
        "*samples* = the draws: Parquet's `sample_ids` and `undrawn_positions`, Zarr's `sample_ids`, "
        "`sample_counts` and `sample_offsets`; *other* = every other column (record_id, doc_key, "
        "lang, input_ids, context_length, entropy, target_logprob, Zarr's offsets) and the file "
        "metadata. Write and read as above, per labelled position. "
        "**The reference of the errors and the KL is the source cache's stored values** decoded to "
        "float32: a real codec error for a float32 or float16 source (0 when the codec is the "
        "source's or wider), for a q8 source only what storing them again changes.",
        "",
    ]
    for result in results:
        out += [
            f"### `{result.source}`",
            "",
            result.description,
            "",
            "| backend | compression | codec | total B/pos | ids B/pos | values B/pos | samples B/pos "
            "| other B/pos | write Mtok/s | read Mtok/s | dec % | max abs lp err | mean KL | tail lost % |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result.rows:
            codec = r.codec if r.k else "-"
            out.append(f"| {r.backend} | {r.compression} | {codec} " + _measured_cells(r, samples=True))
        if result.structure is not None:
            st = result.structure
            out += [
                "",
                "What the top-k ids hold: *shared* = mean number of a position's top-k ids that the "
                "previous position of the same record also has; *id entropy* = empirical entropy of "
                "the pooled id histogram, and k times it, the floor of a coder of independent ids; "
                "*stored* = the smallest ids bytes per position above.",
                "",
                "| k | shared with previous | distinct ids | id entropy bits/id | id entropy floor B/pos "
                "| stored ids B/pos (best) |",
                "|---:|---:|---:|---:|---:|---:|",
                f"| {st['k']} | {st['shared']:.1f} ({100 * st['shared'] / st['k']:.0f}%) | {st['distinct']:,} "
                f"| {st['bits']:.2f} | {st['floor']:.1f} | {st['stored']:.1f} |",
            ]
        if result.levels:
            out += ["", "zstd levels (`storage.compression_level`, default "
                    f"{StorageConfig.compression_level}), Parquet; *write* = `ShardWriter.commit` (encode, "
                    "compress, fsync, sha256, manifest) and *read* = `read_shard` (no value decode), wall ns per "
                    "position on the pinned core:", "",
                    "| codec | level | total B/pos | ids B/pos | values B/pos | write ns/pos | read ns/pos |",
                    "|---|---:|---:|---:|---:|---:|---:|"]
            out += [f"| {x['codec']} | {x['level']} | {x['bytes']:.1f} | {x['ids']:.1f} | {x['values']:.1f} "
                    f"| {x['write_ns']:.0f} | {x['read_ns']:.0f} |" for x in result.levels]
        if result.draws is not None:
            d = result.draws
            out += ["", "What the draws hold: *distinct* = mean distinct ids among a position's draws; "
                    "*id entropy* = empirical entropy of the pooled histogram of drawn ids; *floor* = a "
                    "coder of each position's draws as a multiset of independent draws from that histogram "
                    "(samples x entropy, less the order of the draws, which is not stored), per labelled "
                    "position; *stored* = the smallest sample bytes per position above.", "",
                    "| draws | positions with draws | distinct ids | id entropy bits/id | floor B/pos "
                    "| stored B/pos (best) |", "|---:|---:|---:|---:|---:|---:|",
                    f"| {d['samples']} | {100 * d['drawn']:.1f}% | {d['distinct']:.1f} | {d['bits']:.2f} "
                    f"| {d['floor']:.1f} | {d['stored']:.1f} |"]
        if result.format_3:
            out += ["", f"The same labels in format 3 (rank-order rows) and format 4, Parquet, "
                    f"{StorageConfig.compression} level {StorageConfig.compression_level}, B/position:", "",
                    "| codec | format 3 total | ids | values | format 4 total | ids | values | format 4 / 3 |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for codec, (total, ids, values) in result.format_3.items():
                now = next(r for r in result.rows if r.backend == "parquet" and r.codec == codec
                           and r.compression == StorageConfig.compression)
                out.append(f"| {codec} | {total:.1f} | {ids:.1f} | {values:.1f} | {now.bytes_per_token:.1f} "
                           f"| {now.id_bytes:.1f} | {now.value_bytes:.1f} | {now.bytes_per_token / total:.2f} |")
        out.append("")
    return out + render_targets(results)


def render_targets(results: list[RealResult]) -> list[str]:
    """Format 4's targets against the real sources that they concern: Parquet, default compression."""
    lines = []
    for result in results:
        layout = result.layout
        if layout is None:
            continue
        count = layout.k if layout.kind == "token_topk" else layout.samples
        for r in result.rows:
            if r.backend != "parquet" or r.compression != StorageConfig.compression:
                continue
            codec = r.codec if layout.kind == "token_topk" else ""
            target = REAL_TARGETS.get((layout.kind, count, codec))
            if target is not None:
                verdict = "meets" if r.bytes_per_token <= target else "misses"
                lines.append(f"| `{result.source}` | {layout.kind} {count}{f' {codec}' if codec else ''} "
                             f"| B/position <= {target:.0f} | {r.bytes_per_token:.1f} | {verdict} |")
            if layout.kind == "token_topk" and count == 64 and r.codec != "float32":
                verdict = "meets" if r.read_tok_s >= TARGET_DECODE_TOKENS_S else "misses"
                lines.append(f"| `{result.source}` | {layout.kind} {count} {r.codec} | read + decode Mtok/s "
                             f">= {TARGET_DECODE_TOKENS_S / 1e6:.0f} | {_fmt_rate(r.read_tok_s)} | {verdict} |")
    if not lines:
        return []
    return ["### Format 4's targets on these sources", "",
            f"Parquet shards at the default compression ({StorageConfig.compression}), from the tables above; "
            "read + decode is `read_shard` and the float32 decode of the whole shard on one core "
            "(the stage-two reader's own speed is bench_reader's).", "",
            "| source | labels | target | measured | verdict |", "|---|---|---|---:|---|", *lines, ""]


def run_synthetic(tokens: int, repeats: int, workdir: Path) -> Synthetic:
    """The synthetic grid: every vocab, k, codec and backend, the naive baseline, the read-time
    breakdown and the compression sweep."""
    result = Synthetic(rows=[], floors={}, breakdown=[], sweep=[])
    for vocab in VOCABS:
        base = make_records(tokens=tokens, k=max(KS), vocab_size=vocab, seed=0)
        for k in KS:
            records = base.with_k(k)
            result.floors[(vocab, k)] = (marginal_entropy_bits(records.topk_ids, vocab),
                                         sequence_entropy_bits(records.topk_ids, vocab))
            result.rows.append(measure_naive(records, vocab, k, workdir, repeats))
            print(_progress(result.rows[-1]), file=sys.stderr, flush=True)
            source = synthetic_source(records, vocab)
            for codec in value_codec_names():
                result.rows += measure_codec(source, codec, ("zstd",), workdir, repeats)
        if vocab == BREAKDOWN[0]:
            result.breakdown = read_breakdown(base.with_k(BREAKDOWN[1]), vocab, BREAKDOWN[1],
                                              BREAKDOWN_CODECS, workdir, max(repeats, 5))
            result.sweep = compression_sweep(base.with_k(BREAKDOWN[1]), vocab, BREAKDOWN[1],
                                             BREAKDOWN_CODECS, workdir, max(repeats, 5))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"labelled positions per shard (default {DEFAULT_TOKENS:,}; "
                             f"{QUICK_TOKENS:,} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="small shards and one repetition: a smoke run of a few seconds")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timing repetitions, best reported (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--tmp-dir", type=Path, default=None,
                        help=f"where the temporary caches go, and the demo caches in {DEMO_DIR}/ "
                             "(default: the system temp dir)")
    parser.add_argument("--cache", action="append", default=[], metavar="PATH",
                        help="also store this cache's labels (its first --tokens labelled positions) "
                             "again in every setting (repeatable)")
    parser.add_argument("--demo-cache", action="store_true",
                        help="also measure the demo teacher's caches (top-64 float16, and 16 draws): "
                             "stage one of `logitcache run`'s default job, built under --tmp-dir first "
                             "unless there (the teacher's training takes a few minutes on CPU)")
    parser.add_argument("--real-only", action="store_true",
                        help="skip the synthetic grid (minutes): only --cache / --demo-cache sources")
    args = parser.parse_args(argv)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    repeats = args.repeats or (1 if args.quick else 3)
    if tokens < 1 or repeats < 1:
        parser.error("--tokens and --repeats must be positive")
    if args.real_only and not (args.cache or args.demo_cache):
        parser.error("--real-only needs --cache or --demo-cache")
    command = "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    sources = list(args.cache)
    if args.demo_cache:  # before pinning: the teacher's training and forward use every core
        sources += demo_caches((args.tmp_dir or Path(tempfile.gettempdir())) / DEMO_DIR)
    for url in sources:
        manifest = CacheReader(url).manifest
        if not manifest.layout.is_token_level or not manifest.total_positions:
            parser.error(f"--cache {url}: a {manifest.kind} cache with {manifest.total_positions} "
                         "labelled positions; nothing to store again")
    pinned = pin_to_one_core()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_codecs-", dir=args.tmp_dir) as tmp:
        workdir = Path(tmp)
        synthetic = None if args.real_only else run_synthetic(tokens, repeats, workdir)
        real = [measure_source(url, tokens, workdir, repeats) for url in sources]
    report = render(synthetic, real, tokens=tokens, repeats=repeats, command=command, pinned=pinned,
                    seconds=time.perf_counter() - started)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


def _progress(row: Row) -> str:
    values = ((f.name, getattr(row, f.name)) for f in fields(row))
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values)


if __name__ == "__main__":
    sys.exit(main())
