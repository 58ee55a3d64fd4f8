"""Zarr shards: one Zarr v3 group (a directory ``part-XXX.zarr``) per shard, token-major.

A shard holds the same information as a Parquet shard, as flat arrays indexed by record,
token, labelled position or sample, with offsets between the levels:

===================  ==========================  ============================================
array                shape, type                 meaning
===================  ==========================  ============================================
record_id            [R] uint64                  stable record id
doc_key, lang        [R] string (vlen utf-8)     document identity, language tag
record_offsets       [R+1] int64                 record r's tokens: ``input_ids[o[r]:o[r+1]]``
context_length       [R] uint32                  token-level kinds: left-context tokens
label_offsets        [R+1] int64                 token-level kinds: record r's positions
class_logprobs       [R, C] codec storage type   sequence_probs: class log-probabilities
label                [R] int32                   sequence_probs: gold label, -1 = none
block_offsets        [B+1] int64                 record indices that cut the shard's blocks
input_ids            [T] uint32                  tokens
topk_ids             [P, k] id type              top-k ids per labelled position
topk_logprobs        [P, k] codec storage type   their stored (encoded) log-probabilities
entropy              [P] float16                 teacher entropy per position (optional)
target_logprob       [P] float16                 teacher log-prob of the next token (optional)
sample_offsets       [P+1] int64                 position p's draws: ``sample_ids[s[p]:s[p+1]]``
sample_ids           [S] id type                 drawn ids
sample_counts        [S] uint16                  how often each was drawn
===================  ==========================  ============================================

Blocks are cut by :func:`~logitcache.storage_schemas.records.block_cuts` with
``storage.row_group_tokens``, so block ``i`` of a Zarr shard holds the same records as row
group ``i`` of the Parquet shard of the same data. ``block_offsets``, ``record_offsets``
and ``label_offsets`` make any block (or record) readable without touching the rest.

Every array uses the v3 ``sharding_indexed`` codec: one shard object per array (the whole
array, rounded up to a multiple of the inner chunk), inner chunks of
``storage.chunk_tokens`` rows (fewer for a shorter array), each compressed as
``storage.compression`` says: with zstd at ``storage.compression_level``, with lz4, or not
at all. A reader of a slice fetches the shard index and only the inner chunks it needs. The group's attributes
hold, under ``"logitcache"``, the format name and version, the record layout and the
shard's metadata (config fingerprint, work unit). Strings use zarr's variable-length
UTF-8 data type (``"string"``); every other array is a plain numeric type.

Reading a block is a few slice reads per level (records, then tokens and positions, then
samples), issued together on zarr's event loop so that different arrays decode at the same
time, and whole-array numpy arithmetic on the offsets: no Python loop over records or
tokens. What comes back is the :class:`RecordBlock` that the Parquet backend returns for
the same data: offsets rebased to zero, stored (not decoded) values.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import zarr
import zarr.api.asynchronous
import zarr.storage
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync as zarr_sync

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import SAMPLE_COUNT_TYPE, RecordLayout
from logitcache.storage_schemas.legacy_formats import to_format_4
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.mapped_store import MappedLocalStore
from logitcache.storage_schemas.records import RecordBlock, block_cuts
from logitcache.storage_schemas.storage_settings import StorageSettings

ATTRS_KEY = "logitcache"
FORMAT_NAME = "logitcache-zarr-shard"
#: 2: top-k rows in ascending id order, q8 values as levels (format 4 of the cache); 1: rank
#: order, q8 as differences of levels, read through ``legacy_formats.to_format_4``.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

#: What a corrupt or incomplete store can make zarr, numcodecs or numpy raise while reading.
_READ_ERRORS = (OSError, ValueError, KeyError, IndexError, RuntimeError)

T = TypeVar("T")


def array_names(layout: RecordLayout) -> list[str]:
    """The arrays of a shard in ``layout``, in the order they are written."""
    names = ["record_id", "doc_key", "lang", "record_offsets", "block_offsets", "input_ids"]
    if layout.is_token_level:
        names += ["context_length", "label_offsets"]
    if layout.has_topk:
        names += ["topk_ids", "topk_logprobs"]
    if layout.has_samples:
        names += ["sample_offsets", "sample_ids", "sample_counts"]
    if layout.entropy and layout.is_token_level:
        names.append("entropy")
    if layout.target_logprob and layout.is_token_level:
        names.append("target_logprob")
    if layout.kind == "sequence_probs":
        names += ["class_logprobs", "label"]
    return names


_DIMENSIONS = {
    "record_id": ("record",), "doc_key": ("record",), "lang": ("record",),
    "record_offsets": ("record_edge",), "label_offsets": ("record_edge",),
    "block_offsets": ("block_edge",), "context_length": ("record",), "label": ("record",),
    "class_logprobs": ("record", "class"), "input_ids": ("token",),
    "topk_ids": ("position", "k"), "topk_logprobs": ("position", "k"), "entropy": ("position",),
    "target_logprob": ("position",),
    "sample_offsets": ("position_edge",), "sample_ids": ("sample",), "sample_counts": ("sample",),
}


def _zero_based(offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    return offsets - offsets[0]


def _block_arrays(block: RecordBlock, layout: RecordLayout, cuts: list[int]) -> dict[str, np.ndarray]:
    """The arrays of ``block`` as stored (offsets zero-based, values as given)."""
    value_dtype = layout.value_storage_dtype
    out: dict[str, np.ndarray] = {
        "record_id": np.asarray(block.record_id, dtype=np.uint64),
        "doc_key": np.asarray(block.doc_key, dtype=object),
        "lang": np.asarray(block.lang, dtype=object),
        "record_offsets": _zero_based(block.token_offsets),
        "block_offsets": np.asarray(cuts, dtype=np.int64),
        "input_ids": np.asarray(block.input_ids, dtype=np.uint32),
    }
    if layout.is_token_level:
        out["context_length"] = np.asarray(block.context_length, dtype=np.uint32)
        out["label_offsets"] = block.label_offsets
    if layout.has_topk:
        out["topk_ids"] = np.asarray(block.topk_ids, dtype=layout.id_type)
        out["topk_logprobs"] = np.asarray(block.topk_logprobs, dtype=value_dtype)
    if layout.has_samples:
        out["sample_offsets"] = _zero_based(block.sample_offsets)
        out["sample_ids"] = np.asarray(block.sample_ids, dtype=layout.id_type)
        out["sample_counts"] = np.asarray(block.sample_counts, dtype=SAMPLE_COUNT_TYPE)
    if layout.entropy and layout.is_token_level:
        out["entropy"] = np.asarray(block.entropy, dtype=np.float16)
    if layout.target_logprob and layout.is_token_level:
        out["target_logprob"] = np.asarray(block.target_logprob, dtype=np.float16)
    if layout.kind == "sequence_probs":
        out["class_logprobs"] = np.asarray(block.class_logprobs, dtype=value_dtype)
        out["label"] = np.asarray(block.label, dtype=np.int32)
    return out


def _chunking(shape: tuple[int, ...], chunk_rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape): rows along axis 0, the whole array in one shard.

    Zarr wants chunks of at least one row, so an empty array gets one-row chunks.
    """
    rows = max(1, min(chunk_rows, shape[0]))
    shard_rows = max(1, math.ceil(shape[0] / rows)) * rows
    rest = tuple(max(1, n) for n in shape[1:])
    return (rows, *rest), (shard_rows, *rest)


def _store(location: CacheLocation, rel: str, *, read_only: bool):
    path = location.full(rel)
    if location.is_local:
        return MappedLocalStore(path) if read_only else zarr.storage.LocalStore(path)
    # FsspecStore needs an async filesystem; from_mapper wraps a sync one (memory://, ...)
    # in fsspec's AsyncFileSystemWrapper, and makes an async twin of an async one (s3, gcs).
    return zarr.storage.FsspecStore.from_mapper(location.fs.get_mapper(path), read_only=read_only)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on zarr's own event loop (as zarr's synchronous API does)."""
    return zarr_sync(coro)


# ---------------------------------------------------------------------- writing

BLOSC_LZ4_LEVEL = 5  # Blosc's own default


def _compressors(dtype: np.dtype, storage: StorageSettings) -> list | None:
    """zstd; for multi-byte numbers behind a byte shuffle (Blosc), which groups the bytes of
    equal significance as Parquet's BYTE_STREAM_SPLIT does: uint32 ids of a 150k vocabulary
    shrank from 131.7 to 110.8 bytes/token at k=64 in our measurements. lz4 goes through
    Blosc for every type (the Zarr v3 specification has no plain lz4 codec), with the same
    shuffle rule, at Blosc's default level."""
    if storage.compression == "none":
        return None
    shuffle = "shuffle" if dtype.kind in "uif" and dtype.itemsize > 1 else "noshuffle"
    if storage.compression == "lz4":
        return [BloscCodec(cname="lz4", clevel=BLOSC_LZ4_LEVEL, shuffle=shuffle, typesize=dtype.itemsize)]
    if shuffle == "shuffle":
        return [BloscCodec(cname="zstd", clevel=storage.compression_level, shuffle=shuffle,
                           typesize=dtype.itemsize)]
    return [ZstdCodec(level=storage.compression_level)]


async def _write_group(store, arrays: dict[str, np.ndarray], names: list[str],
                       attributes: dict, storage: StorageSettings) -> None:
    group = await zarr.api.asynchronous.group(store=store, overwrite=True, attributes=attributes,
                                              zarr_format=3)

    async def write_one(name: str) -> None:
        data = arrays[name]
        chunks, shards = _chunking(data.shape, storage.chunk_tokens)
        array = await group.create_array(
            name, shape=data.shape, dtype=str if data.dtype == object else data.dtype,
            chunks=chunks, shards=shards, compressors=_compressors(data.dtype, storage),
            dimension_names=_DIMENSIONS[name],
        )
        if data.size:
            await array.setitem(Ellipsis, data)

    await asyncio.gather(*(write_one(name) for name in names))


# ---------------------------------------------------------------------- reading


class _Shard:
    """An open shard: its group's attributes and its arrays (metadata only, no data yet)."""

    def __init__(self, where: str, attrs: dict, arrays: dict[str, zarr.AsyncArray]) -> None:
        self.where, self.attrs, self.arrays = where, attrs, arrays

    def __getitem__(self, name: str) -> zarr.AsyncArray:
        return self.arrays[name]

    async def get(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of array ``name``."""
        return await self.arrays[name].getitem(slice(start, stop))

    async def gather(self, *reads: Coroutine[Any, Any, np.ndarray]) -> list[np.ndarray]:
        return list(await asyncio.gather(*reads))


async def _open_shard(location: CacheLocation, rel: str, names: list[str]) -> _Shard:
    where = location.full(rel)
    try:
        group = await zarr.api.asynchronous.open_group(
            store=_store(location, rel, read_only=True), mode="r", zarr_format=3,
            use_consolidated=False,
        )
    except _READ_ERRORS as exc:
        raise CacheFormatError(f"{where}: not a readable Zarr shard ({exc})") from exc
    attrs = group.attrs.get(ATTRS_KEY)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{where}: not a logitcache Zarr shard (no {ATTRS_KEY!r} group attributes)")
    version = attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CacheFormatError(
            f"{where}: Zarr shard format version {version!r}; this logitcache reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )

    async def array(name: str) -> zarr.AsyncArray:
        try:
            node = await group.getitem(name)
        except KeyError:
            raise CacheFormatError(f"{where}: shard lacks array {name!r} required by its layout") from None
        except _READ_ERRORS as exc:
            raise CacheFormatError(f"{where}: array {name!r} unreadable ({type(exc).__name__}: {exc})") from exc
        if not isinstance(node, zarr.AsyncArray):
            raise CacheFormatError(f"{where}: {name!r} is not an array")
        return node

    found = await asyncio.gather(*(array(name) for name in names))
    return _Shard(where, attrs, dict(zip(names, found, strict=True)))


def _bounds(offsets: np.ndarray, name: str, where: str) -> tuple[np.ndarray, int, int]:
    """(int64 offsets, first, last), refusing an empty slice of an offsets array."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.shape[0] == 0:
        raise CacheFormatError(f"{where}: {name} is too short for the records asked for")
    return offsets, int(offsets[0]), int(offsets[-1])


async def _read_records(shard: _Shard, layout: RecordLayout, start: int, stop: int | None) -> RecordBlock:
    """Records ``start:stop`` (``stop=None``: to the end), reading only their slices.

    The per-record arrays are read first, all at once; then, all at once, the token and
    position arrays and the samples (whose reads start as soon as their offsets are in),
    so that the decoding of different arrays overlaps.
    """
    where = shard.where
    edge_stop = None if stop is None else stop + 1
    names = ["record_offsets", "record_id", "doc_key", "lang"]
    names += ["label_offsets", "context_length"] if layout.is_token_level else ["class_logprobs", "label"]
    per_record = dict(zip(names, await shard.gather(*(
        shard.get(n, start, edge_stop if n.endswith("offsets") else stop) for n in names
    )), strict=True))
    tok, t0, t1 = _bounds(per_record["record_offsets"], "record_offsets", where)
    reads = {"input_ids": shard.get("input_ids", t0, t1)}
    if layout.is_token_level:
        lab, p0, p1 = _bounds(per_record["label_offsets"], "label_offsets", where)
        if lab.shape != tok.shape:
            raise CacheFormatError(f"{where}: label_offsets and record_offsets differ in length")
        if layout.has_topk:
            reads["topk_ids"] = shard.get("topk_ids", p0, p1)
            reads["topk_logprobs"] = shard.get("topk_logprobs", p0, p1)
        if layout.entropy:
            reads["entropy"] = shard.get("entropy", p0, p1)
        if layout.target_logprob:
            reads["target_logprob"] = shard.get("target_logprob", p0, p1)
        if layout.has_samples:  # the draws are read as soon as their offsets are in
            reads["samples"] = _read_samples(shard, p0, p1)
    per_token = dict(zip(reads, await asyncio.gather(*reads.values()), strict=True))
    block = RecordBlock(
        record_id=per_record["record_id"], doc_key=per_record["doc_key"].astype(object),
        lang=per_record["lang"].astype(object), token_offsets=tok - t0,
        input_ids=per_token["input_ids"], context_length=per_record.get("context_length"),
        topk_ids=per_token.get("topk_ids"), topk_logprobs=per_token.get("topk_logprobs"),
        entropy=per_token.get("entropy"), target_logprob=per_token.get("target_logprob"),
        class_logprobs=per_record.get("class_logprobs"),
        label=per_record.get("label"),
    )
    if layout.has_samples:
        block.sample_offsets, block.sample_ids, block.sample_counts = per_token["samples"]
    return _checked(block, layout, shard)


async def _read_samples(shard: _Shard, p0: int, p1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(zero-based sample_offsets, sample_ids, sample_counts) of positions ``p0:p1``."""
    smp, s0, s1 = _bounds(await shard.get("sample_offsets", p0, p1 + 1), "sample_offsets", shard.where)
    ids, counts = await shard.gather(shard.get("sample_ids", s0, s1), shard.get("sample_counts", s0, s1))
    return smp - s0, ids, counts


def _checked(block: RecordBlock, layout: RecordLayout, shard: _Shard) -> RecordBlock:
    """The block in format 4's terms (a version 1 shard's rows re-ordered), validated."""
    where = shard.where
    if shard.attrs.get("format_version") != FORMAT_VERSION:
        block = to_format_4(block, layout)
    try:
        block.validate(layout)
    except CacheFormatError as exc:
        raise CacheFormatError(f"{where}: {exc}") from exc
    return block


async def _read_block(location: CacheLocation, rel: str, layout: RecordLayout, index: int | None) -> RecordBlock:
    shard = await _open_shard(location, rel, array_names(layout))
    if index is None:
        return await _read_records(shard, layout, 0, None)
    count = shard["block_offsets"].shape[0] - 1
    if not 0 <= index < count:
        raise CacheFormatError(f"{shard.where}: block {index} unreadable (the shard has {count} blocks)")
    cuts, start, stop = _bounds(await shard.get("block_offsets", index, index + 2), "block_offsets", shard.where)
    if cuts.shape[0] != 2:
        raise CacheFormatError(f"{shard.where}: block_offsets is too short for block {index}")
    return await _read_records(shard, layout, start, stop)


class ZarrBackend:
    name = "zarr"
    extension = ".zarr"

    def write(
        self, location: CacheLocation, rel: str, block: RecordBlock, *,
        layout: RecordLayout, storage: StorageSettings, metadata: dict[str, str],
    ) -> int:
        """Write ``block`` as a Zarr group at ``rel``; return the number of blocks."""
        block.validate(layout)
        cuts = block_cuts(block.token_offsets, storage.row_group_tokens)
        attributes = {ATTRS_KEY: {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "layout": layout.to_dict(),
            "metadata": {str(k): str(v) for k, v in metadata.items()},
        }}
        store = _store(location, rel, read_only=False)
        _run(_write_group(store, _block_arrays(block, layout, cuts), array_names(layout), attributes, storage))
        return len(cuts) - 1

    def _guarded(self, location: CacheLocation, rel: str, what: str, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return _run(coro)
        except _READ_ERRORS as exc:
            raise CacheFormatError(f"{location.full(rel)}: {what} ({type(exc).__name__}: {exc})") from exc

    def num_blocks(self, location: CacheLocation, rel: str) -> int:
        shard = self._guarded(location, rel, "unreadable", _open_shard(location, rel, ["block_offsets"]))
        return shard["block_offsets"].shape[0] - 1

    def num_records(self, location: CacheLocation, rel: str) -> int:
        shard = self._guarded(location, rel, "unreadable", _open_shard(location, rel, ["record_id"]))
        return shard["record_id"].shape[0]

    def read_metadata(self, location: CacheLocation, rel: str) -> dict[str, str]:
        """The metadata given to :meth:`write`, plus ``"layout"`` (JSON), as Parquet has it."""
        attrs = self._guarded(location, rel, "unreadable", _open_shard(location, rel, [])).attrs
        metadata = attrs.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise CacheFormatError(f"{location.full(rel)}: shard metadata is not a mapping")
        out = {str(k): str(v) for k, v in metadata.items()}
        if "layout" in attrs:
            out["layout"] = json.dumps(attrs["layout"])
        return out

    def read_block(self, location: CacheLocation, rel: str, layout: RecordLayout, index: int) -> RecordBlock:
        return self._guarded(location, rel, f"block {index} unreadable",
                             _read_block(location, rel, layout, index))

    def read(self, location: CacheLocation, rel: str, layout: RecordLayout) -> RecordBlock:
        return self._guarded(location, rel, "unreadable", _read_block(location, rel, layout, None))

    def arrow_schema(self, location: CacheLocation, rel: str) -> None:
        """Zarr shards have no Arrow schema; verify checks their layout through the metadata."""
        return None
