"""Soft labels from a teacher's final hidden states, computed on the device in chunks.

Stage one runs the teacher body once per batch and hands the final hidden states of the
positions to label (``[P, H]``) to :func:`label_positions`, together with the model's output
head. The head and a float32 ``log_softmax`` run over ``chunk_positions`` positions at a time,
so the full ``[P, V]`` float32 logits never exist at once; each chunk is reduced on the
device to the compact labels of :class:`SoftLabelSpec`, written into preallocated device
tensors, and only those leave the device (:meth:`PositionLabels.to_numpy`).
:func:`logits_labels` does the same for logits that already exist (a model whose head cannot
be split off).

What is computed per position (``logp`` = float32 ``log_softmax`` over the FULL vocabulary)

``topk``
    ``torch.topk(logp, k)``'s ids and log-probabilities, each row re-ordered by ascending
    id (the order format 4 stores; the rank order is the values' order). Because they are normalised over the full vocabulary, the tail mass
    ``1 - sum(exp(topk_logprobs))`` is exact up to float32 rounding.
``sampled``
    ``samples`` draws *with replacement* from ``softmax``; stored per position as the unique
    drawn ids (ascending) and how often each was drawn (counts sum to ``samples``). For any
    ``f``, ``sum_j count_j / samples * f(id_j)`` is an unbiased estimate of ``E_p[f]``.
``topk+sampled``
    the exact top-k head plus ``samples`` draws from the *tail* distribution: the teacher
    distribution with the top-k ids removed and renormalised. The estimator is::

        E_p[f] = sum_{i in topk} p_i f(i) + tail_mass * E_tail[f]
               ~ sum_{i in topk} p_i f(i) + tail_mass * sum_j count_j / samples * f(id_j)

    with ``tail_mass = 1 - sum_{i in topk} p_i``; it is unbiased because the draws come from
    the renormalised tail exactly. A position whose tail carries no probability at all
    (``k`` equal to the vocabulary, or every tail logit ``-inf``) gets *no* draws (its
    counts sum to 0, not ``samples``); its tail term is zero anyway.
``entropy``
    ``-sum(p * logp)`` in float32 over the full vocabulary, in nats (``p = 0`` contributes 0).
target log-probability (when ``targets`` are given)
    ``logp[target]``: the teacher's log-probability of the token that actually comes next,
    NaN where the target is negative (no next token). Its mean negation over held-out
    positions is the teacher's own cross-entropy, which evaluation sets beside the students'.
gathered log-probabilities (when ``gather`` ids ``[P, m]`` are given)
    ``logp[i, gather[i, j]]``, NaN where the id is negative: the teacher's log-probabilities
    of ids chosen elsewhere, e.g. the ids a cache stores, which ``logitcache verify
    --fidelity`` compares with a fresh forward.

Sampling method and precision
    Sampling is exact inverse-CDF sampling. For all P positions at once, ``P x samples``
    uniforms are drawn *up front* in float64 by a single ``torch.rand`` call on the
    generator's device. Each chunk then builds the float64 CDF of ``exp(logp)`` (with the
    top-k ids zeroed for the tail) by ``cumsum``, scales the uniforms by the row total (so
    the row needs no renormalisation and float32 normalisation error cannot bias the draws)
    and inverts with ``torch.searchsorted(right=True)``, which can
    never select a zero-probability id. float64 matters at LLM vocabularies: a float32 CDF
    over 150k ids accumulates errors of order 1e-5 and float32 uniforms resolve only 6e-8,
    both larger than the probabilities of many tail ids; in float64 the error per id is of
    order 1e-16. The drawn ids are then sorted per position (a small ``[p, samples]`` sort),
    and unique ids with their counts are run lengths, computed without loops over positions.

Determinism
    Given the same inputs, generator state and device, every output is bitwise identical.
    Results do not depend on ``chunk_positions``: all per-position math is row-wise and the
    uniforms are fixed for all positions before the first chunk. (For
    :func:`label_positions` this holds as far as the head itself gives the same rows for
    different chunk shapes; a matmul library, on CPU as on GPU, may pick a different kernel,
    and so round differently, for a different number of rows. :func:`logits_labels` is
    always chunk-size independent.) The sampled modes consume exactly one ``torch.rand((P, samples),
    dtype=float64)`` call from the generator; ``topk`` alone consumes nothing. A CPU
    generator gives the same uniforms whatever device the logits are on.

Device memory
    Peak extra memory per chunk is about ``chunk_positions x V`` times: the head's logits
    (2 bytes in bf16) + a float32 upcast (4, transient) + float32 ``logp`` (4), plus float32
    ``p`` and a mask (5) for entropy, plus a float64 CDF (8) for the sampled modes. At
    V = 150k and 2048 positions that is roughly 1.2 GB per 4 bytes; lower
    ``chunk_positions`` to fit. The chunk loop makes no host synchronisation; the ragged
    sample outputs are compacted once after the last chunk (one synchronisation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from logitcache.errors import ConfigError

__all__ = [
    "MODES",
    "SoftLabelSpec",
    "PositionLabels",
    "PositionLabelsNumpy",
    "HostLabels",
    "label_positions",
    "logits_labels",
]

#: Float32 elements per CPU row block (8 MB): small enough to stay in cache.
_CPU_BLOCK_ELEMENTS = 1 << 21

#: The soft-label modes, as named in the ``soft_labels.mode`` config field.
MODES: tuple[str, ...] = ("topk", "sampled", "topk+sampled")


@dataclass(frozen=True, kw_only=True)
class SoftLabelSpec:
    """What to compute per position (see the module docstring)."""

    mode: str  # "topk" | "sampled" | "topk+sampled"
    k: int  # top-k width (ignored for "sampled")
    samples: int  # draws per position (ignored for "topk")
    entropy: bool  # also compute per-position entropy (nats, full vocabulary, float32)
    chunk_positions: int = 2048  # positions per chunk through the head + log_softmax

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"soft_labels.mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.has_topk and (not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"soft_labels.k: must be an integer >= 1 for mode {self.mode!r}, got {self.k!r}")
        if self.has_samples and (not isinstance(self.samples, int) or self.samples < 1):
            raise ConfigError(
                f"soft_labels.samples: must be an integer >= 1 for mode {self.mode!r}, got {self.samples!r}"
            )
        if not isinstance(self.chunk_positions, int) or self.chunk_positions < 1:
            raise ConfigError(f"chunk_positions: must be an integer >= 1, got {self.chunk_positions!r}")

    @property
    def has_topk(self) -> bool:
        return self.mode in ("topk", "topk+sampled")

    @property
    def has_samples(self) -> bool:
        return self.mode in ("sampled", "topk+sampled")


@dataclass(kw_only=True)
class PositionLabelsNumpy:
    """:class:`PositionLabels` on the host, as numpy arrays (same fields, same dtypes)."""

    topk_ids: np.ndarray | None  # int64 [P, k]
    topk_logprobs: np.ndarray | None  # float32 [P, k]
    sample_offsets: np.ndarray | None  # int64 [P+1]
    sample_ids: np.ndarray | None  # int64 [S]
    sample_counts: np.ndarray | None  # int64 [S]
    entropy: np.ndarray | None  # float32 [P]
    target_logprob: np.ndarray | None = None  # float32 [P]
    gathered_logprobs: np.ndarray | None = None  # float32 [P, m]


@dataclass(kw_only=True)
class PositionLabels:
    """Soft labels of P positions, as torch tensors on the device that computed them."""

    topk_ids: Tensor | None  # [P, k] int64, by descending log-prob
    topk_logprobs: Tensor | None  # [P, k] float32, log_softmax over the FULL vocabulary
    sample_offsets: Tensor | None  # [P+1] int64: position p's draws are [offsets[p], offsets[p+1])
    sample_ids: Tensor | None  # [S] int64, unique drawn ids, ascending within a position
    sample_counts: Tensor | None  # [S] int64, how often each was drawn
    entropy: Tensor | None  # [P] float32, nats
    target_logprob: Tensor | None = None  # [P] float32: logp of the next token, NaN where none
    gathered_logprobs: Tensor | None = None  # [P, m] float32: logp of the ``gather`` ids, NaN where < 0

    def start_host_copy(self) -> HostLabels:
        """Start copying every tensor to the host; ``wait()`` on the result gives numpy.

        CUDA tensors are copied asynchronously into pinned host memory and an event is
        recorded behind the copies on each device's stream, so waiting blocks only until
        these copies are done, not on work queued after them (the next batch's forward).
        CPU tensors are shared, not copied; other accelerators get a plain blocking copy.
        """
        host: dict[str, Tensor | None] = {}
        cuda_devices: set[torch.device] = set()
        for f in fields(self):
            tensor = getattr(self, f.name)
            if tensor is None:
                host[f.name] = None
            elif tensor.device.type == "cpu":
                host[f.name] = tensor.detach()
            elif tensor.device.type == "cuda":
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                buffer.copy_(tensor.detach(), non_blocking=True)
                host[f.name] = buffer
                cuda_devices.add(tensor.device)
            else:
                host[f.name] = tensor.detach().to("cpu")
        events = []
        for device in cuda_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return HostLabels(host, events)

    def to_numpy(self) -> PositionLabelsNumpy:
        """Copy every tensor to the host and wait: one copy each, one wait per device."""
        return self.start_host_copy().wait()


class HostLabels:
    """:class:`PositionLabels` on their way to the host (see :meth:`PositionLabels.start_host_copy`)."""

    def __init__(self, host: dict[str, Tensor | None], events: list) -> None:
        self._host, self._events = host, events

    def wait(self) -> PositionLabelsNumpy:
        for event in self._events:
            event.synchronize()
        return PositionLabelsNumpy(**{name: None if t is None else t.numpy() for name, t in self._host.items()})


@torch.no_grad()
def label_positions(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    spec: SoftLabelSpec,
    *,
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
    gather: Tensor | None = None,
) -> PositionLabels:
    """Soft labels of P positions from their final hidden states ``hidden`` ``[P, H]``.

    ``head(hidden[a:b])`` must return the logits ``[b - a, V]`` (any dtype; each chunk is
    upcast to float32). Outputs live on the device of the head's logits. ``generator``
    drives the sampled modes (the default generator of the logits' device when None).
    ``targets`` ``[P]`` (int64, -1 where a position has no next token) asks for the teacher's
    log-probability of each position's actual next token too, and ``gather`` ``[P, m]``
    (int64, -1 for none) its log-probabilities of those ids.
    """
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [positions, hidden_size], got shape {tuple(hidden.shape)}")
    return _label_chunks(hidden.shape[0], lambda start, end: head(hidden[start:end]),
                         hidden.device, spec, generator, targets, gather)


@torch.no_grad()
def logits_labels(
    logits: Tensor,
    spec: SoftLabelSpec,
    *,
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
    gather: Tensor | None = None,
) -> PositionLabels:
    """Soft labels of P positions from their logits ``[P, V]``, still in chunks of positions
    (``targets`` and ``gather`` as for :func:`label_positions`)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [positions, vocab], got shape {tuple(logits.shape)}")
    return _label_chunks(logits.shape[0], lambda start, end: logits[start:end],
                         logits.device, spec, generator, targets, gather)


def _label_chunks(
    num_positions: int,
    chunk_logits: Callable[[int, int], Tensor],
    device: torch.device,
    spec: SoftLabelSpec,
    generator: torch.Generator | None,
    targets: Tensor | None = None,
    gather: Tensor | None = None,
) -> PositionLabels:
    P, s = num_positions, spec.samples
    if targets is not None and tuple(targets.shape) != (P,):
        raise ValueError(f"targets must be [{P}], got shape {tuple(targets.shape)}")
    if gather is not None and (gather.ndim != 2 or gather.shape[0] != P):
        raise ValueError(f"gather must be [{P}, ids], got shape {tuple(gather.shape)}")
    gather_width = None if gather is None else gather.shape[1]
    uniforms = None
    if spec.has_samples:
        # All uniforms up front, so that the draws do not depend on the chunk size.
        uniforms = torch.rand((P, s), generator=generator, dtype=torch.float64,
                              device=generator.device if generator is not None else device)

    out: _Outputs | None = None
    for start in range(0, P, spec.chunk_positions):
        end = min(start + spec.chunk_positions, P)
        logits = chunk_logits(start, end)
        if logits.ndim != 2 or logits.shape[0] != end - start:
            raise ValueError(f"head must return logits [{end - start}, vocab], got shape {tuple(logits.shape)}")
        if out is None:
            _check_vocab(spec, logits.shape[1])
            out = _Outputs.allocate(spec, P, logits.device, targets=targets is not None, gather_width=gather_width)
            if targets is not None:
                targets = targets.to(logits.device, dtype=torch.int64, non_blocking=True)
            if gather is not None:
                gather = gather.to(logits.device, dtype=torch.int64, non_blocking=True)
            if uniforms is not None:
                uniforms = uniforms.to(logits.device, non_blocking=True)
        # On the CPU the chunk is reduced in row blocks of about 8 MB of float32: each block's
        # log_softmax, top-k and entropy then stay in the processor's caches instead of
        # streaming a [chunk x V] tensor through memory several times. Row-wise math, so the
        # results are the same; on accelerators the whole chunk is one set of kernels.
        rows = end - start
        if logits.device.type == "cpu":
            rows = max(1, _CPU_BLOCK_ELEMENTS // logits.shape[1])
        for a in range(0, end - start, rows):
            b = min(a + rows, end - start)
            logp = torch.log_softmax(logits[a:b], dim=-1, dtype=torch.float32)
            _label_chunk(logp, start + a, start + b, spec, out, uniforms)
            if targets is not None:
                out.target_logprob[start + a:start + b] = _logprobs_at(logp, targets[start + a:start + b, None])[:, 0]
            if gather is not None:
                out.gathered_logprobs[start + a:start + b] = _logprobs_at(logp, gather[start + a:start + b])
            del logp
        del logits  # the model-dtype chunk is no longer needed
    if out is None:  # no positions: nothing ran through the head
        out = _Outputs.allocate(spec, 0, device, targets=targets is not None, gather_width=gather_width)
    return out.finish(spec)


def _check_vocab(spec: SoftLabelSpec, vocab: int) -> None:
    if vocab < 1:
        raise ValueError("logits have an empty vocabulary dimension")
    if spec.has_topk and spec.k > vocab:
        raise ConfigError(f"soft_labels.k: {spec.k} exceeds the teacher's vocabulary size {vocab}")


@dataclass(kw_only=True)
class _Outputs:
    """Preallocated device outputs; the draws stay dense ``[P, samples]`` until :meth:`finish`."""

    topk_ids: Tensor | None
    topk_logprobs: Tensor | None
    entropy: Tensor | None
    draws: Tensor | None  # [P, s] int64, sorted per position
    run_counts: Tensor | None  # [P, s] int64: at the first draw of each run its length, else 0
    target_logprob: Tensor | None = None  # [P] float32
    gathered_logprobs: Tensor | None = None  # [P, m] float32

    @classmethod
    def allocate(cls, spec: SoftLabelSpec, P: int, device: torch.device, *, targets: bool = False,
                 gather_width: int | None = None) -> _Outputs:
        def empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        k, s = spec.k, spec.samples
        return cls(
            topk_ids=empty((P, k), torch.int64) if spec.has_topk else None,
            topk_logprobs=empty((P, k), torch.float32) if spec.has_topk else None,
            entropy=empty((P,), torch.float32) if spec.entropy else None,
            draws=empty((P, s), torch.int64) if spec.has_samples else None,
            run_counts=empty((P, s), torch.int64) if spec.has_samples else None,
            target_logprob=empty((P,), torch.float32) if targets else None,
            gathered_logprobs=empty((P, gather_width), torch.float32) if gather_width is not None else None,
        )

    def finish(self, spec: SoftLabelSpec) -> PositionLabels:
        offsets = ids = counts = None
        if spec.has_samples:
            assert self.draws is not None and self.run_counts is not None
            keep = self.run_counts > 0
            offsets = torch.zeros(self.draws.shape[0] + 1, dtype=torch.int64, device=self.draws.device)
            torch.cumsum(keep.sum(dim=1), dim=0, out=offsets[1:])
            # Boolean indexing is row-major: position by position, ascending within one.
            # It is the one host synchronisation of the whole call (S is data-dependent).
            ids = self.draws[keep]
            counts = self.run_counts[keep]
        return PositionLabels(topk_ids=self.topk_ids, topk_logprobs=self.topk_logprobs,
                              sample_offsets=offsets, sample_ids=ids, sample_counts=counts,
                              entropy=self.entropy, target_logprob=self.target_logprob,
                              gathered_logprobs=self.gathered_logprobs)


def _label_chunk(logp: Tensor, start: int, end: int, spec: SoftLabelSpec, out: _Outputs,
                 uniforms: Tensor | None) -> None:
    topk_ids = None
    if spec.has_topk:
        assert out.topk_ids is not None and out.topk_logprobs is not None
        values, topk_ids = torch.topk(logp, spec.k, dim=-1, largest=True, sorted=False)
        topk_ids, order = topk_ids.sort(dim=-1)  # the cache stores each row in id order
        out.topk_logprobs[start:end] = values.gather(-1, order)
        out.topk_ids[start:end] = topk_ids
    if spec.entropy:
        assert out.entropy is not None
        out.entropy[start:end] = _entropy(logp)
    if spec.has_samples:
        assert uniforms is not None and out.draws is not None and out.run_counts is not None
        tail = topk_ids if spec.mode == "topk+sampled" else None
        ids, valid = _inverse_cdf(logp, uniforms[start:end], exclude=tail)
        out.draws[start:end] = ids
        out.run_counts[start:end] = _run_counts(ids).mul_(valid[:, None])


def _logprobs_at(logp: Tensor, ids: Tensor) -> Tensor:
    """``logp[i, ids[i, j]]`` for ``[p, m]`` ids; NaN where the id is negative (no next
    token, or no id to look up)."""
    picked = logp.gather(1, ids.clamp_min(0))
    return torch.where(ids >= 0, picked, torch.full_like(picked, float("nan")))


def _entropy(logp: Tensor) -> Tensor:
    """``-sum(p * logp)`` per row in float32; ids with ``p = 0`` (``logp = -inf``) contribute 0."""
    plogp = logp.exp()
    plogp.mul_(logp)  # 0 * -inf = nan exactly where logp = -inf, cleared next
    plogp.masked_fill_(torch.isneginf(logp), 0.0)
    return plogp.sum(dim=-1).neg_()


def _inverse_cdf(logp: Tensor, uniforms: Tensor, *, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    """Draw ids by inverting the float64 CDF of ``exp(logp)`` (minus ``exclude`` ids) at ``uniforms``.

    ``uniforms`` ``[p, s]`` float64 in ``[0, 1)``. Returns the ids ``[p, s]`` sorted per row
    and ``valid`` ``[p]``: False where the (tail) distribution has no mass; such rows hold
    arbitrary ids and must be dropped.
    """
    cdf = logp.to(torch.float64).exp_()
    if exclude is not None:
        cdf.scatter_(1, exclude, 0.0)
    cdf = cdf.cumsum_(dim=1)
    total = cdf[:, -1:].clone()  # a copy, so that `del cdf` below frees the CDF
    # Scale by the row total, and stay strictly below it so that the search cannot run off
    # the end: with right=True the id found has cdf[i-1] <= x < cdf[i], hence p_i > 0.
    x = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, x, right=True)
    del cdf
    ids.clamp_(max=logp.shape[1] - 1)  # only rows without mass can reach V
    ids = ids.sort(dim=1).values  # small: [p, s]; the run-length step needs sorted rows
    return ids, total[:, 0] > 0


def _run_counts(ids: Tensor) -> Tensor:
    """Run lengths of a row-sorted ``[p, s]`` tensor, at each run's first entry (0 elsewhere).

    Unique ids are then the entries with a positive count, and their counts those counts.
    No loops over rows, no scatter (deterministic on every device), no host synchronisation.
    """
    columns = torch.arange(ids.shape[1], device=ids.device)
    run_end = torch.searchsorted(ids, ids, right=True)  # one past the last equal draw
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return (run_end - columns).mul_(first)
