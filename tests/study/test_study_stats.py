"""The study's statistics on synthetic cases with known answers, and exact order-free totals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from noln_core.study.stats import (
    Totals, ece, head_and_sequence_bootstrap, mean_ci, median_from_histogram, percentile_ci, poisson_weights,
    quantise, t_quantile,
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


def test_quantise_refuses_values_out_of_range():
    with pytest.raises(OverflowError):
        quantise(np.array([1e12]), 32)
    with pytest.raises(OverflowError):
        quantise(np.array([np.nan]), 32)


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
