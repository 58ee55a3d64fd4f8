"""Distillation losses from cached sparse teacher targets, computed in chunks of positions.

Stage two never sees the teacher's full distribution, only what stage one cached per labelled
position. This module turns those sparse targets into the divergences of :class:`LossConfig`
without ever building the student's full ``[P, V]`` logits at once.

Conventions (``z`` = student logits, ``T`` = ``cfg.temperature``)

Student
    ``q = softmax(z / T)`` over the full vocabulary; ``log_softmax`` runs in float32 even when
    ``z`` is bf16/fp16 (float64 stays float64), since bf16 cannot resolve small probabilities.
Teacher, ``token_topk`` caches
    ``topk_logprobs`` are log-probabilities at T=1 normalised over the FULL vocabulary, so the
    tail mass ``r = 1 - sum(exp(topk_logprobs))`` is exact; it is clamped to ``[0, 1]``
    because quantised values can sum to slightly more than 1.

    ``tail="bucket"``: both distributions are coarse-grained to k+1 outcomes (the k cached ids
    and one "tail" outcome). The student's tail is ``log q_tail = logsumexp(z_notk / T) -
    logsumexp(z / T)``, computed in log space so it never cancels, and clamped to at most 0
    (rounding) and at least the log of the dtype's smallest normal number (-87.3 in float32),
    so a student tail that underflows gives a large finite divergence, not infinity. The
    teacher is tempered over those k+1 outcomes, ``p_T ∝ p^(1/T)`` with the tail as one
    outcome of probability ``r``. This is exact at T=1, and exact at any T when k equals the
    vocabulary (there is then no tail); otherwise it is an approximation (tempering the whole
    tail would need its individual probabilities). With k == V the tail outcome is dropped:
    it is rounding error only, and the student has no mass there. With k < V the teacher tail
    is raised to at least ``TAIL_FLOOR`` = 1e-7 and the k+1 outcomes renormalised: a tail
    decoded as 0 (quantised top-k values that round up to sum to 1 or more, see the ``q8``
    codec) is really small but positive, and 1e-7 is below the float32 rounding of a top-k
    sum; the renormalisation also scales an over-unity top-k back to a distribution.
    Evaluation's KL to the teacher (:func:`~logitcache.pipeline.distill.metrics.token_metrics`)
    is this ``forward_kl`` at T=1, computed by :func:`sparse_divergence` too.

    ``tail="renormalize"``: both distributions restricted to the k ids and renormalised (the
    teacher tempered over them: ``log_softmax(topk_logprobs / T)``).
Divergences over the resulting discrete ``p`` (teacher) and ``q`` (student), 0 log 0 = 0
    ``forward_kl = sum p (log p - log q)``; ``reverse_kl = sum q (log q - log p)``;
    ``jsd = beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``;
    ``tvd = 0.5 sum |p - q|``; ``soft_ce = -sum p log q``. Outcomes of zero probability are
    masked *before* the product, so gradients stay finite (no 0 * inf). Reverse KL is infinite
    wherever the teacher has probability 0 and the student does not (a teacher with fewer
    than k finite logits caches ``-inf`` log-probs), so for reverse KL only, teacher
    log-probabilities are raised to at least ``REVERSE_KL_LOG_FLOOR`` = -100 (p ~ 4e-44, below
    float32's normal range, so no real probability changes): a large finite penalty, no NaN.
Sampled caches (unbiased estimator of "Sparse Logit Sampling", Anshumann et al., ACL 2025)
    ``token_sampled``: ``-sum_j (c_j / n) log q_j`` with ``n = sum_j c_j``.
    ``token_topk_sampled``: ``-[sum_topk p_j log q_j + r sum_j (c_j / n_tail) log q_j]`` over
    draws from the renormalised tail (a position without draws has no tail term).
    Both are unbiased estimates of the soft cross-entropy, and their gradients are unbiased
    for forward KL's (the two differ by the teacher entropy, a constant). Only forward_kl and
    soft_ce at T=1 are supported (:func:`check_loss_supported`). For forward_kl the loss (and
    its gradient) is this cross-entropy estimate; the value *logged* as ``kd`` is the KL
    estimate ``CE_est - H`` when the teacher entropy ``H`` is stored, so that ``kd`` means the
    same as on a top-k cache, and without ``H`` the cross-entropy is logged as ``kd_ce``
    (:attr:`LossOutput.kd_logged`, :attr:`LossOutput.kd_log_name`).
Total
    ``kd = T**2 * mean over positions of the divergence`` (T**2 keeps gradient magnitudes
    comparable across temperatures); ``ce`` = hard-label cross-entropy at T=1, mean over
    positions with a target (hard target ``IGNORE_INDEX`` = -100 where there is none; 0 if no
    position has one); ``total = alpha kd + (1 - alpha) ce``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from logitcache.config import LossConfig
from logitcache.errors import ConfigError
from logitcache.storage_schemas.layout import KINDS

__all__ = [
    "DIVERGENCES", "IGNORE_INDEX", "TAIL_FLOOR", "REVERSE_KL_LOG_FLOOR", "SparseTargets", "LossOutput", "check_loss_supported",
    "sparse_divergence", "dense_divergence", "distillation_loss", "dense_distillation_loss", "logged_kd",
    "sequence_distillation_loss",
]

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd", "soft_ce")
#: Hard next-token target of a position that has none (context, padding, a record's last
#: token): torch's cross-entropy default. Stage two's batches, losses and metrics all use it.
IGNORE_INDEX = -100
#: Smallest teacher tail mass of ``tail="bucket"`` when k < V (see the module docstring).
TAIL_FLOOR = 1e-7
#: Reverse KL raises teacher log-probabilities below this (log 0 included) to it: see the docstring.
REVERSE_KL_LOG_FLOOR = -100.0
_SAMPLED_KINDS = ("token_sampled", "token_topk_sampled")
_SAMPLED_DIVERGENCES = ("forward_kl", "soft_ce")
_TOKEN_KINDS = ("token_topk", "token_sampled", "token_topk_sampled")


def check_loss_supported(cfg: LossConfig, cache_kind: str) -> None:
    """Raise :class:`ConfigError` when ``cfg`` cannot be computed from a cache of ``cache_kind``."""
    _check_supported(cfg.kind, cfg.temperature, cache_kind)


def _check_supported(kind: str, temperature: float, cache_kind: str) -> None:
    if cache_kind not in KINDS:
        raise ConfigError(f"unknown cache kind {cache_kind!r}; known: {', '.join(KINDS)}")
    if kind not in DIVERGENCES:
        raise ConfigError(f"loss.kind: unknown divergence {kind!r}; known: {', '.join(DIVERGENCES)}")
    if cache_kind not in _SAMPLED_KINDS:
        return
    if kind not in _SAMPLED_DIVERGENCES:
        raise ConfigError(
            f"loss.kind={kind} is not supported on a {cache_kind} cache: sampled soft labels give "
            f"an unbiased estimate only of the soft cross-entropy (and of forward KL's gradient); "
            f"use loss.kind=forward_kl or soft_ce, or build a token_topk cache for {kind}"
        )
    if temperature != 1.0:
        raise ConfigError(
            f"loss.temperature={temperature} is not supported on a {cache_kind} cache: the draws "
            f"come from the teacher at temperature 1 and cannot be re-tempered; use "
            f"loss.temperature=1, or build a token_topk cache to distil at another temperature"
        )


@dataclass
class SparseTargets:
    """Cached teacher targets of P labelled positions (see the module docstring).

    kind: ``token_topk``, ``token_sampled`` or ``token_topk_sampled``.
    topk_ids / topk_logprobs: ``[P, k]`` int64 / float32, ids by descending teacher probability.
    sample_ids / sample_counts: ``[P, S]``, padded with count 0 (padding ids are ignored).
    """

    kind: str
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    sample_ids: Tensor | None = None
    sample_counts: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in _TOKEN_KINDS:
            raise ConfigError(f"SparseTargets.kind must be one of {', '.join(_TOKEN_KINDS)}, got {self.kind!r}")
        need_topk = self.kind != "token_sampled"
        need_samples = self.kind != "token_topk"
        if need_topk and (self.topk_ids is None or self.topk_logprobs is None):
            raise ConfigError(f"{self.kind} targets need topk_ids and topk_logprobs")
        if need_samples and (self.sample_ids is None or self.sample_counts is None):
            raise ConfigError(f"{self.kind} targets need sample_ids and sample_counts")

    def _tensors(self) -> list[Tensor]:
        return [t for t in (self.topk_ids, self.topk_logprobs, self.sample_ids, self.sample_counts) if t is not None]

    @property
    def num_positions(self) -> int:
        return int(self._tensors()[0].shape[0])

    def slice(self, start: int, stop: int) -> SparseTargets:
        """The targets of positions ``[start, stop)`` (views, no copy)."""
        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[start:stop]
        return SparseTargets(kind=self.kind, topk_ids=cut(self.topk_ids), topk_logprobs=cut(self.topk_logprobs),
                             sample_ids=cut(self.sample_ids), sample_counts=cut(self.sample_counts))


@dataclass
class LossOutput:
    """``total = alpha * kd + (1 - alpha) * ce``, and how many positions each term averaged.

    ``kd_logged`` (None: ``kd``) is the value training logs under ``kd_log_name``: the
    divergence ``loss.kind`` names, whatever the cache kind. It differs from ``kd`` only for
    forward KL on a sampled cache, whose ``kd`` is a cross-entropy estimate (see the module
    docstring); it carries no gradient.
    """

    total: Tensor
    kd: Tensor
    ce: Tensor
    kd_positions: int
    ce_positions: int
    kd_logged: Tensor | None = None
    kd_log_name: str = "kd"

    @property
    def kd_for_log(self) -> Tensor:
        return self.kd if self.kd_logged is None else self.kd_logged


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``sum a (log a - log b)`` over the last dim; outcomes with ``a == 0`` are masked first."""
    keep = log_a > -math.inf
    a = torch.where(keep, log_a, torch.zeros_like(log_a)).exp() * keep
    diff = torch.where(keep, log_a - torch.where(keep, log_b, torch.zeros_like(log_b)), torch.zeros_like(log_a))
    return (a * diff).sum(-1)


def _divergence(log_p: Tensor, log_q: Tensor, *, kind: str, beta: float) -> Tensor:
    """One divergence per row between teacher ``log_p`` and student ``log_q`` (same outcomes)."""
    if kind == "forward_kl":
        return _kl_terms(log_p, log_q)
    if kind == "reverse_kl":
        return _kl_terms(log_q, log_p.clamp_min(REVERSE_KL_LOG_FLOOR))
    if kind == "soft_ce":
        keep = log_p > -math.inf
        p = torch.where(keep, log_p, torch.zeros_like(log_p)).exp() * keep
        return -(p * torch.where(keep, log_q, torch.zeros_like(log_q))).sum(-1)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if kind == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)
    raise ConfigError(f"unknown divergence {kind!r}; known: {', '.join(DIVERGENCES)}")


def dense_divergence(student_logits: Tensor, teacher_logprobs: Tensor, *, kind: str = "forward_kl",
                     temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Reference divergence ``[P]`` with both distributions tempered exactly over all ``V`` outcomes."""
    dtype = _compute_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logprobs.to(dtype) / temperature, dim=-1)
    return _divergence(log_p, log_q, kind=kind, beta=beta)


def _sampled_estimate(log_q: Tensor, targets: SparseTargets) -> Tensor:
    """Importance-weighted soft cross-entropy estimate per position (T=1)."""
    counts = targets.sample_counts.to(log_q.dtype)
    ids = torch.where(counts > 0, targets.sample_ids.long(), torch.zeros_like(targets.sample_ids, dtype=torch.long))
    n = counts.sum(-1, keepdim=True)
    sampled = (counts / n.clamp_min(1.0) * log_q.gather(1, ids)).sum(-1)
    if targets.kind == "token_sampled":
        return -sampled
    ids_k = targets.topk_ids.long()
    p_k = targets.topk_logprobs.to(log_q.dtype).exp()
    tail = (1.0 - p_k.sum(-1)).clamp(0.0, 1.0)
    return -((p_k * log_q.gather(1, ids_k)).sum(-1) + tail * sampled)


def sparse_divergence(student_logits: Tensor, targets: SparseTargets, *, kind: str = "forward_kl",
                      temperature: float = 1.0, beta: float = 0.5, tail: str = "bucket") -> Tensor:
    """Per-position divergence ``[P]`` (no T**2) of student logits ``[P, V]`` from cached targets.

    ``V`` is the width of ``student_logits``, which must be the teacher's vocabulary (slice off
    a wider head's padding first, as :func:`distillation_loss` does).
    """
    _check_supported(kind, temperature, targets.kind)
    dtype = _compute_dtype(student_logits)
    z = student_logits.to(dtype) / temperature
    if targets.kind in _SAMPLED_KINDS:
        return _sampled_estimate(F.log_softmax(z, dim=-1), targets)
    ids = targets.topk_ids.long()
    teacher = targets.topk_logprobs.to(dtype).clamp_max(0.0)
    vocab, k = z.shape[-1], ids.shape[-1]
    if tail == "renormalize" or k >= vocab:
        # no tail outcome; with k == V this is also what "bucket" means (the tail is rounding only)
        return _divergence(F.log_softmax(teacher / temperature, dim=-1), F.log_softmax(z.gather(1, ids), dim=-1),
                           kind=kind, beta=beta)
    if tail != "bucket":
        raise ConfigError(f"loss.tail must be bucket or renormalize, got {tail!r}")
    # teacher tail r = 1 - sum p_k in log space: log(-expm1(logsumexp(log p_k))), floored
    mass_k = torch.logsumexp(teacher, dim=-1, keepdim=True).clamp_max(0.0)
    log_r = torch.log((-torch.expm1(mass_k)).clamp_min(TAIL_FLOOR))
    log_p = F.log_softmax(torch.cat([teacher, log_r], dim=-1) / temperature, dim=-1)
    # student tail from the logits outside the top-k, in log space (no 1 - sum cancellation)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    log_q_tail = torch.logsumexp(z.scatter(1, ids, -math.inf), dim=-1, keepdim=True) - lse
    log_q_tail = log_q_tail.clamp(min=math.log(torch.finfo(dtype).tiny), max=0.0)
    return _divergence(log_p, torch.cat([z.gather(1, ids) - lse, log_q_tail], dim=-1), kind=kind, beta=beta)


def _hard_ce_sum(logits: Tensor, hard_targets: Tensor | None, ignore_index: int) -> Tensor:
    if hard_targets is None:
        return logits.new_zeros(())
    return F.cross_entropy(logits, hard_targets.long(), ignore_index=ignore_index, reduction="sum")


def _combine(kd_sum: Tensor, ce_sum: Tensor, kd_positions: int, ce_positions: int,
             cfg: LossConfig) -> LossOutput:
    kd = kd_sum * (cfg.temperature ** 2) / max(kd_positions, 1)
    ce = ce_sum / max(ce_positions, 1)
    total = cfg.alpha * kd + (1.0 - cfg.alpha) * ce
    return LossOutput(total=total, kd=kd, ce=ce, kd_positions=kd_positions, ce_positions=ce_positions)


def _count_targets(hard_targets: Tensor | None, ignore_index: int) -> int:
    return 0 if hard_targets is None else int((hard_targets != ignore_index).sum())


def distillation_loss(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: SparseTargets,
                      hard_targets: Tensor | None, *, cfg: LossConfig,
                      vocab_size: int | None = None, teacher_entropy: Tensor | None = None) -> LossOutput:
    """The loss of P positions from final hidden states ``[P, H]`` and the student's output head.

    Positions are processed ``cfg.chunk_tokens`` at a time, each chunk under non-reentrant
    activation checkpointing: the head's logits ``[chunk, V]`` are freed after the chunk's
    forward and recomputed in its backward, so only one chunk's logits exist at a time and
    never ``[P, V]``. A head wider than the teacher's vocabulary (padding rows) is sliced to
    the first ``vocab_size`` logits before any softmax, so the padding gets no probability
    (and no gradient). ``hard_targets`` ``[P]`` uses ``IGNORE_INDEX`` for "no target"; None for none.
    ``teacher_entropy`` ``[P]`` (a sampled cache's stored entropy) changes only the logged value
    (:func:`logged_kd`), never the loss.
    """
    check_loss_supported(cfg, targets.kind)
    positions = int(hidden.shape[0])
    if targets.num_positions != positions:
        raise ConfigError(f"targets have {targets.num_positions} positions, hidden states {positions}")

    def chunk_sums(h: Tensor, part: SparseTargets, hard: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = head(h)
        width = logits.shape[-1] if vocab_size is None else vocab_size
        if width > logits.shape[-1]:
            raise ConfigError(f"the student head has {logits.shape[-1]} outputs, fewer than the vocabulary ({width})")
        logits = logits[:, :width]
        kd = sparse_divergence(logits, part, kind=cfg.kind, temperature=cfg.temperature,
                               beta=cfg.beta, tail=cfg.tail).sum()
        return kd, _hard_ce_sum(logits.to(_compute_dtype(logits)), hard, IGNORE_INDEX)

    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    kd_sum = hidden.new_zeros((), dtype=dtype)
    ce_sum = hidden.new_zeros((), dtype=dtype)
    for start in range(0, positions, cfg.chunk_tokens):
        stop = min(start + cfg.chunk_tokens, positions)
        hard = None if hard_targets is None else hard_targets[start:stop]
        kd, ce = checkpoint(chunk_sums, hidden[start:stop], targets.slice(start, stop), hard, use_reentrant=False)
        kd_sum = kd_sum + kd
        ce_sum = ce_sum + ce
    out = _combine(kd_sum, ce_sum, positions, _count_targets(hard_targets, IGNORE_INDEX), cfg)
    return logged_kd(out, kind=targets.kind, cfg=cfg, teacher_entropy=teacher_entropy)


def logged_kd(out: LossOutput, *, kind: str, cfg: LossConfig, teacher_entropy: Tensor | None) -> LossOutput:
    """``out`` with the value to log as ``kd`` set: for forward KL on a sampled cache, whose
    ``kd`` is the soft cross-entropy estimate, ``kd - T**2 mean(H)`` (a KL estimate, as the
    ``kd`` of a top-k cache is a KL), or, without the teacher entropy, ``kd`` itself under the
    name ``kd_ce``. Other cases log ``kd`` as it is. Never part of the graph."""
    if kind not in _SAMPLED_KINDS or cfg.kind != "forward_kl":
        return out
    if teacher_entropy is None or bool(torch.isnan(teacher_entropy).any()):
        out.kd_logged, out.kd_log_name = out.kd.detach(), "kd_ce"
        return out
    entropy = teacher_entropy.detach().to(device=out.kd.device, dtype=out.kd.dtype)
    shift = entropy.sum() * (cfg.temperature ** 2) / max(out.kd_positions, 1)
    out.kd_logged = out.kd.detach() - shift
    return out


def _dense_loss(logits: Tensor, teacher_logprobs: Tensor, hard: Tensor | None, cfg: LossConfig,
                ignore_index: int) -> LossOutput:
    kd_sum = dense_divergence(logits, teacher_logprobs, kind=cfg.kind, temperature=cfg.temperature,
                              beta=cfg.beta).sum()
    ce_sum = _hard_ce_sum(logits.to(_compute_dtype(logits)), hard, ignore_index)
    return _combine(kd_sum, ce_sum, int(logits.shape[0]), _count_targets(hard, ignore_index), cfg)


def dense_distillation_loss(logits: Tensor, teacher_logprobs: Tensor, hard_targets: Tensor | None, *,
                            cfg: LossConfig) -> LossOutput:
    """Reference for tests: the same loss from the full teacher log-probabilities ``[P, V]``."""
    return _dense_loss(logits, teacher_logprobs, hard_targets, cfg, IGNORE_INDEX)


def sequence_distillation_loss(student_logits: Tensor, teacher_logprobs: Tensor, labels: Tensor | None, *,
                               cfg: LossConfig) -> LossOutput:
    """Sequence-level loss: logits ``[B, C]`` against the full cached class distribution.

    There is no tail (every class is cached), so the divergence is exact at any temperature;
    ``labels`` ``[B]`` are gold classes, -1 where a record has none.
    """
    return _dense_loss(student_logits, teacher_logprobs, labels, cfg, -1)
