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
@pytest.mark.parametrize("vocab_size", [200, 1000, 70_000])  # uint8, uint16 and uint32 ids
def test_arrow_round_trip(kind, codec, vocab_size):
    layout = make_layout(kind, value_codec=codec, vocab_size=vocab_size)
    block = make_block(layout, records=9)
    table = block_to_table(block, layout)
    assert table.schema.equals(layout.arrow_schema())
    assert table_to_block(table, layout).equals(block)


def test_arrow_round_trip_of_a_slice():
    # a sliced table has non-zero list and binary offsets: reading must rebase them
    layout = make_layout("token_topk_sampled")
    block = make_block(layout, records=10)
    table = block_to_table(block, layout)
    assert table_to_block(table.slice(3, 4), layout).equals(block.take_records(3, 7))


@pytest.mark.parametrize("vocab_size", [200, 1000, 70_000])
def test_soft_label_columns_have_one_physical_type_whatever_the_vocabulary(vocab_size):
    for kind in ("token_topk", "token_topk_sampled"):
        for codec in ("float32", "float16", "q8"):
            schema = make_layout(kind, value_codec=codec, vocab_size=vocab_size).arrow_schema()
            for name in ("topk_ids", "topk_logprobs"):
                assert schema.field(name).type == pa.large_binary()
    schema = make_layout("token_sampled", vocab_size=vocab_size).arrow_schema()
    assert schema.field("sample_ids").type == pa.large_binary()
    assert schema.field("undrawn_positions").type == pa.list_(pa.field("element", pa.uint32(), nullable=False))


def test_positions_without_draws_round_trip():
    layout = make_layout("token_topk_sampled", samples=5)
    block = make_block(layout, records=30, seed=3)
    undrawn = np.diff(block.sample_offsets) == 0
    assert undrawn.any() and not undrawn.all()
    table = block_to_table(block, layout)
    listed = sum(len(v) for v in table.column("undrawn_positions").to_pylist())
    assert listed == int(undrawn.sum())
    assert table_to_block(table, layout).equals(block)


def test_top_k_rows_out_of_id_order_are_refused():
    layout = make_layout("token_topk", k=4)
    block = make_block(layout, records=3)
    block.topk_ids[1] = block.topk_ids[1][::-1].copy()
    with pytest.raises(CacheFormatError, match="ascending order"):
        block_to_table(block, layout)


def test_draws_that_do_not_sum_to_samples_are_refused():
    layout = make_layout("token_sampled", samples=6)
    block = make_block(layout, records=3)
    block.sample_counts = block.sample_counts.copy()
    block.sample_counts[0] += 1
    with pytest.raises(CacheFormatError, match="summing to 6"):
        block_to_table(block, layout)


def test_an_undrawn_position_outside_its_record_is_a_format_error():
    layout = make_layout("token_topk_sampled")
    block = make_block(layout, records=4)
    table = block_to_table(block, layout)
    wrong = pa.array([[10_000]] + [[] for _ in range(3)], table.schema.field("undrawn_positions").type)
    table = table.set_column(table.schema.get_field_index("undrawn_positions"), "undrawn_positions", wrong)
    with pytest.raises(CacheFormatError, match="outside its record"):
        table_to_block(table, layout)


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
       records=st.integers(0, 12), seed=st.integers(0, 10_000),
       vocab_size=st.sampled_from([60, 256, 257, 65_536, 65_537, 1 << 20]))
def test_arrow_round_trip_property(kind, codec, records, seed, vocab_size):
    layout = make_layout(kind, value_codec=codec, vocab_size=vocab_size)
    block = make_block(layout, records=records, seed=seed)
    assert table_to_block(block_to_table(block, layout), layout).equals(block)


def test_layout_errors_are_clear():
    with pytest.raises(CacheFormatError, match="unknown cache kind"):
        RecordLayout(kind="token_probs", id_type="uint16", vocab_size=10)
    with pytest.raises(CacheFormatError, match="k=20 is larger than the vocabulary"):
        RecordLayout(kind="token_topk", id_type="uint8", vocab_size=10, k=20)
    with pytest.raises(CacheFormatError, match="samples >= 1"):
        RecordLayout(kind="token_sampled", id_type="uint8", vocab_size=10)


def test_layout_schema_metadata_says_how_to_decode():
    layout = make_layout("token_topk", k=8, value_codec="q8", vocab_size=150_000)
    schema = layout.arrow_schema()
    ids = schema.field("topk_ids").metadata
    assert ids[b"logitcache.rows"] == b"8 x uint32 ids per position, ascending, as gaps"
    assert ids[b"logitcache.row_bytes"] == b"4 byte planes (lowest byte first) per row"
    assert schema.field("topk_logprobs").metadata[b"logitcache.row_bytes"] == b"one byte plane per row"
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
