"""One student's runs over shared batches: micro-batches of its own size, short batches."""

import dataclasses

import numpy as np
import torch

from logitcache.pipeline.distill.collate import TokenPacker
from logitcache.pipeline.distill.students import build_student
from logitcache.pipeline.distill.training import StudentRun
from tests.pipeline.distill.test_students import manifest_for, student_cfg, tokenizer_info  # noqa: F401 (a fixture)

Record = dataclasses.make_dataclass("Record", ["record_id", "lang", "cursor", "input_ids", "context_length",
                                               "topk_ids", "topk_values"])


def records(lengths, *, k=4):
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(lengths):
        logprobs = np.log(np.full((n, k), 0.2, dtype=np.float32))
        out.append(Record(i, "en", (0, 0, i, 9), rng.integers(4, 300, n), 0,
                          rng.integers(4, 300, (n, k)), logprobs.astype(np.float16)))
    return out


def test_a_short_batch_trains_its_pieces_with_tokens_and_skips_its_padding_rows(tokenizer_info):  # noqa: F811
    manifest = manifest_for(tokenizer_info)
    student = build_student(student_cfg(), manifest=manifest, device=torch.device("cpu"), seed=0)
    run = StudentRun.create(student, total_steps=10, shared_rows=4, piece_rows=2)
    # 3 records in rows 0..1 of 4: rows 2 and 3 are padding, a piece with nothing to learn
    batch = TokenPacker(manifest.layout, rows=4, length=16).collate(records([10, 5, 12]))
    assert batch.row_tokens.tolist() == [15, 12, 0, 0]
    rows = list(run.train_on_shared(batch))
    assert run.step == 1 and len(rows) == 1 and rows[0]["tokens"] == 27
    assert all(p.grad is None for p in student.model.parameters())  # stepped, nothing pending

    full = TokenPacker(manifest.layout, rows=4, length=16).collate(records([10, 5, 12, 16, 16]))
    assert full.row_tokens.tolist() == [15, 12, 16, 16]
    rows = list(run.train_on_shared(full))
    assert run.step == 3 and [r["tokens"] for r in rows] == [27 + 27, 27 + 27 + 32]


def test_a_run_stops_inside_a_shared_batch_at_its_last_step(tokenizer_info):  # noqa: F811
    manifest = manifest_for(tokenizer_info)
    student = build_student(student_cfg(), manifest=manifest, device=torch.device("cpu"), seed=0)
    run = StudentRun.create(student, total_steps=3, shared_rows=4, piece_rows=1)
    batch = TokenPacker(manifest.layout, rows=4, length=16).collate(records([16, 16, 16, 16]))
    rows = list(run.train_on_shared(batch))
    assert run.done and [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["tokens"] == 48
