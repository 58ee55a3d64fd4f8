"""KL and top-1 from draws: close to the exact values within the estimator's standard error."""

import math

import pytest
import torch

from logitcache.pipeline.distill.kl_estimates import estimated_kl, most_drawn, token_metric_kinds
from logitcache.pipeline.distill.losses import SparseTargets
from logitcache.pipeline.distill.metrics import token_metrics
from tests.factories import make_layout

V, P, DRAWS = 40, 300, 48


def dense_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs and student logits ``[P, V]`` (float64), peaked enough to differ."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(2.0 * torch.randn(P, V, generator=g, dtype=torch.float64), -1)
    z = logp + 0.7 * torch.randn(P, V, generator=g, dtype=torch.float64)
    return logp, z


def as_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[P, n]`` draws -> unique ids ``[P, n]`` ascending and their counts (0 = padding)."""
    ids = torch.zeros_like(draws)
    counts = torch.zeros(draws.shape, dtype=torch.float32)
    for p in range(draws.shape[0]):
        uniq, cnt = torch.unique(draws[p], return_counts=True)
        ids[p, :len(uniq)], counts[p, :len(uniq)] = uniq, cnt.float()
    return ids, counts


def exact_kl(logp: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - torch.log_softmax(z, -1))).sum(-1)


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def test_sampled_estimate_is_within_four_standard_errors_of_the_exact_kl():
    logp, z = dense_pair(0)
    g = torch.Generator().manual_seed(1)
    ids, counts = as_counts(torch.multinomial(logp.exp(), DRAWS, replacement=True, generator=g))
    targets = SparseTargets(kind="token_sampled", sample_ids=ids, sample_counts=counts)
    est = estimated_kl(z, targets, entropy_of(logp)).mean()
    logq = torch.log_softmax(z, -1)
    p = logp.exp()
    var = (p * logq ** 2).sum(-1) - (p * logq).sum(-1) ** 2  # Var_p(log q) per position
    se = math.sqrt(float((var / DRAWS).sum())) / P
    exact = exact_kl(logp, z).mean()
    assert abs(float(est - exact)) < 4 * se
    assert float(entropy_of(logp).mean()) > 20 * se  # forgetting to subtract H would fail


def test_hybrid_estimate_combines_the_exact_head_and_the_tail_draws():
    logp, z = dense_pair(2)
    k = 5
    head_lp, head_ids = torch.topk(logp, k, dim=-1)
    tail = logp.exp().scatter(1, head_ids, 0.0)
    g = torch.Generator().manual_seed(3)
    ids, counts = as_counts(torch.multinomial(tail / tail.sum(-1, keepdim=True), DRAWS, replacement=True, generator=g))
    targets = SparseTargets(kind="token_topk_sampled", topk_ids=head_ids, topk_logprobs=head_lp.float(),
                            sample_ids=ids, sample_counts=counts)
    est = estimated_kl(z, targets, entropy_of(logp)).mean()
    logq = torch.log_softmax(z, -1)
    r = tail.sum(-1)
    pt = tail / r[:, None]
    var = (pt * logq ** 2).sum(-1) - (pt * logq).sum(-1) ** 2
    se = math.sqrt(float((r ** 2 * var / DRAWS).sum())) / P
    assert abs(float(est - exact_kl(logp, z).mean())) < 4 * se
    # without the head's exact part the estimate would be far off
    tail_only = SparseTargets(kind="token_sampled", sample_ids=ids, sample_counts=counts)
    wrong = estimated_kl(z, tail_only, entropy_of(logp)).mean()
    assert abs(float(wrong - exact_kl(logp, z).mean())) > 10 * se


def test_most_drawn_breaks_ties_towards_the_smallest_id_and_ignores_padding():
    ids = torch.tensor([[2, 5, 9, 0], [1, 3, 0, 0]])
    counts = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 0.5, 0.0, 0.0]])
    assert most_drawn(ids, counts).tolist() == [5, 1]


def test_token_metrics_of_a_pure_sampled_cache_estimates_top1_from_the_most_drawn_id():
    logp, z = dense_pair(4)
    g = torch.Generator().manual_seed(5)
    ids, counts = as_counts(torch.multinomial(logp.exp(), DRAWS, replacement=True, generator=g))
    out = token_metrics(z.float(), sample_ids=ids, sample_counts=counts, entropy=entropy_of(logp).float())
    exact_top1 = (z.argmax(1) == logp.argmax(1)).double().mean()
    assert abs(float(out["top1"].mean() - exact_top1)) < 0.1
    assert torch.isfinite(out["kl"]).all()
    no_entropy = token_metrics(z.float(), sample_ids=ids, sample_counts=counts)
    assert torch.isnan(no_entropy["kl"]).all()


def test_a_hybrid_cache_without_entropy_keeps_the_top_k_bucket_kl():
    logp, z = dense_pair(6)
    head_lp, head_ids = torch.topk(logp.float(), 4, dim=-1)
    ids = torch.zeros(P, 3, dtype=torch.long)
    counts = torch.zeros(P, 3)
    hybrid = token_metrics(z.float(), topk_ids=head_ids, topk_logprobs=head_lp, sample_ids=ids, sample_counts=counts)
    topk = token_metrics(z.float(), topk_ids=head_ids, topk_logprobs=head_lp)
    torch.testing.assert_close(hybrid["kl"], topk["kl"])
    torch.testing.assert_close(hybrid["top1"], topk["top1"])


@pytest.mark.parametrize(("kind", "entropy", "kl", "top1"), [
    ("token_topk", False, "topk_buckets", "exact"),
    ("token_sampled", True, "estimated", "estimated"),
    ("token_sampled", False, None, "estimated"),
    ("token_topk_sampled", True, "estimated", "exact"),
    ("token_topk_sampled", False, "topk_buckets", "exact"),
])
def test_metric_kinds_say_what_is_exact_estimated_or_unavailable(kind, entropy, kl, top1):
    kinds = token_metric_kinds(make_layout(kind, entropy=entropy))
    assert (kinds["kl"], kinds["top1"]) == (kl, top1)
    assert kinds["kl_estimated"] == (kl == "estimated") and kinds["top1_estimated"] == (top1 == "estimated")
    if kl is None:
        assert "soft_labels.entropy: true" in kinds["note"]
