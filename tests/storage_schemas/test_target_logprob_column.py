"""The optional ``target_logprob`` column: stored by both backends, absent from older layouts."""

import json

import numpy as np
import pytest

from logitcache.storage_schemas.backends import get_backend
from logitcache.storage_schemas.layout import RecordLayout
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.records import block_to_table, table_to_block
from logitcache.storage_schemas.shard_writer import ShardWriter
from logitcache.storage_schemas.verify import verify_cache
from tests.factories import make_block, make_layout, make_template
from tests.storage_schemas.test_backends_equal import assert_backends_equal, write_both

TOKEN_KINDS = ("token_topk", "token_sampled", "token_topk_sampled")


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_both_backends_read_back_the_column_with_its_nans(tmp_path, kind):
    layout = make_layout(kind, target_logprob=True)
    block = make_block(layout, records=9, seed=3)
    location = CacheLocation(str(tmp_path))
    written = write_both(location, block, layout, row_group_tokens=20)
    assert_backends_equal(location, block, layout, written, 20)
    for backend, (rel, _) in written.items():
        got = get_backend(backend).read(location, rel, layout).target_logprob
        assert got.dtype == np.float16
        np.testing.assert_array_equal(np.isnan(got), np.isnan(block.target_logprob))
        last = block.label_offsets[1:] - 1
        assert np.isnan(got[last]).all() and np.isfinite(np.delete(got, last)).all()


def test_a_layout_without_the_column_keeps_its_old_dict_and_schema():
    old = make_layout("token_topk")
    assert "target_logprob" not in old.to_dict()
    assert RecordLayout.from_dict(old.to_dict()) == old  # a manifest written before the column
    assert "target_logprob" not in old.arrow_schema().names
    new = make_layout("token_topk", target_logprob=True)
    assert new.to_dict()["target_logprob"] is True and RecordLayout.from_dict(new.to_dict()) == new
    assert new.arrow_schema().names[-1] == "target_logprob"


def test_a_block_without_the_column_reads_as_not_available():
    layout = make_layout("token_sampled")
    block = table_to_block(block_to_table(make_block(layout), layout), layout)
    assert block.target_logprob is None


def test_verify_accepts_nan_at_last_tokens_only(tmp_path):
    layout = make_layout("token_topk", target_logprob=True)
    writer = ShardWriter(str(tmp_path / "ok"), template=make_template(layout))
    writer.commit(make_block(layout, seed=1), unit_id="u0")
    assert verify_cache(str(tmp_path / "ok"), deep=True).ok
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["layout"]["target_logprob"] is True

    bad = make_block(layout, seed=1)
    inside = np.setdiff1d(np.arange(bad.num_positions), bad.label_offsets[1:] - 1)
    bad.target_logprob[inside[0]] = np.nan
    writer = ShardWriter(str(tmp_path / "bad"), template=make_template(layout))
    writer.commit(bad, unit_id="u0")
    report = verify_cache(str(tmp_path / "bad"), deep=True)
    assert not report.ok and "target_logprob" in str(report.problems)
