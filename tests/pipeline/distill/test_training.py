"""One student's runs over shared batches: micro-batches of its own size, short batches."""

import dataclasses

import numpy as np
import pytest
import torch

from logitcache.pipeline.distill.collate import TokenPacker
from logitcache.pipeline.distill.losses import SparseTargets, distillation_loss
from logitcache.pipeline.distill.students import build_student
from logitcache.pipeline.distill.training import StudentRun, token_batch_loss
from tests.factories import make_layout
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


# -- the logged kd: one quantity (a KL to the teacher) on every cache kind -------------------

KdRecord = dataclasses.make_dataclass(
    "KdRecord", ["record_id", "lang", "cursor", "input_ids", "context_length", "topk_ids", "topk_values",
                 "sample_offsets", "sample_ids", "sample_counts", "entropy"])


def dense_teacher_records(vocab, *, draws, lengths=(12, 9, 14)):
    """Records of one dense teacher, holding all V log-probs (a k = V top-k cache) and
    ``draws`` draws per position with the entropy (a sampled cache)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(lengths):
        logp = torch.log_softmax(3.0 * torch.randn(n, vocab, generator=g), -1)
        top_lp, top_ids = torch.sort(logp, dim=-1, descending=True)
        drawn = torch.multinomial(logp.exp(), draws, replacement=True, generator=g)
        ids, counts, offsets = [], [], [0]
        for row in drawn:
            uniq, cnt = torch.unique(row, return_counts=True)
            ids.append(uniq.numpy())
            counts.append(cnt.numpy())
            offsets.append(offsets[-1] + len(uniq))
        out.append(KdRecord(i, "en", (0, 0, i, 9), np.arange(n) * 7 % 300 + 4, 0, top_ids.numpy(), top_lp.numpy(),
                            np.array(offsets), np.concatenate(ids), np.concatenate(counts),
                            -(logp.exp() * logp).sum(-1).numpy()))
    return out


def kd_batches(tokenizer_info, *, entropy=True):  # noqa: F811
    vocab = tokenizer_info["vocab_size"]
    records_ = dense_teacher_records(vocab, draws=128)
    dense = dataclasses.replace(make_layout("token_topk", k=vocab, vocab_size=vocab, value_codec="float32"),
                                entropy=False)
    sampled = make_layout("token_sampled", samples=128, vocab_size=vocab, entropy=entropy)
    pack = {name: TokenPacker(layout, rows=2, length=24).collate(records_)
            for name, layout in (("dense", dense), ("sampled", sampled))}
    return pack, records_


def test_logged_kd_of_a_sampled_cache_is_the_kl_a_dense_top_k_cache_logs(tokenizer_info):  # noqa: F811
    manifest = manifest_for(tokenizer_info)
    student = build_student(student_cfg(), manifest=manifest, device=torch.device("cpu"), seed=0)
    batches, _ = kd_batches(tokenizer_info)
    with torch.no_grad():
        dense, sampled = (token_batch_loss(student, batches[name]) for name in ("dense", "sampled"))
    assert dense.kd_log_name == sampled.kd_log_name == "kd"
    # the standard error of the draws' CE estimate, from the dense teacher and the student
    batch = batches["dense"]
    with torch.no_grad():
        logq = torch.log_softmax(student.head(student.hidden_states(batch.input_ids, batch.position_ids)
                                              [batch.label_mask]).float(), -1)
    p = torch.zeros_like(logq).scatter_(1, batch.topk_ids[batch.label_mask], batch.topk_logprobs[batch.label_mask].exp())
    var = (p * logq ** 2).sum(-1) - (p * logq).sum(-1) ** 2
    se = float((var / 128).sum().sqrt()) / len(var)
    assert abs(float(sampled.kd_for_log - dense.kd_for_log)) < 4 * se + 2e-3  # + float16 entropy rounding
    assert float(sampled.kd - sampled.kd_for_log) > 1.0  # the loss's own value is the CE, entropy included


def test_the_sampled_loss_and_its_gradient_are_those_of_the_loss_without_entropy(tokenizer_info):  # noqa: F811
    manifest = manifest_for(tokenizer_info)
    student = build_student(student_cfg(), manifest=manifest, device=torch.device("cpu"), seed=0)
    batch = kd_batches(tokenizer_info)[0]["sampled"]
    grads = []
    for entropy in (batch.entropy, None):
        student.model.zero_grad(set_to_none=True)
        mask = batch.label_mask
        hidden = student.hidden_states(batch.input_ids, batch.position_ids)[mask]
        targets = SparseTargets(kind="token_sampled", sample_ids=batch.sample_ids[mask],
                                sample_counts=batch.sample_counts[mask])
        out = distillation_loss(hidden, student.head, targets, batch.hard_targets[mask], cfg=student.cfg.loss,
                                vocab_size=student.target_width,
                                teacher_entropy=None if entropy is None else entropy[mask])
        out.total.backward()
        grads.append((float(out.total.detach()), float(out.kd.detach()), [p.grad.clone() for p in student.model.parameters()]))
    (total_a, kd_a, grad_a), (total_b, kd_b, grad_b) = grads
    assert total_a == total_b and kd_a == kd_b
    for a, b in zip(grad_a, grad_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_run_logs_kd_with_entropy_and_kd_ce_without(tokenizer_info):  # noqa: F811
    manifest = manifest_for(tokenizer_info)
    for entropy, name in ((True, "kd"), (False, "kd_ce")):
        student = build_student(student_cfg(), manifest=manifest, device=torch.device("cpu"), seed=0)
        run = StudentRun.create(student, total_steps=2)
        batch = kd_batches(tokenizer_info, entropy=entropy)[0]["sampled"]
        with torch.no_grad():
            expected = token_batch_loss(student, batch).kd_for_log
        row = run.train_on(batch)
        assert name in row and ({"kd", "kd_ce"} - {name}).isdisjoint(row)
        assert row[name] == pytest.approx(float(expected), rel=1e-5)
