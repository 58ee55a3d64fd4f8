"""Caches read outside logitcache: pyarrow, DuckDB and polars for Parquet shards, xarray for Zarr.

Every backend x value codec x compression x vocabulary (one that fits uint16 ids, one that
needs uint32) x kind: the schema each engine sees, the row counts, one physical type per
soft-label column whatever the vocabulary and compression, and record 0 decoded with the
README's recipe equal to what ``CacheReader`` reads.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import xarray as xr

from logitcache.storage_schemas.layout import KINDS
from logitcache.storage_schemas.records import sample_draw_rows
from logitcache.storage_schemas.shard_reader import CacheReader
from logitcache.storage_schemas.shard_writer import ShardWriter
from logitcache.storage_schemas.value_codecs import value_codec_names
from tests.factories import make_block, make_layout, make_template
from tests.readme_snippets import block_containing

CODECS = tuple(value_codec_names())
COMPRESSIONS = ("zstd", "lz4", "none")
VOCABS = (1_000, 70_000)
RECORDS = 5
BINARY = ("topk_ids", "topk_logprobs", "sample_ids")
RECIPE = block_containing("python", 'metadata[b"logitcache.layout"]')
ENGINES = block_containing("python", "import duckdb")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """(backend, kind, codec, compression, vocab) -> (cache root, its one shard's path)."""
    root = tmp_path_factory.mktemp("interop")
    built: dict[tuple, tuple[Path, Path]] = {}

    def get(backend: str, kind: str, codec: str, compression: str, vocab: int) -> tuple[Path, Path]:
        key = (backend, kind, codec, compression, vocab)
        if key not in built:
            cache = root / "-".join(map(str, key))
            layout = make_layout(kind, k=6, samples=5, value_codec=codec, vocab_size=vocab, target_logprob=True)
            template = make_template(layout, backend=backend, storage={"compression": compression})
            entry = ShardWriter(str(cache), template=template).commit(
                make_block(layout, records=RECORDS, seed=len(built)), unit_id="a")
            built[key] = cache, cache / entry.path
        return built[key]

    return get


def all_settings() -> list:
    """(kind, codec, compression, vocab) of every cache, each with a readable test id."""
    return [pytest.param(*values, id="-".join(map(str, values)))
            for values in itertools.product(KINDS, CODECS, COMPRESSIONS, VOCABS)]


@pytest.mark.parametrize(("kind", "codec", "compression", "vocab"), all_settings())
def test_parquet_shard_in_pyarrow_duckdb_and_polars(caches, kind, codec, compression, vocab):
    cache, path = caches("parquet", kind, codec, compression, vocab)
    layout = CacheReader(str(cache)).layout
    expected = layout.arrow_schema()
    schema = pq.read_schema(path)
    assert schema.remove_metadata().equals(expected.remove_metadata(), check_metadata=True)
    assert b"logitcache.layout" in schema.metadata

    physical = {column.name: column.physical_type for column in pq.ParquetFile(path).schema}
    described = {name: kind_ for name, kind_, *_ in duckdb.sql(f"DESCRIBE SELECT * FROM '{path}'").fetchall()}
    frame = pl.read_parquet(path)
    assert list(described) == list(frame.columns) == expected.names
    for name in BINARY:
        if name in expected.names:
            assert physical[name] == "BYTE_ARRAY", name
            assert described[name] == "BLOB", name
            assert frame.schema[name] == pl.Binary, name

    assert pq.ParquetFile(path).metadata.num_rows == RECORDS
    assert duckdb.sql(f"SELECT count(*) FROM '{path}'").fetchall()[0][0] == RECORDS
    assert frame.height == RECORDS


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_type_per_column_whatever_the_vocabulary_and_compression(caches, kind, codec):
    seen = {}
    for compression, vocab in itertools.product(COMPRESSIONS, VOCABS):
        _, path = caches("parquet", kind, codec, compression, vocab)
        seen[(compression, vocab)] = (
            tuple(duckdb.sql(f"DESCRIBE SELECT * FROM '{path}'").fetchall()),
            tuple((name, str(dtype)) for name, dtype in pl.read_parquet_schema(path).items()),
            tuple((column.name, column.physical_type) for column in pq.ParquetFile(path).schema),
        )
    assert len(set(seen.values())) == 1, seen


def run_recipe(cache: Path, tmp_path: Path, monkeypatch, *, engines: bool) -> dict:
    """The README's recipe (and its pandas / DuckDB / polars block) with ``runs/cache`` = ``cache``."""
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "cache").symlink_to(cache, target_is_directory=True)
    monkeypatch.chdir(work)
    namespace: dict = {}
    exec(compile(RECIPE, "README.md recipe", "exec"), namespace)
    if engines:
        recipe = dict(namespace)
        exec(compile(ENGINES, "README.md engines", "exec"), namespace)
        assert np.array_equal(namespace["ids"], recipe["ids"] if recipe["k"] else recipe["draws"])
    return namespace


@pytest.mark.parametrize(("kind", "codec", "compression", "vocab"), all_settings())
def test_the_readme_recipe_decodes_record_0(caches, tmp_path, monkeypatch, capsys, kind, codec, compression, vocab):
    cache, _ = caches("parquet", kind, codec, compression, vocab)
    reader = CacheReader(str(cache))
    layout = reader.layout
    record = reader.read_shard(reader.shards[0]).take_records(0, 1)
    got = run_recipe(cache, tmp_path, monkeypatch, engines=layout.is_token_level)
    if layout.is_token_level:
        assert got["positions"] == record.num_positions
    if layout.has_topk:
        np.testing.assert_array_equal(got["ids"], record.topk_ids)
        assert got["ids"].dtype == np.dtype(layout.id_type)
        np.testing.assert_array_equal(got["logprobs"], record.decoded_topk_logprobs(layout))
    if layout.has_samples:
        draws, drawn = sample_draw_rows(record, layout.samples)
        np.testing.assert_array_equal(got["draws"], draws)
        np.testing.assert_array_equal(got["drawn"], np.flatnonzero(drawn))
    if kind == "sequence_probs":
        np.testing.assert_array_equal(got["class_logprobs"][None], record.decoded_class_logprobs(layout))
    capsys.readouterr()


@pytest.mark.parametrize(("kind", "codec", "compression", "vocab"), all_settings())
def test_zarr_shard_opens_in_xarray(caches, kind, codec, compression, vocab):
    cache, path = caches("zarr", kind, codec, compression, vocab)
    reader = CacheReader(str(cache))
    block = reader.read_shard(reader.shards[0])
    with xr.open_zarr(path, consolidated=False) as ds:
        assert ds.sizes["record"] == RECORDS and ds.sizes["token"] == len(block.input_ids)
        if kind != "sequence_probs":
            assert ds.sizes["position"] == block.num_positions  # topk_ids[position, k], entropy[position], ...
            np.testing.assert_array_equal(ds["label_offsets"].values, block.label_offsets)
        assert ds["lang"].values.tolist() == block.lang.tolist()
        np.testing.assert_array_equal(ds["input_ids"].values, block.input_ids)
        np.testing.assert_array_equal(ds["record_offsets"].values, block.token_offsets)
        names = {"token_topk": ("topk_ids", "topk_logprobs"), "token_sampled": ("sample_ids", "sample_counts"),
                 "token_topk_sampled": ("topk_ids", "topk_logprobs", "sample_ids", "sample_counts"),
                 "sequence_probs": ("class_logprobs", "label")}[kind]
        for name in names:
            np.testing.assert_array_equal(ds[name].values, getattr(block, name), err_msg=name)
