"""Evaluation metrics per language, reduced chunk by chunk and mergeable across ranks.

Why this shape: stage two evaluates a student one chunk of labelled positions at a time (the
full ``[P, V]`` logits of an evaluation set never exist at once), possibly on several ranks,
and reports per language. So :func:`token_metrics` reduces a chunk to per-position values on
the device, and the accumulators keep only sums and counts (and, for classifiers, a confusion
matrix) per language. Those add up exactly across chunks and ranks (``merge``) and survive a
JSON round trip (``to_dict`` / ``from_dict``), so ranks can ship them as plain JSON.

KL against a top-k cache: the cached teacher distribution is known only on its ``k`` ids
plus the tail mass ``r``. The KL reported is that between the teacher and the student both
coarse-grained onto ``k + 1`` buckets (the cached ids and "everything else"), computed by the
training loss's own function, :func:`~logitcache.pipeline.distill.losses.sparse_divergence`
with ``kind="forward_kl"``, ``tail="bucket"`` and T=1, so it treats the tail as the loss does
(see :mod:`~logitcache.pipeline.distill.losses`): the student's tail probability is
``logsumexp`` over the non-cached logits (accurate when the student puts almost all its mass
on the cached ids, where ``1 - sum`` would not be; below float32's smallest normal number,
1.2e-38, it counts as that), and with ``k < V`` a teacher tail below ``TAIL_FLOOR`` = 1e-7
(a lossy codec's top-k can decode to a sum of 1 or more) is raised to it and the ``k + 1``
outcomes renormalised. By the data-processing inequality the coarse-grained KL is a lower
bound on the full KL, and equals it when ``k == V`` (there is then no tail bucket).

KL against a sampled cache (``token_sampled``, and ``token_topk_sampled`` whose tail is held
as draws) is estimated as ``CE_est - H`` from the draws and the stored teacher entropy, and a
pure sampled cache's top-1 agreement from the most-drawn id: see
:mod:`~logitcache.pipeline.distill.kl_estimates`, and :func:`token_metric_kinds` for what an
evaluation reports as exact, estimated or unavailable.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from logitcache.pipeline.distill.kl_estimates import (
    estimated_kl,
    most_drawn,
    token_metric_kinds,
    top1_agreement,
)
from logitcache.pipeline.distill.losses import IGNORE_INDEX, SparseTargets, sparse_divergence

__all__ = ["ClassificationMetrics", "LanguageMetrics", "token_metric_kinds", "token_metrics"]

OVERALL = "all"


@torch.no_grad()
def token_metrics(
    student_logits: torch.Tensor,
    *,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    sample_ids: torch.Tensor | None = None,
    sample_counts: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    hard_targets: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-position ``ce``, ``kl`` and ``top1`` (float32 ``[P]``, NaN where undefined).

    With draws (``sample_ids``/``sample_counts`` ``[P, S]``, count 0 = padding) and the
    teacher ``entropy`` ``[P]``, ``kl`` is the estimate ``CE_est - H``; with draws but no
    entropy it is the top-k bucket KL where there is a head, else NaN. ``top1`` compares with
    the top-k head's first id, else with the most-drawn id (an estimate). See the module
    docstring and :mod:`~logitcache.pipeline.distill.kl_estimates`.
    """
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be [P, V], got {tuple(student_logits.shape)}")
    logits = student_logits.float()
    n, vocab = logits.shape
    device = logits.device
    nan = torch.full((n,), math.nan, dtype=torch.float32, device=device)

    if hard_targets is None:
        ce = nan.clone()
    else:
        if hard_targets.shape != (n,):
            raise ValueError(f"hard_targets must be [{n}], got {tuple(hard_targets.shape)}")
        targets = hard_targets.to(device=device, dtype=torch.long)
        has = targets != IGNORE_INDEX
        if bool((has & ((targets < 0) | (targets >= vocab))).any()):  # one device sync
            raise ValueError(f"hard_targets must be in [0, {vocab}) or {IGNORE_INDEX}")
        logq = torch.log_softmax(logits, dim=-1)
        picked = logq.gather(1, torch.where(has, targets, 0)[:, None]).squeeze(1)
        ce = torch.where(has, -picked, nan)

    if (topk_ids is None) != (topk_logprobs is None):
        raise ValueError("topk_ids and topk_logprobs go together")
    if (sample_ids is None) != (sample_counts is None):
        raise ValueError("sample_ids and sample_counts go together")
    if sample_ids is not None:
        return {"ce": ce, **_sampled_metrics(logits, topk_ids=topk_ids, topk_logprobs=topk_logprobs,
                                             sample_ids=sample_ids, sample_counts=sample_counts, entropy=entropy)}
    if topk_ids is None or topk_logprobs is None:
        return {"ce": ce, "kl": nan.clone(), "top1": nan.clone()}
    k = topk_ids.shape[-1]
    if topk_ids.shape != (n, k) or topk_logprobs.shape != (n, k) or not 1 <= k <= vocab:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs "
                         f"{tuple(topk_logprobs.shape)} must both be [{n}, k], 1 <= k <= {vocab}")
    ids = topk_ids.to(device=device, dtype=torch.long)
    targets = SparseTargets(kind="token_topk", topk_ids=ids,
                            topk_logprobs=topk_logprobs.to(device=device, dtype=torch.float32))
    kl = sparse_divergence(logits, targets, kind="forward_kl", tail="bucket")
    top1 = top1_agreement(logits.argmax(1), ids, targets.topk_logprobs)
    return {"ce": ce, "kl": kl, "top1": top1}


def _sampled_metrics(logits: torch.Tensor, *, topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None,
                     sample_ids: torch.Tensor, sample_counts: torch.Tensor,
                     entropy: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``kl`` and ``top1`` of a sampled or hybrid cache's positions (see :func:`token_metrics`)."""
    n, device = logits.shape[0], logits.device
    if sample_ids.shape[0] != n or sample_counts.shape != sample_ids.shape:
        raise ValueError(f"sample_ids {tuple(sample_ids.shape)} and sample_counts "
                         f"{tuple(sample_counts.shape)} must both be [{n}, S]")
    head = topk_ids is not None and topk_logprobs is not None
    targets = SparseTargets(
        kind="token_topk_sampled" if head else "token_sampled",
        topk_ids=topk_ids.to(device=device, dtype=torch.long) if head else None,
        topk_logprobs=topk_logprobs.to(device=device, dtype=torch.float32) if head else None,
        sample_ids=sample_ids.to(device=device, dtype=torch.long), sample_counts=sample_counts.to(device))
    if entropy is not None:
        if entropy.shape != (n,):
            raise ValueError(f"entropy must be [{n}], got {tuple(entropy.shape)}")
        kl = estimated_kl(logits, targets, entropy).float()
    elif head:
        bucket = SparseTargets(kind="token_topk", topk_ids=targets.topk_ids, topk_logprobs=targets.topk_logprobs)
        kl = sparse_divergence(logits, bucket, kind="forward_kl", tail="bucket")
    else:
        kl = torch.full((n,), math.nan, dtype=torch.float32, device=device)
    student_top = logits.argmax(1)
    top1 = (top1_agreement(student_top, targets.topk_ids, targets.topk_logprobs) if head
            else (student_top == most_drawn(targets.sample_ids, targets.sample_counts)).float())
    return {"kl": kl, "top1": top1}


def _group(langs: Sequence[str] | np.ndarray, n: int | None = None) -> tuple[list[str], np.ndarray]:
    """Unique language names (sorted) and each position's index into them."""
    arr = np.asarray(langs).astype(str).reshape(-1)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"got {arr.shape[0]} languages for {n} positions")
    uniq, inverse = np.unique(arr, return_inverse=True)
    if OVERALL in uniq:
        raise ValueError(f"language name {OVERALL!r} is reserved for the overall row")
    return [str(u) for u in uniq], inverse.reshape(-1)


def _as_array(values: torch.Tensor | np.ndarray | Sequence[float], n: int, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name}: got {arr.shape[0]} values for {n} positions")
    return arr


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None


def _exp(value: float | None) -> float | None:
    if value is None:
        return None
    return math.exp(value) if value < 709.0 else math.inf


class LanguageMetrics:
    """Sums and counts of per-position metrics, per language (NaNs skipped per metric)."""

    KIND = "token"
    ORDER = ("ce", "kl", "top1")

    def __init__(self) -> None:
        self.positions: dict[str, int] = {}
        self.sums: dict[str, dict[str, float]] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def add(
        self,
        langs: Sequence[str] | np.ndarray,
        values: Mapping[str, torch.Tensor | np.ndarray],
    ) -> None:
        names, inverse = _group(langs)
        groups = len(names)
        arrays = {metric: _as_array(raw, inverse.shape[0], metric) for metric, raw in values.items()}
        positions = np.bincount(inverse, minlength=groups)
        for i, lang in enumerate(names):
            self.positions[lang] = self.positions.get(lang, 0) + int(positions[i])
            self.sums.setdefault(lang, {})
            self.counts.setdefault(lang, {})
        for metric, arr in arrays.items():
            ok = ~np.isnan(arr)
            sums = np.bincount(inverse[ok], weights=arr[ok], minlength=groups)
            counts = np.bincount(inverse[ok], minlength=groups)
            for i, lang in enumerate(names):
                if counts[i]:
                    self.sums[lang][metric] = self.sums[lang].get(metric, 0.0) + float(sums[i])
                    self.counts[lang][metric] = self.counts[lang].get(metric, 0) + int(counts[i])

    def merge(self, other: LanguageMetrics) -> LanguageMetrics:
        """Add ``other``'s sums and counts into this one (in place); returns ``self``."""
        for lang, positions in other.positions.items():
            self.positions[lang] = self.positions.get(lang, 0) + positions
            sums = self.sums.setdefault(lang, {})
            counts = self.counts.setdefault(lang, {})
            for metric, total in other.sums.get(lang, {}).items():
                sums[metric] = sums.get(metric, 0.0) + total
                counts[metric] = counts.get(metric, 0) + other.counts[lang][metric]
        return self

    def _row(self, positions: int, sums: Mapping[str, float], counts: Mapping[str, int]) -> dict[str, Any]:
        """positions, ce, ppl, kl, top1, then any other metric that was added (means)."""
        means = {m: _mean(sums.get(m, 0.0), counts.get(m, 0))
                 for m in (*self.ORDER, *sorted(set(counts) - set(self.ORDER)))}
        return {"positions": positions, "ce": means["ce"], "ppl": _exp(means["ce"]), **means}

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {lang: self._row(self.positions[lang], self.sums[lang], self.counts[lang])
               for lang in sorted(self.positions)}
        total_sums: Counter[str] = Counter()
        total_counts: Counter[str] = Counter()
        for lang in self.positions:
            total_sums.update(self.sums[lang])
            total_counts.update(self.counts[lang])
        out[OVERALL] = self._row(sum(self.positions.values()), total_sums, total_counts)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "positions": dict(self.positions),
                "sums": {k: dict(v) for k, v in self.sums.items()},
                "counts": {k: dict(v) for k, v in self.counts.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LanguageMetrics:
        if data.get("kind") != cls.KIND:
            raise ValueError(f"not a {cls.KIND} metrics dict: kind={data.get('kind')!r}")
        self = cls()
        self.positions = {str(k): int(v) for k, v in data["positions"].items()}
        for lang in self.positions:
            self.sums[lang] = {m: float(x) for m, x in data["sums"].get(lang, {}).items()}
            self.counts[lang] = {m: int(x) for m, x in data["counts"].get(lang, {}).items()}
        return self


_CLS_SCALARS = ("records", "kl_sum", "kl_count", "agree", "labelled", "correct", "teacher_correct")


def macro_f1(confusion: np.ndarray) -> float | None:
    """Mean F1 over the classes occurring in gold (rows) or predictions (columns)."""
    tp = np.diag(confusion).astype(np.float64)
    gold, pred = confusion.sum(1), confusion.sum(0)
    present = (gold + pred) > 0
    if not present.any():
        return None
    f1 = 2.0 * tp[present] / (gold[present] + pred[present])
    return float(f1.mean())


class ClassificationMetrics:
    """Per-language KL, agreement with the teacher and gold-label accuracy / macro-F1."""

    KIND = "classification"

    def __init__(self) -> None:
        self.num_classes: int | None = None
        self.stats: dict[str, dict[str, float]] = {}
        self.confusion: dict[str, np.ndarray] = {}  # [gold, predicted] counts

    def _check_classes(self, num_classes: int) -> None:
        if self.num_classes is None:
            self.num_classes = num_classes
        elif self.num_classes != num_classes:
            raise ValueError(f"{num_classes} classes, but earlier records had {self.num_classes}")

    def _slot(self, lang: str) -> tuple[dict[str, float], np.ndarray]:
        if lang not in self.stats:
            assert self.num_classes is not None
            self.stats[lang] = dict.fromkeys(_CLS_SCALARS, 0.0)
            self.confusion[lang] = np.zeros((self.num_classes,) * 2, dtype=np.int64)
        return self.stats[lang], self.confusion[lang]

    @torch.no_grad()
    def add(
        self,
        langs: Sequence[str] | np.ndarray,
        *,
        student_logits: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        labels: torch.Tensor | np.ndarray | Sequence[int],
    ) -> None:
        if student_logits.ndim != 2 or student_logits.shape != teacher_logprobs.shape:
            raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logprobs "
                             f"{tuple(teacher_logprobs.shape)} must both be [B, C]")
        n, c = student_logits.shape
        self._check_classes(c)
        names, inverse = _group(langs, n)
        logq = torch.log_softmax(student_logits.float(), dim=-1)
        logp = teacher_logprobs.to(device=logq.device, dtype=torch.float32)
        p = logp.exp()
        kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(1)
        kl_np = kl.cpu().double().numpy()
        pred = logq.argmax(1).cpu().numpy()
        teacher = logp.argmax(1).cpu().numpy()
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        gold = np.asarray(labels, dtype=np.int64).reshape(-1)
        if gold.shape[0] != n:
            raise ValueError(f"got {gold.shape[0]} labels for {n} records")
        if ((gold < -1) | (gold >= c)).any():
            raise ValueError(f"labels must be in [0, {c}) or -1")
        groups = len(names)
        lab = gold >= 0
        ok = ~np.isnan(kl_np)

        def count(mask: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
            w = None if weights is None else weights[mask].astype(np.float64)
            return np.bincount(inverse[mask], weights=w, minlength=groups)

        every = np.ones(n, dtype=bool)
        per_group = {
            "records": count(every), "kl_sum": count(ok, kl_np), "kl_count": count(ok),
            "agree": count(every, pred == teacher), "labelled": count(lab),
            "correct": count(lab, pred == gold), "teacher_correct": count(lab, teacher == gold),
        }
        cells = (inverse[lab] * c + gold[lab]) * c + pred[lab]
        confusion = np.bincount(cells, minlength=groups * c * c).reshape(groups, c, c)
        for i, lang in enumerate(names):
            stats, matrix = self._slot(lang)
            for key, arr in per_group.items():
                stats[key] += float(arr[i])
            matrix += confusion[i]

    def merge(self, other: ClassificationMetrics) -> ClassificationMetrics:
        """Add ``other``'s counts into this one (in place); returns ``self``."""
        if other.num_classes is None:
            return self
        self._check_classes(other.num_classes)
        for lang, stats in other.stats.items():
            mine, matrix = self._slot(lang)
            for key in _CLS_SCALARS:
                mine[key] += stats[key]
            matrix += other.confusion[lang]
        return self

    @staticmethod
    def _row(stats: Mapping[str, float], confusion: np.ndarray | None) -> dict[str, Any]:
        labelled = int(stats["labelled"])
        return {
            "records": int(stats["records"]),
            "kl": _mean(stats["kl_sum"], int(stats["kl_count"])),
            "agreement": _mean(stats["agree"], int(stats["records"])),
            "labelled": labelled,
            "accuracy": _mean(stats["correct"], labelled),
            "macro_f1": macro_f1(confusion) if labelled and confusion is not None else None,
            "teacher_accuracy": _mean(stats["teacher_correct"], labelled),
        }

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {lang: self._row(self.stats[lang], self.confusion[lang]) for lang in sorted(self.stats)}
        total = {key: sum(s[key] for s in self.stats.values()) for key in _CLS_SCALARS}
        matrix = sum(self.confusion.values()) if self.confusion else None
        out[OVERALL] = self._row(total, matrix)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "num_classes": self.num_classes,
                "stats": {lang: dict(s) for lang, s in self.stats.items()},
                "confusion": {lang: m.tolist() for lang, m in self.confusion.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassificationMetrics:
        if data.get("kind") != cls.KIND:
            raise ValueError(f"not a {cls.KIND} metrics dict: kind={data.get('kind')!r}")
        self = cls()
        self.num_classes = None if data["num_classes"] is None else int(data["num_classes"])
        self.stats = {str(lang): {k: float(s[k]) for k in _CLS_SCALARS}
                      for lang, s in data["stats"].items()}
        self.confusion = {str(lang): np.asarray(m, dtype=np.int64).reshape(
            (self.num_classes or 0,) * 2) for lang, m in data["confusion"].items()}
        return self
