"""Soft labels computed in chunks on the device, against a dense float32 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.errors import ConfigError
from logitcache.pipeline.capture.soft_labels import (
    PositionLabels,
    PositionLabelsNumpy,
    SoftLabelSpec,
    label_positions,
    logits_labels,
)

# -- the dense reference: the full [P, V] float32 log_softmax at once -------------------------


def dense_reference(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, k, dim=-1, sorted=True)
    ids, order = ids.sort(dim=-1)  # as the cache stores them: each row in id order
    values = values.gather(-1, order)
    logp64 = logp.double()
    p64 = logp64.exp()
    entropy = -torch.where(p64 > 0, p64 * logp64, torch.zeros_like(p64)).sum(-1)
    return {"logp": logp, "topk_ids": ids, "topk_logprobs": values, "entropy": entropy}


def spec(mode: str = "topk", *, k: int = 5, samples: int = 10, entropy: bool = True,
         chunk: int = 2048) -> SoftLabelSpec:
    return SoftLabelSpec(mode=mode, k=k, samples=samples, entropy=entropy, chunk_positions=chunk)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(P: int, V: int, *, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(P, V, generator=gen(seed)) * scale


def assert_topk_matches(labels: PositionLabels, ref: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(labels.topk_logprobs, ref["topk_logprobs"], rtol=1e-6, atol=1e-6)
    # Tie-robust: the ids chosen carry the reference's log-probs (and are distinct).
    torch.testing.assert_close(ref["logp"].gather(1, labels.topk_ids), ref["topk_logprobs"],
                               rtol=1e-6, atol=1e-6)
    assert (labels.topk_ids.sort(1).values.diff(dim=1) > 0).all()


def per_position(labels: PositionLabels) -> list[tuple[np.ndarray, np.ndarray]]:
    out = labels.to_numpy()
    o = out.sample_offsets
    return [(out.sample_ids[o[i]:o[i + 1]], out.sample_counts[o[i]:o[i + 1]]) for i in range(len(o) - 1)]


def pooled_counts(labels: PositionLabels, V: int) -> np.ndarray:
    out = labels.to_numpy()
    return np.bincount(out.sample_ids, weights=out.sample_counts, minlength=V)


def chi_square_pvalue(observed: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of pooled counts to ``probs`` (Pearson's statistic, no scipy)."""
    observed = np.asarray(observed, dtype=np.float64)
    expected = observed.sum() * np.asarray(probs, dtype=np.float64)
    assert (expected >= 5).all(), "test design: every expected count must be >= 5"
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    # Survival function of chi2(dof) = regularized upper incomplete gamma Q(dof/2, stat/2).
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


P_VALUE_FLOOR = 1e-4


class RecordingHead(torch.nn.Module):
    """A linear head that remembers every logits chunk it returned."""

    def __init__(self, H: int, V: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(H, V, bias=False, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(V, H, generator=gen(seed)).to(dtype) * 0.5)
        self.chunks: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.linear(h)
        self.chunks.append(logits)
        return logits

    def seen(self) -> torch.Tensor:
        return torch.cat(self.chunks)


# -- top-k and entropy ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 100, 1000])
def test_topk_and_entropy_equal_the_dense_reference(chunk: int) -> None:
    P, H, V = 100, 16, 300
    hidden = torch.randn(P, H, generator=gen(1))
    head = RecordingHead(H, V)
    labels = label_positions(hidden, head, spec("topk", k=8, chunk=chunk))
    assert len(head.chunks) == -(-P // chunk)
    assert max(c.shape[0] for c in head.chunks) == min(chunk, P)
    with torch.no_grad():
        ref = dense_reference(head.linear(hidden), 8)
    assert labels.topk_ids.dtype == torch.int64 and labels.topk_ids.shape == (P, 8)
    assert labels.topk_logprobs.dtype == torch.float32
    assert_topk_matches(labels, ref)
    assert torch.equal(labels.topk_ids, ref["topk_ids"])  # random float logits: no ties
    assert labels.entropy.dtype == torch.float32 and labels.entropy.shape == (P,)
    torch.testing.assert_close(labels.entropy.double(), ref["entropy"], rtol=1e-5, atol=1e-5)
    assert labels.sample_ids is None and labels.sample_offsets is None and labels.sample_counts is None


def test_logprobs_are_normalised_over_the_full_vocabulary() -> None:
    logits = random_logits(100, 400, seed=2) + 5.0  # a shift must not matter
    labels = logits_labels(logits, spec("topk", k=6, chunk=9))
    ref = dense_reference(logits, 6)
    tail = 1.0 - labels.topk_logprobs.double().exp().sum(-1)
    mask = torch.ones_like(ref["logp"], dtype=torch.bool).scatter_(1, ref["topk_ids"], False)
    ref_tail = torch.where(mask, ref["logp"].double().exp(), 0.0).sum(-1)
    torch.testing.assert_close(tail, ref_tail, rtol=0, atol=2e-6)
    assert (tail > 0).all()


def test_bf16_hidden_and_head_upcast_to_float32() -> None:
    P, H, V = 64, 32, 500
    hidden = torch.randn(P, H, generator=gen(3)).to(torch.bfloat16)
    head = RecordingHead(H, V, dtype=torch.bfloat16)
    labels = label_positions(hidden, head, spec("topk", k=10, chunk=5))
    seen = head.seen()
    assert seen.dtype == torch.bfloat16
    ref = dense_reference(seen, 10)  # float32 reference from the very same bf16 logits
    assert labels.topk_logprobs.dtype == torch.float32 and labels.entropy.dtype == torch.float32
    assert_topk_matches(labels, ref)
    torch.testing.assert_close(labels.entropy.double(), ref["entropy"], rtol=1e-5, atol=1e-5)
    # The log_softmax ran in float32, not in bf16.
    in_bf16 = torch.log_softmax(seen, dim=-1).float().gather(1, labels.topk_ids)
    assert not torch.equal(in_bf16, labels.topk_logprobs)


def test_entropy_treats_zero_probabilities_as_zero() -> None:
    logits = random_logits(30, 50, seed=4)
    logits[:, ::3] = float("-inf")  # masked ids: p = 0, logp = -inf
    logits[0, 2:] = float("-inf")  # a one-hot row (only id 1 is left): entropy 0
    labels = logits_labels(logits, spec("topk", k=1, chunk=4))
    ref = dense_reference(logits, 1)
    assert torch.isfinite(labels.entropy).all()
    torch.testing.assert_close(labels.entropy.double(), ref["entropy"], rtol=1e-5, atol=1e-6)
    assert labels.entropy[0] == 0


@settings(max_examples=25, deadline=None)
@given(P=st.integers(0, 40), V=st.integers(1, 60), data=st.data())
def test_any_shape_matches_the_reference(P: int, V: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, V))
    chunk = data.draw(st.integers(1, 50))
    logits = random_logits(P, V, seed=P * 100 + V)
    labels = logits_labels(logits, spec("topk+sampled", k=k, samples=5, chunk=chunk), generator=gen(0))
    ref = dense_reference(logits, k)
    assert labels.topk_ids.shape == (P, k)
    assert_topk_matches(labels, ref)
    torch.testing.assert_close(labels.entropy.double(), ref["entropy"], rtol=1e-5, atol=1e-5)
    check_sample_structure(labels, V, expected_total=5 if k < V else 0)


# -- chunking and determinism ---------------------------------------------------------------


def assert_labels_equal(a: PositionLabels, b: PositionLabels) -> None:
    for name in ("topk_ids", "topk_logprobs", "sample_offsets", "sample_ids", "sample_counts", "entropy"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("mode", ["topk", "sampled", "topk+sampled"])
def test_chunk_size_does_not_change_any_result(mode: str) -> None:
    P, V = 100, 200
    logits = random_logits(P, V, seed=5)
    results = [logits_labels(logits, spec(mode, k=4, samples=12, chunk=c), generator=gen(7))
               for c in (1, 7, P, P + 13)]
    for other in results[1:]:
        assert_labels_equal(results[0], other)


def test_chunk_size_does_not_change_results_through_a_head() -> None:
    P, H, V = 100, 16, 200
    # Integer-valued hidden states and weights make the matmul exact, so the head gives the
    # same rows whatever the chunk shape (a float matmul may round differently per number of
    # rows, on CPU as on GPU, which the module docstring notes); the float bias breaks ties.
    hidden = torch.randint(-3, 4, (P, H), generator=gen(6)).float()
    weight = torch.randint(-2, 3, (V, H), generator=gen(7)).float()
    bias = torch.rand(V, generator=gen(8))

    def head(h: torch.Tensor) -> torch.Tensor:
        return h @ weight.T + bias

    results = [label_positions(hidden, head, spec("topk+sampled", k=4, samples=12, chunk=c),
                               generator=gen(7)) for c in (1, 7, P, P + 1)]
    for other in results[1:]:
        assert_labels_equal(results[0], other)
    assert_topk_matches(results[0], dense_reference(head(hidden), 4))


def test_seeds_make_sampling_reproducible_and_different_seeds_differ() -> None:
    logits = random_logits(100, 300, seed=8)
    for mode in ("sampled", "topk+sampled"):
        s = spec(mode, k=4, samples=20, chunk=33)
        assert_labels_equal(logits_labels(logits, s, generator=gen(1)),
                            logits_labels(logits, s, generator=gen(1)))
        a, b = logits_labels(logits, s, generator=gen(1)), logits_labels(logits, s, generator=gen(2))
        assert not (torch.equal(a.sample_offsets, b.sample_offsets) and torch.equal(a.sample_ids, b.sample_ids)
                    and torch.equal(a.sample_counts, b.sample_counts))


def test_sampling_consumes_one_documented_draw_from_the_generator() -> None:
    P, s = 30, 9
    g = gen(3)
    logits_labels(random_logits(P, 40), spec("sampled", samples=s, chunk=4), generator=g)
    expected = gen(3)
    torch.rand((P, s), generator=expected, dtype=torch.float64)
    assert torch.equal(g.get_state(), expected.get_state())
    g = gen(3)
    logits_labels(random_logits(P, 40), spec("topk", chunk=4), generator=g)
    assert torch.equal(g.get_state(), gen(3).get_state())


def test_default_generator_works() -> None:
    labels = logits_labels(random_logits(10, 30), spec("sampled", samples=7))
    check_sample_structure(labels, 30, expected_total=7)


# -- sampled mode ---------------------------------------------------------------------------


def check_sample_structure(labels: PositionLabels, V: int, *, expected_total: int) -> None:
    offsets, ids, counts = labels.sample_offsets, labels.sample_ids, labels.sample_counts
    assert offsets.dtype == ids.dtype == counts.dtype == torch.int64
    assert offsets[0] == 0 and offsets[-1] == len(ids) == len(counts)
    assert (offsets.diff() >= 0).all()
    assert (counts >= 1).all()
    assert ((ids >= 0) & (ids < V)).all()
    for pos_ids, pos_counts in per_position(labels):
        assert pos_counts.sum() == expected_total
        assert (np.diff(pos_ids) > 0).all()  # unique and ascending


def test_sampled_structure() -> None:
    P, V, s = 100, 60, 25
    labels = logits_labels(random_logits(P, V, seed=9), spec("sampled", samples=s, chunk=13), generator=gen(0))
    assert labels.topk_ids is None and labels.topk_logprobs is None
    assert labels.sample_offsets.shape == (P + 1,)
    check_sample_structure(labels, V, expected_total=s)


def test_zero_probability_ids_are_never_drawn() -> None:
    P, V = 200, 40
    logits = random_logits(P, V, seed=10)
    logits[:, 1::2] = float("-inf")
    logits[:, 0] = float("-inf")  # the first and the last id have p = 0 too
    logits[:, -1] = float("-inf")
    labels = logits_labels(logits, spec("sampled", samples=50, chunk=17), generator=gen(0))
    drawn = labels.sample_ids
    assert (drawn % 2 == 0).all() and (drawn != 0).all() and (drawn != V - 1).all()
    check_sample_structure(labels, V, expected_total=50)


def test_inverse_cdf_boundaries_never_select_zero_probability_ids() -> None:
    from logitcache.pipeline.capture.soft_labels import _inverse_cdf

    logp = torch.log(torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]))
    uniforms = torch.tensor([[0.0, 0.5, 1.0 - 2.0**-53, 0.25]], dtype=torch.float64)
    ids, valid = _inverse_cdf(logp, uniforms, exclude=None)
    assert ids.tolist() == [[1, 1, 3, 3]] and valid.tolist() == [True]
    ids, valid = _inverse_cdf(logp, uniforms, exclude=torch.tensor([[1]]))
    assert ids.tolist() == [[3, 3, 3, 3]] and valid.tolist() == [True]
    _, valid = _inverse_cdf(logp, uniforms, exclude=torch.tensor([[1, 3]]))
    assert valid.tolist() == [False]


def shared_distribution(P: int, V: int, seed: int) -> torch.Tensor:
    row = torch.randn(V, generator=gen(seed)) * 0.8
    return row.expand(P, V).contiguous()


def test_sampler_passes_chi_square_and_a_biased_sampler_fails() -> None:
    P, V, s = 2000, 20, 100  # 200k draws from one distribution over 20 ids
    logits = shared_distribution(P, V, seed=11)
    probs = torch.softmax(logits[0].double(), 0).numpy()
    labels = logits_labels(logits, spec("sampled", samples=s, chunk=256), generator=gen(12))
    observed = pooled_counts(labels, V)
    assert observed.sum() == P * s
    assert chi_square_pvalue(observed, probs) > P_VALUE_FLOOR

    # The same test rejects biased samplers: temperature 0.8 ...
    cooled = logits_labels(logits / 0.8, spec("sampled", samples=s, chunk=256), generator=gen(12))
    assert chi_square_pvalue(pooled_counts(cooled, V), probs) < P_VALUE_FLOOR
    # ... and a sampler that returns the argmax 3% of the time.
    heavy = 0.97 * probs + 0.03 * np.eye(V)[probs.argmax()]
    draws = torch.multinomial(torch.from_numpy(heavy), P * s, replacement=True, generator=gen(13))
    assert chi_square_pvalue(np.bincount(draws.numpy(), minlength=V), probs) < P_VALUE_FLOOR


def test_tail_draws_exclude_topk_and_follow_the_renormalised_tail() -> None:
    P, V, k, s = 2000, 25, 5, 100
    logits = shared_distribution(P, V, seed=14)
    labels = logits_labels(logits, spec("topk+sampled", k=k, samples=s, chunk=300), generator=gen(15))
    check_sample_structure(labels, V, expected_total=s)
    top = labels.topk_ids.numpy()
    for p, (pos_ids, _) in enumerate(per_position(labels)):
        assert not np.isin(pos_ids, top[p]).any()
    probs = torch.softmax(logits[0].double(), 0).numpy()
    tail = np.setdiff1d(np.arange(V), top[0])
    observed = pooled_counts(labels, V)
    assert observed[top[0]].sum() == 0
    assert chi_square_pvalue(observed[tail], probs[tail] / probs[tail].sum()) > P_VALUE_FLOOR
    # A biased tail sampler (temperature 0.8, same top-k) is rejected by the same test.
    cooled = logits_labels(logits / 0.8, spec("topk+sampled", k=k, samples=s, chunk=300), generator=gen(15))
    assert torch.equal(cooled.topk_ids, labels.topk_ids)
    cooled_counts = pooled_counts(cooled, V)[tail]
    assert chi_square_pvalue(cooled_counts, probs[tail] / probs[tail].sum()) < P_VALUE_FLOOR


def estimator_z_score(labels: PositionLabels, logp: torch.Tensor, *, with_head: bool) -> float:
    """z of mean(estimate - exact) of E_p[log p] (minus the entropy) over all positions."""
    logp64 = logp.double()
    exact = (logp64.exp() * torch.where(torch.isneginf(logp64), 0.0, logp64)).sum(-1)
    o = labels.sample_offsets
    pos = torch.repeat_interleave(torch.arange(len(o) - 1), o.diff())
    n = torch.zeros(len(o) - 1, dtype=torch.float64).index_add_(0, pos, labels.sample_counts.double())
    mean_f = torch.zeros_like(n).index_add_(0, pos, labels.sample_counts.double() * logp64[pos, labels.sample_ids])
    mean_f = mean_f / n
    if with_head:
        head_p = labels.topk_logprobs.double().exp()
        head = (head_p * logp64.gather(1, labels.topk_ids)).sum(-1)
        estimate = head + (1.0 - head_p.sum(-1)) * mean_f
    else:
        estimate = mean_f
    err = estimate - exact
    return float(err.mean() / (err.std() / len(err) ** 0.5))


def test_topk_plus_tail_estimator_is_unbiased() -> None:
    P, V, k, s = 4000, 200, 5, 16
    logits = random_logits(P, V, seed=16, scale=2.0)
    logp = torch.log_softmax(logits, -1)
    labels = logits_labels(logits, spec("topk+sampled", k=k, samples=s, chunk=512), generator=gen(17))
    assert abs(estimator_z_score(labels, logp, with_head=True)) < 4.0
    # Using draws from the full distribution in the tail term is biased, and the test sees it.
    wrong = logits_labels(logits, spec("sampled", samples=s, chunk=512), generator=gen(17))
    wrong.topk_ids, wrong.topk_logprobs = labels.topk_ids, labels.topk_logprobs
    assert abs(estimator_z_score(wrong, logp, with_head=True)) > 4.0


def test_sampled_estimator_is_unbiased() -> None:
    P, V, s = 4000, 200, 8
    logits = random_logits(P, V, seed=18, scale=2.0)
    logp = torch.log_softmax(logits, -1)
    labels = logits_labels(logits, spec("sampled", samples=s, chunk=512), generator=gen(19))
    assert abs(estimator_z_score(labels, logp, with_head=False)) < 4.0


def test_a_tail_without_mass_gets_no_draws() -> None:
    V = 12
    logits = random_logits(6, V, seed=20)
    logits[:3, 4:] = float("-inf")  # rows 0-2: all mass in 4 ids, so k=4 leaves an empty tail
    labels = logits_labels(logits, spec("topk+sampled", k=4, samples=9, chunk=4), generator=gen(0))
    totals = [int(c.sum()) for _, c in per_position(labels)]
    assert totals == [0, 0, 0, 9, 9, 9]
    everything = logits_labels(logits, spec("topk+sampled", k=V, samples=9, chunk=4), generator=gen(0))
    assert torch.equal(everything.sample_offsets, torch.zeros(7, dtype=torch.int64))
    assert len(everything.sample_ids) == len(everything.sample_counts) == 0


# -- edges, validation, host copies ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["topk", "sampled", "topk+sampled"])
def test_no_positions(mode: str) -> None:
    s = spec(mode, k=3, samples=4)
    calls: list[torch.Tensor] = []
    through_head = label_positions(torch.zeros(0, 8), lambda h: calls.append(h) or h, s, generator=gen(0))
    assert calls == []
    for labels in (through_head, logits_labels(torch.zeros(0, 30), s, generator=gen(0))):
        if s.has_topk:
            assert labels.topk_ids.shape == (0, 3) and labels.topk_ids.dtype == torch.int64
            assert labels.topk_logprobs.shape == (0, 3) and labels.topk_logprobs.dtype == torch.float32
        if s.has_samples:
            assert torch.equal(labels.sample_offsets, torch.zeros(1, dtype=torch.int64))
            assert labels.sample_ids.shape == labels.sample_counts.shape == (0,)
        assert labels.entropy.shape == (0,) and labels.entropy.dtype == torch.float32
        out = labels.to_numpy()
        assert out.entropy.shape == (0,)


def test_to_numpy_types() -> None:
    labels = logits_labels(random_logits(20, 50), spec("topk+sampled", k=3, samples=6, chunk=6), generator=gen(0))
    out = labels.to_numpy()
    assert isinstance(out, PositionLabelsNumpy)
    expected = {"topk_ids": np.int64, "topk_logprobs": np.float32, "sample_offsets": np.int64,
                "sample_ids": np.int64, "sample_counts": np.int64, "entropy": np.float32}
    for name, dtype in expected.items():
        array = getattr(out, name)
        assert isinstance(array, np.ndarray) and array.dtype == dtype, name
        np.testing.assert_array_equal(array, getattr(labels, name).numpy())
    assert out.topk_ids.shape == (20, 3) and out.sample_offsets.shape == (21,)
    only_topk = logits_labels(random_logits(5, 50), spec("topk", entropy=False)).to_numpy()
    assert only_topk.entropy is None and only_topk.sample_ids is None and only_topk.sample_offsets is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "greedy"}, "mode"),
    ({"mode": "topk", "k": 0}, "k"),
    ({"mode": "topk+sampled", "samples": 0}, "samples"),
    ({"mode": "sampled", "samples": -1}, "samples"),
    ({"chunk_positions": 0}, "chunk_positions"),
])
def test_invalid_specs_are_config_errors(kwargs: dict, match: str) -> None:
    args = {"mode": "topk", "k": 4, "samples": 4, "entropy": False} | kwargs
    with pytest.raises(ConfigError, match=match):
        SoftLabelSpec(**args)


def test_ignored_fields_need_no_valid_value() -> None:
    SoftLabelSpec(mode="sampled", k=0, samples=3, entropy=False)
    SoftLabelSpec(mode="topk", k=3, samples=0, entropy=False)


def test_k_larger_than_the_vocabulary_is_an_error() -> None:
    with pytest.raises(ConfigError, match="vocabulary"):
        logits_labels(random_logits(4, 10), spec("topk", k=11))


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="logits"):
        logits_labels(torch.zeros(3, 4, 5), spec())
    with pytest.raises(ValueError, match="hidden"):
        label_positions(torch.zeros(3), lambda h: h, spec())
    with pytest.raises(ValueError, match="head"):
        label_positions(torch.zeros(3, 8), lambda h: h[:1], spec(k=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_copies_to_pinned_host_memory() -> None:
    P, V = 300, 1000
    logits = random_logits(P, V, seed=21)
    s = spec("topk+sampled", k=8, samples=20, chunk=64)
    on_gpu = logits_labels(logits.cuda().bfloat16(), s, generator=gen(0))
    on_cpu = logits_labels(logits.bfloat16(), s, generator=gen(0))
    assert on_gpu.topk_ids.is_cuda
    out = on_gpu.to_numpy()
    np.testing.assert_allclose(out.topk_logprobs, on_cpu.topk_logprobs.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.entropy, on_cpu.entropy.numpy(), rtol=1e-4, atol=1e-4)
    host = PositionLabels(**{name: torch.from_numpy(getattr(out, name)) for name in (
        "topk_ids", "topk_logprobs", "sample_offsets", "sample_ids", "sample_counts", "entropy")})
    check_sample_structure(host, V, expected_total=20)


@pytest.mark.parametrize("mode", ["topk", "sampled", "topk+sampled"])
def test_cpu_row_blocks_do_not_change_any_result(monkeypatch, mode: str) -> None:
    import logitcache.pipeline.capture.soft_labels as module

    logits = random_logits(90, 300, seed=5)
    whole = logits_labels(logits, spec(mode, chunk=64), generator=gen(3))
    monkeypatch.setattr(module, "_CPU_BLOCK_ELEMENTS", 300 * 7)  # blocks of 7 rows in a 64-row chunk
    blocked = logits_labels(logits, spec(mode, chunk=64), generator=gen(3))
    assert_labels_equal(whole, blocked)
    if mode != "sampled":
        assert_topk_matches(blocked, dense_reference(logits, 5))


@pytest.mark.parametrize("chunk", [1, 7, 2048])
def test_gathered_logprobs_are_the_full_log_softmax_at_the_ids_and_change_nothing_else(chunk: int) -> None:
    P, V = 40, 90
    logits = random_logits(P, V, seed=11)
    ids = torch.randint(0, V, (P, 6), generator=gen(12))
    ids[::3, 2:] = -1  # no id to look up: NaN
    plain = logits_labels(logits, spec("topk+sampled", k=4, chunk=chunk), generator=gen(3))
    looked = logits_labels(logits, spec("topk+sampled", k=4, chunk=chunk), generator=gen(3), gather=ids)
    assert_labels_equal(plain, looked)
    assert plain.gathered_logprobs is None
    want = dense_reference(logits, 4)["logp"].gather(1, ids.clamp_min(0))
    want[ids < 0] = float("nan")
    torch.testing.assert_close(looked.gathered_logprobs, want, equal_nan=True, rtol=0, atol=1e-6)
    assert looked.to_numpy().gathered_logprobs.shape == (P, 6)
    with pytest.raises(ValueError, match="gather"):
        logits_labels(logits, spec(), gather=ids[:5])
