"""KL to the teacher and top-1 agreement from a sampled cache, estimated from the draws.

Why: a sampled cache does not hold the teacher's probabilities, only ids drawn from its
distribution ``p`` (and, for ``token_topk_sampled``, the exact top-k head with draws from the
renormalised tail). The KL is still within reach, as an estimate:

Cross-entropy
    ``CE(p, q) = -E_p[log q]``. With ``n`` draws ``x_j ~ p`` (stored as unique ids with
    counts ``c_j``), ``-sum_j (c_j / n) log q(x_j)`` is unbiased. For a hybrid cache the head
    is exact and only the tail is estimated, ``-[sum_topk p_i log q_i + r sum_j (c_j / n)
    log q(x_j)]`` with the tail mass ``r = 1 - sum_topk p_i`` and draws from the tail
    renormalised; a position without draws has no tail term. This is the training loss's own
    estimate (:func:`~logitcache.pipeline.distill.losses.sparse_divergence`), so evaluation
    and training read the cache alike.
KL
    ``KL(p || q) = CE(p, q) - H(p)``: with the teacher entropy ``H`` stored per position (the
    ``entropy`` column, ``soft_labels.entropy: true``), ``CE_est - H`` is an unbiased estimate
    of the full-vocabulary KL (up to the float16 rounding of ``H``, at most 0.004 nats at
    H < 16). Per position it can be negative (sampling noise); it is never clipped, which
    would bias the mean. Its standard error over ``P`` positions of ``n`` draws each is about
    ``sd_p(log q) / sqrt(P n)`` (scaled by ``r`` for a hybrid cache). Without ``H`` the KL
    cannot be estimated from draws.
Top-1 agreement
    Exact where the cache has a top-k head: the student agrees when its argmax is the id of
    the head's largest stored value (the cache stores a row in id order; where the value
    codec stored several ids with that same value, any of them counts). For a
    pure sampled cache the teacher's argmax is estimated by the most-drawn id (ties go to
    the smallest id); with few draws on a flat distribution that id is often not the
    argmax, so the agreement is an estimate, biased towards the student's agreement with a
    random draw.
"""

from __future__ import annotations

from torch import Tensor

from logitcache.pipeline.distill.losses import SparseTargets, sparse_divergence
from logitcache.storage_schemas.layout import RecordLayout

__all__ = ["estimated_kl", "most_drawn", "top1_agreement", "token_metric_kinds"]

ENTROPY_HINT = ("KL unavailable: the cache stores no teacher entropy, which the estimate from draws "
                "needs; rebuild it with soft_labels.entropy: true")


def estimated_kl(student_logits: Tensor, targets: SparseTargets, entropy: Tensor) -> Tensor:
    """Per-position ``CE_est - H`` ``[P]`` (see the module docstring); ``targets`` of a sampled kind."""
    ce = sparse_divergence(student_logits, targets, kind="soft_ce")
    return ce - entropy.to(device=ce.device, dtype=ce.dtype)


def top1_agreement(student_top: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> Tensor:
    """``[P]`` float: 1 where the student's argmax is the teacher's, i.e. one of the ids whose
    stored log-probability is the row's largest (ids tied there are equally the teacher's
    top-1 as far as the value codec can tell), else 0."""
    best = topk_logprobs == topk_logprobs.max(dim=-1, keepdim=True).values
    return ((topk_ids.long() == student_top.long().unsqueeze(-1)) & best).any(dim=-1).float()


def most_drawn(sample_ids: Tensor, sample_counts: Tensor) -> Tensor:
    """The id drawn most often per position ``[P]`` (ids padded with count 0 never win)."""
    column = sample_counts.argmax(dim=-1, keepdim=True)  # the first maximum: the smallest id
    return sample_ids.long().gather(-1, column).squeeze(-1)


def token_metric_kinds(layout: RecordLayout) -> dict:
    """How the ``kl`` and ``top1`` of an evaluation on a cache of ``layout`` are obtained.

    ``kl``: ``"topk_buckets"`` (exact KL of the distributions coarse-grained onto the cached
    ids and one tail bucket: a lower bound of the full KL, equal to it at k = V),
    ``"estimated"`` (from the draws and the stored entropy), or None (not available; ``note``
    says why). ``top1``: ``"exact"`` or ``"estimated"`` (the most-drawn id).
    """
    if layout.has_samples and layout.entropy:
        kl, note = "estimated", "KL(teacher || student) estimated as CE_est - H from the stored draws and entropy"
    elif layout.has_topk:
        kl, note = "topk_buckets", "KL over the cached top-k ids plus one tail bucket (a lower bound of the full KL)"
        if layout.has_samples:
            note += "; the estimate from the tail draws needs the teacher entropy (soft_labels.entropy: true)"
    else:
        kl, note = None, ENTROPY_HINT
    top1 = "exact" if layout.has_topk else "estimated"
    return {"kl": kl, "top1": top1, "kl_estimated": kl == "estimated", "top1_estimated": top1 == "estimated",
            "note": note if top1 == "exact" else f"{note}; top-1 agreement estimated from the most-drawn id"}
