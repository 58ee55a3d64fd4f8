"""Evaluation metrics against plain dense computations and hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitcache.pipeline.distill.losses import (
    IGNORE_INDEX,
    TAIL_FLOOR,
    SparseTargets,
    dense_divergence,
    sparse_divergence,
)
from logitcache.pipeline.distill.metrics import (
    ClassificationMetrics,
    LanguageMetrics,
    macro_f1,
    token_metrics,
)
from tests.pipeline.distill.test_losses import coarse_log, student_logits, teacher_logprobs


def teacher_topk(n: int, v: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(2.0 * torch.randn(n, v, generator=g), dim=-1)
    values, ids = torch.topk(logp, k, dim=-1, sorted=True)
    ids, order = ids.sort(dim=-1)  # as the cache stores them: each row in id order
    return logp, ids, values.gather(-1, order)


def student(n: int, v: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (1.5 * torch.randn(n, v, generator=torch.Generator().manual_seed(seed))).to(dtype)


# -- token_metrics ----------------------------------------------------------------------------


def test_kl_with_k_equal_vocab_is_the_full_kl() -> None:
    logp, ids, values = teacher_topk(12, 9, 9, seed=0)
    logits = student(12, 9, seed=1)
    out = token_metrics(logits, topk_ids=ids, topk_logprobs=values)
    full = (logp.exp() * (logp - torch.log_softmax(logits, -1))).sum(-1)
    torch.testing.assert_close(out["kl"], full, rtol=1e-5, atol=1e-6)
    assert torch.isnan(out["ce"]).all()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_kl_with_k_below_vocab_is_the_coarse_grained_kl(k: int) -> None:
    n, v = 10, 11
    logp, ids, values = teacher_topk(n, v, k, seed=k)
    logits = student(n, v, seed=10 + k)
    logq = torch.log_softmax(logits.double(), -1)
    p_full, q_full = logp.double().exp(), logq.exp()
    expected = []
    for i in range(n):  # build the k + 1 buckets by hand, in float64
        cached = ids[i].tolist()
        rest = [j for j in range(v) if j not in cached]
        p = torch.cat([p_full[i, cached], p_full[i, rest].sum()[None]])
        q = torch.cat([q_full[i, cached], q_full[i, rest].sum()[None]])
        expected.append(float((p * (p.log() - q.log())).sum()))
    out = token_metrics(logits, topk_ids=ids, topk_logprobs=values)
    torch.testing.assert_close(out["kl"].double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)
    full = (p_full * (logp.double() - logq)).sum(-1)
    assert (out["kl"].double() <= full + 1e-5).all()  # coarse-graining only loses divergence


def test_zero_probabilities_and_student_mass_on_cached_ids() -> None:
    # teacher puts all mass on two ids (0 log 0 = 0 for the rest and the empty tail)
    ids = torch.tensor([[2, 0, 1]])
    values = torch.tensor([[math.log(0.75), math.log(0.25), -math.inf]])
    logits = torch.tensor([[0.0, 0.0, 0.0, -30.0]])  # tail mass ~ 3e-14: stable log needed
    out = token_metrics(logits, topk_ids=ids, topk_logprobs=values)
    expected = 0.75 * math.log(0.75 * 3) + 0.25 * math.log(0.25 * 3)
    assert out["kl"].item() == pytest.approx(expected, rel=1e-5)
    assert out["top1"].item() == 0.0  # student argmax is id 0, teacher top-1 is id 2


def test_ce_top1_and_missing_targets() -> None:
    n, v = 16, 7
    _, ids, values = teacher_topk(n, v, 3, seed=3)
    logits = student(n, v, seed=4, dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(5))
    targets[[1, 6, 11]] = IGNORE_INDEX
    out = token_metrics(logits, topk_ids=ids, topk_logprobs=values, hard_targets=targets)
    assert all(t.dtype == torch.float32 and t.shape == (n,) for t in out.values())
    reference = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    has = targets != IGNORE_INDEX
    torch.testing.assert_close(out["ce"][has], reference[has])
    assert torch.isnan(out["ce"][~has]).all()
    teacher_argmax = ids.gather(1, values.argmax(-1, keepdim=True)).squeeze(1)  # no ties in float32
    assert not torch.equal(teacher_argmax, ids[:, 0])  # id order: the first id is not the argmax
    expected_top1 = (logits.float().argmax(-1) == teacher_argmax).float()
    torch.testing.assert_close(out["top1"], expected_top1)
    assert 0 < expected_top1.sum() < n  # the seeds give both hits and misses


def test_without_topk_kl_and_top1_are_nan() -> None:
    out = token_metrics(student(4, 5, seed=0), hard_targets=torch.tensor([0, 1, IGNORE_INDEX, 4]))
    assert torch.isnan(out["kl"]).all() and torch.isnan(out["top1"]).all()
    assert torch.isfinite(out["ce"][[0, 1, 3]]).all()


def test_token_metrics_rejects_bad_inputs() -> None:
    logits = student(3, 5, seed=0)
    with pytest.raises(ValueError):
        token_metrics(logits, topk_ids=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        token_metrics(logits, hard_targets=torch.tensor([0, 5, 1]))


# -- LanguageMetrics --------------------------------------------------------------------------


def test_language_metrics_groups_and_skips_nans() -> None:
    acc = LanguageMetrics()
    acc.add(["en", "de", "en", "de", "en"], {
        "ce": torch.tensor([1.0, 2.0, 3.0, math.nan, 5.0]),
        "kl": np.array([0.1, 0.2, 0.3, 0.4, 0.5]),
        "top1": torch.tensor([1.0, 0.0, math.nan, 1.0, 0.0]),
    })
    s = acc.summary()
    assert list(s) == ["de", "en", "all"]
    assert s["en"]["positions"] == 3 and s["en"]["ce"] == pytest.approx(3.0)
    assert s["en"]["ppl"] == pytest.approx(math.exp(3.0))
    assert s["en"]["top1"] == pytest.approx(0.5)
    assert s["de"]["ce"] == pytest.approx(2.0) and s["de"]["kl"] == pytest.approx(0.3)
    assert s["all"]["positions"] == 5 and s["all"]["ce"] == pytest.approx(11.0 / 4)
    assert s["all"]["top1"] == pytest.approx(2.0 / 4)


def test_language_metrics_none_without_values() -> None:
    acc = LanguageMetrics()
    acc.add(np.array(["zh", "zh"]), {"ce": [math.nan, math.nan], "kl": [1.0, 2.0]})
    zh = acc.summary()["zh"]
    assert zh["positions"] == 2 and zh["ce"] is None and zh["ppl"] is None and zh["top1"] is None
    assert zh["kl"] == pytest.approx(1.5)
    empty = LanguageMetrics().summary()
    assert empty == {"all": {"positions": 0, "ce": None, "ppl": None, "kl": None, "top1": None}}
    with pytest.raises(ValueError):
        acc.add(["all"], {"ce": [1.0]})


def test_language_metrics_merge_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    langs = rng.choice(["ar", "en", "hi", "ru"], size=60)
    values = {m: rng.random(60) for m in ("ce", "kl", "top1")}
    values["ce"][rng.random(60) < 0.3] = np.nan
    whole, a, b = LanguageMetrics(), LanguageMetrics(), LanguageMetrics()
    whole.add(langs, values)
    a.add(langs[:25], {m: x[:25] for m, x in values.items()})
    b.add(langs[25:], {m: x[25:] for m, x in values.items()})
    merged = a.merge(b).summary()
    expected = whole.summary()
    assert merged.keys() == expected.keys()
    for lang, row in expected.items():
        assert merged[lang] == pytest.approx(row)
    restored = LanguageMetrics.from_dict(json.loads(json.dumps(whole.to_dict())))
    assert restored.summary() == expected
    with pytest.raises(ValueError):
        ClassificationMetrics.from_dict(whole.to_dict())


# -- ClassificationMetrics --------------------------------------------------------------------


def onehot_logits(classes: list[int], c: int = 3) -> torch.Tensor:
    return F.one_hot(torch.tensor(classes), c).float() * 5.0


def fixed_example() -> tuple[ClassificationMetrics, dict]:
    langs = ["en", "en", "en", "en", "en", "de", "de", "de"]
    pred = [0, 0, 1, 1, 0, 1, 0, 1]     # class 2 is never predicted
    teacher = [0, 1, 1, 1, 2, 1, 0, 0]
    gold = [0, 1, 1, 2, -1, 1, 0, -1]
    acc = ClassificationMetrics()
    acc.add(langs, student_logits=onehot_logits(pred),
            teacher_logprobs=torch.log_softmax(onehot_logits(teacher), -1), labels=torch.tensor(gold))
    return acc, {"langs": langs, "pred": pred, "teacher": teacher, "gold": gold}


def test_classification_accuracy_and_macro_f1_by_hand() -> None:
    acc, _ = fixed_example()
    s = acc.summary()
    assert list(s) == ["de", "en", "all"]
    en = s["en"]  # labelled: (gold, pred) = (0,0) (1,0) (1,1) (2,1)
    assert en["records"] == 5 and en["labelled"] == 4
    assert en["accuracy"] == pytest.approx(0.5)
    # F1: class 0 = 2/3, class 1 = 1/2, class 2 (never predicted) = 0
    assert en["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert en["teacher_accuracy"] == pytest.approx(3 / 4)  # teacher 0 1 1 1 vs gold 0 1 1 2
    assert en["agreement"] == pytest.approx(3 / 5)
    de = s["de"]  # labelled: (1,1) (0,0): perfect; class 2 occurs in neither
    assert de["labelled"] == 2 and de["accuracy"] == 1.0 and de["macro_f1"] == 1.0
    assert de["agreement"] == pytest.approx(2 / 3)
    al = s["all"]  # (0,0) (1,0) (1,1) (2,1) (1,1) (0,0)
    assert al["records"] == 8 and al["labelled"] == 6
    assert al["accuracy"] == pytest.approx(4 / 6)
    assert al["macro_f1"] == pytest.approx((4 / 5 + 4 / 6 + 0) / 3)
    assert al["teacher_accuracy"] == pytest.approx(5 / 6)


def test_classification_kl_matches_dense() -> None:
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    t_logp = torch.log_softmax(t_logits, -1)
    acc = ClassificationMetrics()
    acc.add(["a"] * 6, student_logits=s_logits, teacher_logprobs=t_logp, labels=[-1] * 6)
    expected = F.kl_div(torch.log_softmax(s_logits, -1), t_logp, log_target=True,
                        reduction="none").sum(-1).mean()
    row = acc.summary()["a"]
    assert row["kl"] == pytest.approx(expected.item(), rel=1e-5)
    assert row["labelled"] == 0 and row["accuracy"] is None and row["macro_f1"] is None


def test_macro_f1_of_empty_confusion_is_none() -> None:
    assert macro_f1(np.zeros((3, 3), dtype=np.int64)) is None


def test_classification_merge_and_round_trip() -> None:
    whole, info = fixed_example()
    a, b = ClassificationMetrics(), ClassificationMetrics()
    for part, sl in ((a, slice(0, 3)), (b, slice(3, 8))):
        part.add(info["langs"][sl], student_logits=onehot_logits(info["pred"][sl]),
                 teacher_logprobs=torch.log_softmax(onehot_logits(info["teacher"][sl]), -1),
                 labels=np.array(info["gold"][sl]))
    merged = a.merge(b).merge(ClassificationMetrics()).summary()
    expected = whole.summary()
    for lang, row in expected.items():
        assert merged[lang] == pytest.approx(row)
    restored = ClassificationMetrics.from_dict(json.loads(json.dumps(whole.to_dict())))
    assert restored.summary() == expected
    with pytest.raises(ValueError):
        whole.add(["en"], student_logits=torch.zeros(1, 4), teacher_logprobs=torch.zeros(1, 4),
                  labels=[0])


# -- the same tail treatment as the training loss ---------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 13])
def test_kl_is_the_loss_bucket_forward_kl_and_the_dense_coarse_grained_kl(k: int) -> None:
    # rows 0 and 1 as a lossy codec decodes them: a top-k summing to exactly 1 (tail 0) and to
    # 1.02 (q8 rounding up); with k < V both get the TAIL_FLOOR tail and are renormalised
    n, v = 12, 13
    logp = teacher_logprobs(n, v, seed=7)
    values, ids = torch.topk(logp, k, dim=-1)
    values[0] = values[0] - values[0].exp().sum().log()
    values[1] = values[1] - values[1].exp().sum().log() + math.log(1.02)
    z = student_logits(n, v, seed=8).detach()
    if k < v:
        p = torch.cat([values.exp(), (1.0 - values.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)], -1)
        want = dense_divergence(coarse_log(torch.log_softmax(z, -1), ids), (p / p.sum(-1, keepdim=True)).log())
    else:  # no tail bucket: the cached ids are the vocabulary
        want = dense_divergence(z.gather(1, ids), values)
    loss_kl = sparse_divergence(z, SparseTargets(kind="token_topk", topk_ids=ids, topk_logprobs=values),
                                kind="forward_kl", tail="bucket")
    torch.testing.assert_close(loss_kl, want, rtol=1e-10, atol=1e-12)
    metric_kl = token_metrics(z, topk_ids=ids, topk_logprobs=values)["kl"]  # computed in float32
    torch.testing.assert_close(metric_kl, want.float(), rtol=1e-5, atol=1e-6)
    loss_kl32 = sparse_divergence(z.float(), SparseTargets(kind="token_topk", topk_ids=ids,
                                                            topk_logprobs=values.float()), kind="forward_kl")
    assert torch.equal(metric_kl, loss_kl32)  # one function: the same float32 values bit for bit


def test_top1_counts_any_id_tied_at_the_top_of_a_quantised_row():
    # q8 stores two near-equal leaders as the same level: either is the teacher's top-1
    ids = torch.tensor([[3, 5, 9], [3, 5, 9]])
    values = torch.tensor([[-0.5, -0.5, -3.0], [-0.5, -0.4, -3.0]])
    logits = torch.full((2, 10), -5.0)
    logits[:, 5] = 0.0  # the student picks id 5 at both positions
    out = token_metrics(logits, topk_ids=ids, topk_logprobs=values, hard_targets=torch.tensor([5, 5]))
    assert out["top1"].tolist() == [1.0, 1.0]
    logits[:, 5], logits[:, 3] = -5.0, 0.0  # now id 3: tied with the top at the first position only
    out = token_metrics(logits, topk_ids=ids, topk_logprobs=values, hard_targets=torch.tensor([5, 5]))
    assert out["top1"].tolist() == [1.0, 0.0]
