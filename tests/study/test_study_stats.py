"""The study's statistics on synthetic cases with known answers, and exact order-free totals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from noln_core.study.stats import (
    StudyRangeError, Totals, ece, head_and_sequence_bootstrap, histogram_percentiles, limb_float, mean_ci,
    median_from_histogram, papers_nmae_bootstrap, percentile_ci, poisson_weights, quantise, sparse_key, t_quantile,
)


@pytest.mark.parametrize("df, expected", [(1, 12.706204736), (2, 4.302652730), (4, 2.776445105),
                                          (9, 2.262157163), (30, 2.042272456), (1000, 1.962339081)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_mean_ci_is_the_t_interval_over_sequences():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    mean, (lo, hi) = mean_ci(len(values), values.sum(), (values**2).sum())
    half = 2.776445105 * values.std(ddof=1) / math.sqrt(5)
    assert mean == pytest.approx(3.0)
    assert (lo, hi) == pytest.approx((3.0 - half, 3.0 + half), abs=1e-9)
    # Constant values: a zero-width interval; one value: no interval at all.
    assert mean_ci(4, 8.0, 16.0)[1] == pytest.approx((2.0, 2.0))
    assert all(math.isnan(x) for x in mean_ci(1, 2.0, 4.0)[1])


def test_ci_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        x = rng.normal(1.0, 2.0, size=12)
        _, (lo, hi) = mean_ci(12, x.sum(), (x**2).sum())
        hits += lo <= 1.0 <= hi
    assert 0.92 <= hits / 400 <= 0.98


def test_ece_on_a_known_case():
    # Bin 0: 2 predictions at confidence 0.05, one right (accuracy 0.5); bin 9: 2 at 0.95, both right.
    counts = np.array([2, 0, 0, 0, 0, 0, 0, 0, 0, 2])
    conf = np.array([0.1, 0, 0, 0, 0, 0, 0, 0, 0, 1.9])
    acc = np.array([1.0, 0, 0, 0, 0, 0, 0, 0, 0, 2.0])
    # ECE = 2/4 * |0.05 - 0.5| + 2/4 * |0.95 - 1.0| = 0.225 + 0.025
    assert ece(counts, conf, acc) == pytest.approx(0.25)
    # Perfect calibration gives 0; the replicate axis is the leading one.
    assert ece(np.stack([counts, counts]), np.stack([acc, acc]), np.stack([acc, acc])) == pytest.approx([0, 0])


def test_median_from_histogram():
    values = np.array([0.1234, 2.5, 3.75, 3.7501, 9.0])
    width = 1e-4
    counts = np.bincount((values / width).astype(int), minlength=100_000)
    assert median_from_histogram(counts, width) == pytest.approx(np.median(values), abs=width)
    assert math.isnan(median_from_histogram(np.zeros(10, int), width))


def test_median_and_percentiles_beyond_32_nats():
    # A model whose typical loss is far above 32 nats: the old histogram stopped there (median 31.99995).
    rng = np.random.default_rng(4)
    losses = np.concatenate([rng.uniform(0, 32, 200), rng.lognormal(6.5, 1.0, 801), [5e6, 5.2e6]])
    dense = losses[losses < 32]
    counts = np.bincount((dense / 1e-4).astype(int), minlength=320_000)
    t = Totals()
    t.count_sparse("far", sparse_key(losses[losses >= 32]))
    got = histogram_percentiles(counts, 1e-4, [50, 2.5, 97.5, 99.95, 100], t.sparse["far"])
    want = np.percentile(losses, [50, 2.5, 97.5, 99.95, 100])
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert got[0] > 100  # not capped at the dense range
    assert sparse_key(np.array([40.0])) < sparse_key(np.array([41.0])) < sparse_key(np.array([5e6]))


def test_totals_are_exact_whatever_the_order_and_grouping():
    rng = np.random.default_rng(1)
    values = rng.lognormal(0, 3, size=(200, 5))
    index = rng.integers(0, 50, size=200)
    reference = Totals()
    for v, i in zip(values, index):
        reference.add("x", v)
        reference.maximum("m", v)
        reference.count_at("c", 50, [i], [v[0]], 32)
        reference.best_at("b", 50, [i], [v[1]], [int(i) * 7])
    for seed in range(3):  # shuffled, split into shards, merged in another order
        order = np.random.default_rng(seed).permutation(200)
        shards = [Totals() for _ in range(3)]
        for k, j in enumerate(order):
            t = shards[k % 3]
            t.add("x", values[j])
            t.maximum("m", values[j])
            t.count_at("c", 50, [index[j]], [values[j][0]], 32)
            t.best_at("b", 50, [index[j]], [values[j][1]], [int(index[j]) * 7])
        merged = Totals()
        for t in shards[::-1]:
            merged.merge(Totals.from_state(t.to_state()))
        assert np.array_equal(merged.sums["x"], reference.sums["x"])
        assert np.array_equal(merged.sums["c"], reference.sums["c"])
        assert np.array_equal(merged.maxima["m"], reference.maxima["m"])
        assert all(np.array_equal(a, b) for a, b in zip(merged.best["b"], reference.best["b"]))
    assert np.allclose(reference.total("x"), values.sum(0), rtol=1e-9)


def test_best_breaks_ties_by_the_smaller_location():
    a, b = Totals(), Totals()
    a.best_at("k", 3, [1], [5.0], [40])
    b.best_at("k", 3, [1, 1], [5.0, 2.0], [12, 3])
    a.merge(b)
    assert a.best["k"][0][1] == 5.0 and a.best["k"][1][1] == 12
    assert a.best["k"][1][0] == -1  # never seen


def test_quantise_is_exact_for_large_values_and_refuses_only_the_impossible():
    values = np.array([5e6, -5e6, 1e8, 1e16, -3.25, 2.0**-20, 1e22])
    q = quantise(values, 20)
    # The grid count of each value, recovered exactly as a Python integer from the two limbs.
    for v, hi, lo in zip(values, q[0], q[1]):
        assert int(hi) * 2**32 + int(lo) == int(np.rint(v * 2**20))
    np.testing.assert_array_equal(limb_float(q, 20), values)
    with pytest.raises(StudyRangeError, match="not finite"):
        quantise(np.array([np.nan]), 32)
    with pytest.raises(StudyRangeError, match="beyond"):
        quantise(np.array([1e30]), 20)


def test_totals_of_exploding_losses_are_exact_in_any_order():
    # The XL LN-free model's Pile outlier: a few tokens at ~5e6 nats among ordinary ones; squares reach 1e16.
    rng = np.random.default_rng(3)
    losses = rng.exponential(3.0, size=300)
    losses[[7, 100, 250]] = [5.1e6, 1e8, 4.9e6]
    exact = sum(int(np.rint(v * 2**20)) for v in losses), sum(int(np.rint(v * v * 2**20)) for v in losses)
    totals = []
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(300)
        shards = [Totals(), Totals()]
        for k, j in enumerate(order):
            shards[k % 2].add("loss", np.array([losses[j]]), 20)
            shards[k % 2].add("loss_sq", np.array([losses[j] ** 2]), 20)
        merged = Totals()
        for t in shards[::-1]:
            merged.merge(Totals.from_state(t.to_state()))
        totals.append(merged)
        for key, want in zip(("loss", "loss_sq"), exact):
            hi, lo = merged.sums[key][:, 0]
            assert int(hi) * 2**32 + int(lo) == want  # the exact integer sum, bit for bit
    assert totals[0].total("loss")[0] == pytest.approx(losses.sum(), rel=1e-12)


def test_bootstrap_weights_depend_on_the_sequence_only():
    assert np.array_equal(poisson_weights(0, 17, 100), poisson_weights(0, 17, 100))
    assert not np.array_equal(poisson_weights(0, 17, 100), poisson_weights(0, 18, 100))
    assert poisson_weights(0, 3, 5000).mean() == pytest.approx(1.0, abs=0.05)


def test_nmae_bootstrap_of_a_constant_ratio_is_that_ratio():
    rng = np.random.default_rng(2)
    ref = rng.uniform(0.1, 1, size=(300, 24))
    reps = head_and_sequence_bootstrap(0.4 * ref, ref, seed=0)
    assert np.allclose(reps, 0.4)
    lo, hi = percentile_ci(head_and_sequence_bootstrap(rng.uniform(0, 1, (300, 24)) * ref, ref, 0))
    assert 0 < lo < hi < 1


def test_nmae_bootstrap_equals_the_papers_with_the_same_generator():
    rng = np.random.default_rng(5)
    de = rng.normal(0, 1, size=(40, 12))  # (samples, heads)
    dla = de + rng.normal(0, 0.5, size=de.shape)
    import papers

    np.random.seed(11)
    nmae, lo, hi = papers.papers_bootstrap(dla.T, de.T, 300)
    reps = papers_nmae_bootstrap(np.abs(dla - de), np.abs(de), 300, seed=11)
    assert percentile_ci(reps) == pytest.approx((lo / 100, hi / 100), rel=1e-9)
    assert np.abs(dla - de).mean() / (np.abs(de).mean() + 1e-10) == pytest.approx(nmae / 100, rel=1e-12)
