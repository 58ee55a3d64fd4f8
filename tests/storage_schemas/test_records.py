import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.errors import CacheFormatError
from logitcache.storage_schemas.layout import KINDS, RecordLayout
from logitcache.storage_schemas.records import (
    RecordBlock,
    block_cuts,
    block_to_table,
    table_to_block,
)
from tests.factories import make_block, make_layout


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("codec", ["float32", "float16", "q8"])
@pytest.mark.parametrize("position_rows", [(), ("topk_ids",), ("topk_ids", "topk_logprobs")])
def test_arrow_round_trip(kind, codec, position_rows):
    layout = make_layout(kind, value_codec=codec)
    position_rows = position_rows if layout.has_topk else ()
    block = make_block(layout, records=9)
    table = block_to_table(block, layout, position_rows=position_rows)
    assert table.schema.equals(layout.arrow_schema(position_rows=position_rows))
    assert table_to_block(table, layout).equals(block)


@pytest.mark.parametrize("position_rows", [(), ("topk_ids", "topk_logprobs")])
def test_arrow_round_trip_of_a_slice(position_rows):
    # a sliced table has non-zero list and binary offsets: reading must rebase them
    layout = make_layout("token_topk_sampled")
    block = make_block(layout, records=10)
    table = block_to_table(block, layout, position_rows=position_rows)
    assert table_to_block(table.slice(3, 4), layout).equals(block.take_records(3, 7))


def test_a_top_k_record_value_is_a_view_of_the_column():
    # the point of one value per record: reading the rows is no copy
    layout = make_layout("token_topk", k=4)
    table = block_to_table(make_block(layout, records=6), layout)
    block = table_to_block(table, layout)
    data = table.column("topk_ids").chunk(0).buffers()[2]
    assert block.topk_ids.ctypes.data == data.address


def test_take_and_concat_are_inverse():
    layout = make_layout("token_topk_sampled")
    block = make_block(layout, records=11)
    parts = [block.take_records(a, b) for a, b in [(0, 4), (4, 4), (4, 11)]]
    assert RecordBlock.concat(parts).equals(block)


def test_missing_column_names_it():
    layout = make_layout("token_topk")
    table = block_to_table(make_block(layout), layout).drop_columns(["topk_ids"])
    with pytest.raises(CacheFormatError, match="topk_ids"):
        table_to_block(table, layout)


def test_validate_rejects_context_longer_than_record():
    layout = make_layout("token_topk")
    block = make_block(layout, records=3)
    block.context_length = np.diff(block.token_offsets).astype(np.uint32) + 1
    with pytest.raises(CacheFormatError, match="context_length"):
        block.validate(layout)


@given(st.lists(st.integers(0, 50), max_size=40), st.integers(1, 120))
def test_block_cuts_cover_every_record_once(lengths, target):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cuts = block_cuts(offsets, target)
    assert cuts[0] == 0 and cuts[-1] == len(lengths)
    assert all(b > a for a, b in zip(cuts[:-1], cuts[1:], strict=True)) or len(lengths) == 0
    for a, b in zip(cuts[:-2], cuts[1:-1], strict=True):  # every block but the last reaches the target
        assert offsets[b] - offsets[a] >= target


def test_lang_counts():
    layout = make_layout("token_topk")
    block = make_block(layout, records=12)
    counts = block.lang_counts()
    assert sum(c["records"] for c in counts.values()) == 12
    assert sum(c["tokens"] for c in counts.values()) == block.num_tokens


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS), codec=st.sampled_from(["float32", "float16", "q8"]),
       records=st.integers(0, 12), seed=st.integers(0, 10_000))
def test_arrow_round_trip_property(kind, codec, records, seed):
    layout = make_layout(kind, value_codec=codec)
    block = make_block(layout, records=records, seed=seed)
    assert table_to_block(block_to_table(block, layout), layout).equals(block)


def test_layout_errors_are_clear():
    with pytest.raises(CacheFormatError, match="unknown cache kind"):
        RecordLayout(kind="token_probs", id_type="uint16", vocab_size=10)
    with pytest.raises(CacheFormatError, match="k=20 is larger than the vocabulary"):
        RecordLayout(kind="token_topk", id_type="uint8", vocab_size=10, k=20)
    with pytest.raises(CacheFormatError, match="samples >= 1"):
        RecordLayout(kind="token_sampled", id_type="uint8", vocab_size=10)


def test_layout_schema_types():
    layout = make_layout("token_topk", k=8, value_codec="q8", vocab_size=150_000)
    schema = layout.arrow_schema()
    # format 3: one binary value per record (its positions' rows)
    assert schema.field("topk_ids").type == pa.large_binary()
    assert schema.field("topk_logprobs").type == pa.large_binary()
    # or one fixed-size binary per position (8 uint32 ids; 8 one-byte q8 values)
    per_position = layout.arrow_schema(position_rows={"topk_ids", "topk_logprobs"})
    assert per_position.field("topk_ids").type.value_type == pa.binary(32)
    assert per_position.field("topk_logprobs").type.value_type == pa.binary(8)
    assert not per_position.field("topk_ids").type.value_field.nullable
    with pytest.raises(ValueError, match="position_rows names no top-k column: entropy"):
        layout.arrow_schema(position_rows={"entropy"})
    legacy = layout.arrow_schema(format_1=True)
    assert legacy.field("topk_ids").type == pa.list_(pa.list_(pa.uint32(), 8))
    assert legacy.field("topk_logprobs").type == pa.list_(pa.list_(pa.uint8(), 8))
    assert RecordLayout.from_dict(layout.to_dict()) == layout


def test_take_records_with_offsets_not_starting_at_zero():
    layout = make_layout("token_topk_sampled")
    block = make_block(layout, records=8)
    shifted = make_block(layout, records=8)
    shifted.token_offsets = shifted.token_offsets + 1000
    shifted.sample_offsets = shifted.sample_offsets + 77
    for a, b in [(0, 8), (2, 5), (7, 8)]:
        assert shifted.take_records(a, b).equals(block.take_records(a, b))


def test_validate_checks_sample_lengths():
    layout = make_layout("token_sampled")
    block = make_block(layout, records=4)
    block.sample_counts = block.sample_counts[:-1]
    with pytest.raises(CacheFormatError, match="sample_counts"):
        block.validate(layout)
