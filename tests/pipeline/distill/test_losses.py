"""Distillation losses from sparse cached targets, against dense references built by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.config import LossConfig
from logitcache.errors import ConfigError
from logitcache.pipeline.distill.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    TAIL_FLOOR,
    SparseTargets,
    check_loss_supported,
    dense_distillation_loss,
    dense_divergence,
    distillation_loss,
    sequence_distillation_loss,
    sparse_divergence,
)

TAILS = ("bucket", "renormalize")
F64 = torch.float64


def teacher_logprobs(positions: int, vocab: int, *, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(positions, vocab, generator=g, dtype=F64) * scale, dim=-1)


def student_logits(positions: int, vocab: int, *, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(positions, vocab, generator=g, dtype=F64) * 1.5).requires_grad_(True)


def topk_targets(logp: torch.Tensor, k: int) -> SparseTargets:
    values, ids = torch.topk(logp, k, dim=-1, sorted=True)
    return SparseTargets(kind="token_topk", topk_ids=ids, topk_logprobs=values)


def value_and_grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    value = fn(z)
    (grad,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), grad


def coarse_log(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the (k+1)-outcome distribution {ids..., tail}, built explicitly from probabilities."""
    p = logp.exp()
    head = p.gather(1, ids)
    tail = 1.0 - head.sum(-1, keepdim=True)
    return torch.cat([head, tail], dim=-1).log()


def numpy_divergence(p: np.ndarray, q: np.ndarray, kind: str, beta: float) -> np.ndarray:
    """Textbook formulas in numpy (all probabilities > 0 here)."""
    if kind == "forward_kl":
        return (p * np.log(p / q)).sum(-1)
    if kind == "reverse_kl":
        return (q * np.log(q / p)).sum(-1)
    if kind == "soft_ce":
        return -(p * np.log(q)).sum(-1)
    if kind == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)


# -- the divergences themselves ---------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_divergence_matches_textbook_formulas(kind: str, temperature: float) -> None:
    logp, z = teacher_logprobs(5, 11), student_logits(5, 11).detach()
    p = torch.softmax(logp / temperature, -1).numpy()
    q = torch.softmax(z / temperature, -1).numpy()
    got = dense_divergence(z, logp, kind=kind, temperature=temperature, beta=0.3).numpy()
    np.testing.assert_allclose(got, numpy_divergence(p, q, kind, 0.3), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_with_full_vocabulary_equals_dense(kind: str, tail: str, temperature: float) -> None:
    vocab = 13
    logp, z = teacher_logprobs(6, vocab), student_logits(6, vocab)
    targets = topk_targets(logp, vocab)
    opts = {"kind": kind, "temperature": temperature, "beta": 0.3}
    sparse, g_sparse = value_and_grad(lambda x: sparse_divergence(x, targets, tail=tail, **opts), z)
    dense, g_dense = value_and_grad(lambda x: dense_divergence(x, logp, **opts), z)
    assert torch.allclose(sparse, dense, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_sparse, g_dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bucket_equals_dense_on_hand_built_coarse_distributions(kind: str) -> None:
    vocab, k = 17, 4
    logp, z = teacher_logprobs(7, vocab), student_logits(7, vocab)
    targets = topk_targets(logp, k)
    ids = targets.topk_ids
    sparse, g_sparse = value_and_grad(
        lambda x: sparse_divergence(x, targets, kind=kind, temperature=1.0, beta=0.7, tail="bucket"), z)
    dense, g_dense = value_and_grad(
        lambda x: dense_divergence(coarse_log(torch.log_softmax(x, -1), ids), coarse_log(logp, ids),
                                   kind=kind, temperature=1.0, beta=0.7), z)
    assert torch.allclose(sparse, dense, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g_sparse, g_dense, rtol=1e-8, atol=1e-12)
    # the tail outcome matters: dropping it (renormalize) gives a different value
    renorm = sparse_divergence(z, targets, kind=kind, tail="renormalize").detach()
    assert not torch.allclose(sparse, renorm, rtol=1e-3)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_renormalize_equals_dense_on_the_kept_ids(kind: str, temperature: float) -> None:
    vocab, k = 17, 5
    logp, z = teacher_logprobs(7, vocab), student_logits(7, vocab)
    targets = topk_targets(logp, k)
    ids = targets.topk_ids
    opts = {"kind": kind, "temperature": temperature, "beta": 0.4}
    sparse, g_sparse = value_and_grad(lambda x: sparse_divergence(x, targets, tail="renormalize", **opts), z)
    dense, g_dense = value_and_grad(lambda x: dense_divergence(x.gather(1, ids), logp.gather(1, ids), **opts), z)
    assert torch.allclose(sparse, dense, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g_sparse, g_dense, rtol=1e-8, atol=1e-12)
    assert (g_sparse.scatter(1, ids, 0.0) == 0).all()  # no gradient at all outside the kept ids


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 12), k_frac=st.floats(0.0, 1.0),
       scale=st.floats(0.1, 6.0), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       beta=st.floats(0.05, 0.95))
def test_divergences_nonnegative_and_zero_when_student_is_teacher(
        seed: int, vocab: int, k_frac: float, scale: float, temperature: float, beta: float) -> None:
    k = max(1, min(vocab, round(k_frac * vocab)))
    logp = teacher_logprobs(3, vocab, seed=seed, scale=scale)
    z = student_logits(3, vocab, seed=seed + 1).detach()
    targets = topk_targets(logp, k)
    for kind in DIVERGENCES:
        for tail in TAILS:
            opts = {"kind": kind, "temperature": temperature, "beta": beta, "tail": tail}
            assert (sparse_divergence(z, targets, **opts) >= -1e-12).all()
            if kind == "soft_ce":
                continue
            same = sparse_divergence(logp, targets, **opts)  # student logits == teacher log-probs
            tail_mass = 1.0 - targets.topk_logprobs.exp().sum(-1)
            if k == vocab or tail == "renormalize" or (temperature == 1.0 and (tail_mass > 1e-5).all()):
                assert torch.allclose(same, torch.zeros_like(same), atol=1e-10), (kind, tail, k)


# -- robustness -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_quantised_targets_summing_over_one_stay_finite(kind: str, tail: str) -> None:
    vocab, k = 9, 3
    logp = teacher_logprobs(4, vocab, scale=6.0)
    values, ids = torch.topk(logp, k, dim=-1)
    values = (values - values.exp().sum(-1, keepdim=True).log() + math.log(1.002)).float()  # sums to 1.002
    targets = SparseTargets(kind="token_topk", topk_ids=ids, topk_logprobs=values)
    z = student_logits(4, vocab).float().detach().requires_grad_(True)
    value, grad = value_and_grad(lambda x: sparse_divergence(x, targets, kind=kind, temperature=2.0, tail=tail), z)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert (value >= -1e-6).all()


def test_over_unity_topk_gets_the_floor_tail_and_is_renormalised() -> None:
    vocab, k = 9, 3
    logp, z = teacher_logprobs(4, vocab), student_logits(4, vocab)
    values, ids = torch.topk(logp, k, dim=-1)
    values = values - values.exp().sum(-1, keepdim=True).log() + math.log(1.01)  # top-k sums to 1.01
    targets = SparseTargets(kind="token_topk", topk_ids=ids, topk_logprobs=values)
    p = torch.cat([values.exp(), torch.full((4, 1), TAIL_FLOOR, dtype=F64)], -1)
    log_p = (p / p.sum(-1, keepdim=True)).log()
    want = dense_divergence(coarse_log(torch.log_softmax(z, -1), ids), log_p, kind="forward_kl")
    assert torch.allclose(sparse_divergence(z, targets, kind="forward_kl"), want, rtol=1e-10)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_exactly_zero_teacher_tail_and_zero_probabilities_give_finite_gradients(kind: str) -> None:
    vocab = 6
    logp = teacher_logprobs(3, vocab)
    logp[:, -2:] = -math.inf  # teacher gives two ids probability 0
    logp = torch.log_softmax(logp, -1)
    z = student_logits(3, vocab)
    for k in (vocab, 4):  # k == V (tail outside ids is empty), and k < V with tail mass 0 exactly
        targets = topk_targets(logp, k)
        for tail in TAILS:
            value, grad = value_and_grad(lambda x, t=targets, tl=tail: sparse_divergence(x, t, kind=kind, tail=tl), z)
            assert torch.isfinite(value).all() and torch.isfinite(grad).all(), (k, tail)


def test_bf16_student_logits_are_computed_in_float32() -> None:
    vocab, k = 64, 8
    logp = teacher_logprobs(16, vocab, scale=4.0)
    targets = topk_targets(logp, k)
    z = (student_logits(16, vocab) * 4).detach().bfloat16()
    for kind in DIVERGENCES:
        got = sparse_divergence(z, targets, kind=kind, temperature=2.0)
        want = sparse_divergence(z.float(), targets, kind=kind, temperature=2.0)
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), kind


# -- the chunked loss -------------------------------------------------------------------------


class CountingHead(torch.nn.Module):
    """An output head that records the rows of every forward call and of every logits gradient."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden, vocab, bias=False, dtype=F64)
        self.forward_rows: list[int] = []
        self.backward_rows: list[int] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.forward_rows.append(int(h.shape[0]))
        out = self.linear(h)
        if out.requires_grad:
            out.register_hook(lambda g: self.backward_rows.append(int(g.shape[0])))
        return out


def reference_loss(hidden, head, targets, hard, cfg: LossConfig):
    """Unchunked: all [P, V] logits at once, straight through sparse_divergence and cross_entropy."""
    logits = head(hidden)
    kd = sparse_divergence(logits, targets, kind=cfg.kind, temperature=cfg.temperature,
                           beta=cfg.beta, tail=cfg.tail).mean() * cfg.temperature ** 2
    keep = hard != IGNORE_INDEX
    ce = F.cross_entropy(logits[keep], hard[keep], reduction="sum") / max(int(keep.sum()), 1)
    return cfg.alpha * kd + (1 - cfg.alpha) * ce, kd, ce


@pytest.mark.parametrize(("kind", "tail", "temperature"),
                         [("forward_kl", "bucket", 2.0), ("jsd", "renormalize", 1.0), ("reverse_kl", "bucket", 1.5)])
def test_chunked_loss_equals_unchunked_and_never_builds_all_logits(kind: str, tail: str, temperature: float) -> None:
    positions, hidden_size, vocab, k, chunk = 13, 8, 31, 5, 4
    torch.manual_seed(0)
    head = CountingHead(hidden_size, vocab)
    hidden = torch.randn(positions, hidden_size, dtype=F64, requires_grad=True)
    targets = topk_targets(teacher_logprobs(positions, vocab), k)
    hard = torch.randint(0, vocab, (positions,))
    hard[[2, 7]] = IGNORE_INDEX
    cfg = LossConfig(kind=kind, tail=tail, temperature=temperature, alpha=0.6, chunk_tokens=chunk)

    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = distillation_loss(hidden, head, targets, hard, cfg=cfg)
    out.total.backward()
    g_hidden, g_weight = hidden.grad.clone(), head.linear.weight.grad.clone()
    # one chunk at a time in forward, its recomputation, and backward; 13 = 4 + 4 + 4 + 1
    assert head.forward_rows == [4, 4, 4, 1, 1, 4, 4, 4]  # 4 forwards, then 4 recomputations in backward
    assert sorted(head.backward_rows) == [1, 4, 4, 4]
    assert all(math.prod(s) < chunk * vocab for s in saved), saved  # no logits kept outside a chunk
    assert (out.kd_positions, out.ce_positions) == (13, 11)

    hidden.grad, head.linear.weight.grad = None, None
    total, kd, ce = reference_loss(hidden, head, targets, hard, cfg)
    total.backward()
    assert torch.allclose(out.total, total, rtol=1e-12) and torch.allclose(out.kd, kd, rtol=1e-12)
    assert torch.allclose(out.ce, ce, rtol=1e-12)
    assert torch.allclose(g_hidden, hidden.grad, rtol=1e-10, atol=1e-14)
    assert torch.allclose(g_weight, head.linear.weight.grad, rtol=1e-10, atol=1e-14)


def test_chunked_loss_with_sampled_targets_equals_unchunked() -> None:
    positions, hidden_size, vocab, k, samples = 10, 6, 20, 3, 5
    torch.manual_seed(1)
    head = torch.nn.Linear(hidden_size, vocab, dtype=F64)
    hidden = torch.randn(positions, hidden_size, dtype=F64, requires_grad=True)
    base = topk_targets(teacher_logprobs(positions, vocab), k)
    ids = torch.randint(0, vocab, (positions, samples))
    counts = torch.randint(0, 3, (positions, samples))
    targets = SparseTargets(kind="token_topk_sampled", topk_ids=base.topk_ids, topk_logprobs=base.topk_logprobs,
                            sample_ids=ids, sample_counts=counts)
    cfg = LossConfig(kind="soft_ce", temperature=1.0, alpha=1.0, chunk_tokens=3)
    out = distillation_loss(hidden, head, targets, None, cfg=cfg)
    (g_chunked,) = torch.autograd.grad(out.total, hidden)
    total, _, _ = reference_loss(hidden, head, targets, torch.full((positions,), IGNORE_INDEX), cfg)
    (g_ref,) = torch.autograd.grad(total, hidden)
    assert torch.allclose(out.total, total, rtol=1e-12) and torch.allclose(g_chunked, g_ref, rtol=1e-10)
    assert out.ce_positions == 0 and out.ce.item() == 0.0


def test_alpha_mixing_ignored_targets_and_temperature_factor() -> None:
    positions, hidden_size, vocab = 9, 5, 12
    torch.manual_seed(2)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=F64)
    hidden = torch.randn(positions, hidden_size, dtype=F64)
    targets = topk_targets(teacher_logprobs(positions, vocab), 4)
    hard = torch.randint(0, vocab, (positions,))
    hard[::3] = IGNORE_INDEX
    logits = head(hidden)
    div = sparse_divergence(logits, targets, kind="forward_kl", temperature=3.0).mean()
    ce_ref = F.cross_entropy(logits[hard != IGNORE_INDEX], hard[hard != IGNORE_INDEX])

    pure_kd = distillation_loss(hidden, head, targets, hard, cfg=LossConfig(temperature=3.0, alpha=1.0, chunk_tokens=4))
    assert torch.allclose(pure_kd.total, 9.0 * div, rtol=1e-12)  # the T**2 factor
    pure_ce = distillation_loss(hidden, head, targets, hard, cfg=LossConfig(temperature=3.0, alpha=0.0, chunk_tokens=4))
    assert torch.allclose(pure_ce.total, ce_ref, rtol=1e-12) and pure_ce.ce_positions == 6
    mixed = distillation_loss(hidden, head, targets, hard, cfg=LossConfig(temperature=3.0, alpha=0.25, chunk_tokens=4))
    assert torch.allclose(mixed.total, 0.25 * 9.0 * div + 0.75 * ce_ref, rtol=1e-12)
    none = distillation_loss(hidden, head, targets, torch.full((positions,), IGNORE_INDEX), cfg=LossConfig(alpha=0.0))
    assert none.total.item() == 0.0 and none.ce_positions == 0


def test_dense_distillation_loss_matches_sparse_with_full_vocabulary() -> None:
    logp, z = teacher_logprobs(8, 10), student_logits(8, 10).detach()
    hard = torch.tensor([1, IGNORE_INDEX, 3, 4, IGNORE_INDEX, 0, 9, 2])
    cfg = LossConfig(kind="jsd", beta=0.2, temperature=2.0, alpha=0.4, chunk_tokens=3)
    dense = dense_distillation_loss(z, logp, hard, cfg=cfg)
    sparse = distillation_loss(z, lambda h: h, topk_targets(logp, 10), hard, cfg=cfg)
    assert torch.allclose(dense.total, sparse.total, rtol=1e-12) and dense.ce_positions == 6


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_chunked_loss_with_full_vocabulary_has_the_dense_values_and_gradients(kind: str, tail: str) -> None:
    positions, hidden_size, vocab = 11, 6, 9
    torch.manual_seed(4)
    head = torch.nn.Linear(hidden_size, vocab, dtype=F64)
    hidden = torch.randn(positions, hidden_size, dtype=F64, requires_grad=True)
    logp = teacher_logprobs(positions, vocab, seed=5)
    hard = torch.randint(0, vocab, (positions,))
    hard[[0, 6]] = IGNORE_INDEX
    cfg = LossConfig(kind=kind, tail=tail, temperature=2.0, alpha=0.7, beta=0.3, chunk_tokens=4)
    params = [hidden, head.weight, head.bias]

    chunked = distillation_loss(hidden, head, topk_targets(logp, vocab), hard, cfg=cfg)
    chunked_grads = torch.autograd.grad(chunked.total, params)
    dense = dense_distillation_loss(head(hidden), logp, hard, cfg=cfg)
    dense_grads = torch.autograd.grad(dense.total, params)
    for got, expected in ((chunked.total, dense.total), (chunked.kd, dense.kd), (chunked.ce, dense.ce)):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    for got, expected in zip(chunked_grads, dense_grads, strict=True):
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert float(dense_grads[0].abs().max()) > 1e-3  # gradients that could differ


def test_head_wider_than_vocabulary_is_sliced() -> None:
    positions, hidden_size, vocab, padded = 7, 4, 10, 16
    torch.manual_seed(3)
    wide = torch.nn.Linear(hidden_size, padded, bias=False, dtype=F64)
    with torch.no_grad():
        wide.weight[vocab:] = 5.0  # padding rows that would take probability if not sliced
    narrow = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=F64)
    with torch.no_grad():
        narrow.weight.copy_(wide.weight[:vocab])
    hidden = torch.randn(positions, hidden_size, dtype=F64)
    targets = topk_targets(teacher_logprobs(positions, vocab), 3)
    hard = torch.randint(0, vocab, (positions,))
    cfg = LossConfig(alpha=0.5, chunk_tokens=3)
    got = distillation_loss(hidden, wide, targets, hard, cfg=cfg, vocab_size=vocab)
    want = distillation_loss(hidden, narrow, targets, hard, cfg=cfg)
    got.total.backward()
    assert torch.allclose(got.total, want.total, rtol=1e-12)
    assert (wide.weight.grad[vocab:] == 0).all()
    with pytest.raises(ConfigError, match="fewer than the vocabulary"):
        distillation_loss(hidden, narrow, targets, hard, cfg=cfg, vocab_size=padded)


# -- sampled caches ---------------------------------------------------------------------------


def compact(counts: np.ndarray, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense counts [N, V] -> (ids, counts) [N, width], nonzero first, padded with count 0."""
    order = np.argsort(-counts, axis=1, kind="stable")[:, :width]
    return torch.from_numpy(order), torch.from_numpy(np.take_along_axis(counts, order, axis=1))


def test_sampled_estimator_is_unbiased_for_soft_ce_and_forward_kl_gradient() -> None:
    vocab, samples, trials = 15, 6, 4000
    logp = teacher_logprobs(1, vocab, seed=5)[0]
    z = student_logits(1, vocab, seed=6)[0].detach().requires_grad_(True)
    rng = np.random.default_rng(0)
    counts = rng.multinomial(samples, logp.exp().numpy(), size=trials)
    ids, cnt = compact(counts, samples)
    targets = SparseTargets(kind="token_sampled", sample_ids=ids, sample_counts=cnt)
    est = sparse_divergence(z.expand(trials, vocab), targets, kind="forward_kl")
    (grad,) = torch.autograd.grad(est.mean(), z)
    exact = dense_divergence(z[None], logp[None], kind="soft_ce")[0]
    stderr = est.detach().std() / math.sqrt(trials)
    assert abs(est.mean().item() - exact.item()) < 5 * stderr.item()
    # gradient of the estimate is q - c/n; its mean is unbiased for forward KL's q - p
    kl_grad = torch.autograd.grad(dense_divergence(z[None], logp[None], kind="forward_kl").sum(), z)[0]
    p = logp.exp()
    grad_se = torch.sqrt(p * (1 - p) / (samples * trials))
    assert torch.isfinite(grad).all() and ((grad - kl_grad).abs() < 5 * grad_se + 1e-12).all()


def test_topk_sampled_estimator_is_unbiased() -> None:
    vocab, k, samples, trials = 20, 4, 5, 4000
    logp = teacher_logprobs(1, vocab, seed=7, scale=1.0)[0]
    z = student_logits(1, vocab, seed=8)[0].detach().requires_grad_(True)
    values, top = torch.topk(logp, k)
    tail_p = logp.exp().numpy().copy()
    tail_p[top.numpy()] = 0.0
    rng = np.random.default_rng(1)
    counts = rng.multinomial(samples, tail_p / tail_p.sum(), size=trials)
    ids, cnt = compact(counts, samples)
    targets = SparseTargets(kind="token_topk_sampled", topk_ids=top.expand(trials, k),
                            topk_logprobs=values.float().expand(trials, k), sample_ids=ids, sample_counts=cnt)
    est = sparse_divergence(z.expand(trials, vocab), targets, kind="soft_ce")
    (grad,) = torch.autograd.grad(est.mean(), z)
    exact = dense_divergence(z[None], logp[None], kind="soft_ce")[0].item()
    stderr = est.detach().std().item() / math.sqrt(trials)
    assert stderr > 0 and abs(est.mean().item() - exact) < 5 * stderr
    assert torch.isfinite(grad).all()
    # a position whose tail got no draws (k == V, say) contributes its top-k part only
    empty = SparseTargets(kind="token_topk_sampled", topk_ids=top[None], topk_logprobs=values[None],
                          sample_ids=torch.zeros(1, samples, dtype=torch.long),
                          sample_counts=torch.zeros(1, samples, dtype=torch.long))
    head_only = -(values.exp() * torch.log_softmax(z, -1)[top]).sum()
    assert torch.allclose(sparse_divergence(z[None], empty, kind="soft_ce")[0], head_only)


def test_check_loss_supported() -> None:
    for cache in ("token_sampled", "token_topk_sampled"):
        with pytest.raises(ConfigError, match="reverse_kl is not supported.*use loss.kind=forward_kl"):
            check_loss_supported(LossConfig(kind="reverse_kl", temperature=1.0), cache)
        with pytest.raises(ConfigError, match="temperature=2.0 is not supported.*temperature=1"):
            check_loss_supported(LossConfig(kind="soft_ce", temperature=2.0), cache)
        for kind in ("forward_kl", "soft_ce"):
            check_loss_supported(LossConfig(kind=kind, temperature=1.0), cache)
    for kind in DIVERGENCES:
        check_loss_supported(LossConfig(kind=kind, temperature=2.0), "token_topk")
        check_loss_supported(LossConfig(kind=kind, temperature=2.0), "sequence_probs")
    with pytest.raises(ConfigError, match="unknown cache kind"):
        check_loss_supported(LossConfig(), "token_dense")
    sampled = SparseTargets(kind="token_sampled", sample_ids=torch.zeros(2, 3, dtype=torch.long),
                            sample_counts=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="tvd is not supported"):
        sparse_divergence(torch.zeros(2, 4), sampled, kind="tvd")


def test_sparse_targets_slicing_and_validation() -> None:
    targets = topk_targets(teacher_logprobs(10, 6), 2)
    part = targets.slice(3, 7)
    assert part.num_positions == 4 and torch.equal(part.topk_ids, targets.topk_ids[3:7])
    assert targets.slice(8, 20).num_positions == 2
    with pytest.raises(ConfigError, match="need sample_ids"):
        SparseTargets(kind="token_topk_sampled", topk_ids=targets.topk_ids, topk_logprobs=targets.topk_logprobs)


# -- sequence level ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sequence_loss_equals_dense_forms(kind: str) -> None:
    logp, z = teacher_logprobs(6, 4), student_logits(6, 4)
    labels = torch.tensor([0, -1, 3, 2, -1, 1])
    cfg = LossConfig(kind=kind, temperature=2.0, alpha=0.3, beta=0.6)
    out = sequence_distillation_loss(z, logp, labels, cfg=cfg)
    kd = 4.0 * dense_divergence(z, logp, kind=kind, temperature=2.0, beta=0.6).mean()
    ce = F.cross_entropy(z[labels >= 0], labels[labels >= 0])
    assert torch.allclose(out.kd, kd, rtol=1e-12) and torch.allclose(out.ce, ce, rtol=1e-12)
    assert torch.allclose(out.total, 0.3 * kd + 0.7 * ce, rtol=1e-12)
    assert (out.kd_positions, out.ce_positions) == (6, 4)
    pure_ce = sequence_distillation_loss(z, logp, labels, cfg=LossConfig(kind=kind, alpha=0.0))
    assert torch.allclose(pure_ce.total, F.cross_entropy(z, labels, ignore_index=-1), rtol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sequence_loss_gradients_equal_the_dense_forms(kind: str) -> None:
    logp, z = teacher_logprobs(6, 4), student_logits(6, 4)
    labels = torch.tensor([0, -1, 3, 2, -1, 1])
    cfg = LossConfig(kind=kind, temperature=2.0, alpha=0.3, beta=0.6)
    (got,) = torch.autograd.grad(sequence_distillation_loss(z, logp, labels, cfg=cfg).total, z)
    kd = 4.0 * dense_divergence(z, logp, kind=kind, temperature=2.0, beta=0.6).mean()
    ce = F.cross_entropy(z[labels >= 0], labels[labels >= 0])
    (expected,) = torch.autograd.grad(0.3 * kd + 0.7 * ce, z)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert float(expected.abs().max()) > 1e-3
