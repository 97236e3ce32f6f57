"""The statistics of a study: exact mergeable sums, intervals, calibration, medians, bootstraps.

A study reduces as it goes and may be split over processes, interrupted and
resumed, so every running total here is *exact and order-independent*: each
sequence's float64 value is rounded once onto a fixed grid (``2**-bits``) and
the grid counts are summed as 64-bit integers.  Integer addition is
associative, so one process, two processes or a resumed run give bit-identical
totals, whatever the order of the sequences.  The grid (``2**-32`` by
default, about 2.3e-10) is far below any digit a study reports.

Intervals are over sequences, never over tokens: the tokens of one sequence
are correlated, the sequences are (nearly) independent draws from the corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FINE_BITS = 32
"""Grid of bounded per-sequence values (means of losses, probabilities, rates): totals up to about 1e9."""
WIDE_BITS = 20
"""Grid of values that can be large (squares, norms, exploding losses): totals up to about 4e12."""
_LIMIT = 2.0**62


def quantise(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (float64) rounded onto the ``2**-bits`` grid, as int64 grid counts."""
    scaled = np.asarray(values, dtype=np.float64) * 2.0**bits
    if not np.all(np.isfinite(scaled)) or np.any(np.abs(scaled) >= _LIMIT):
        bad = np.asarray(values, np.float64).ravel()[~(np.isfinite(scaled.ravel()) & (np.abs(scaled.ravel()) < _LIMIT))]
        raise OverflowError(f"a value out of the study's range ({bad[0]:.3g})")
    return np.rint(scaled).astype(np.int64)


@dataclass
class Totals:
    """Mergeable running totals, keyed by name.

    ``sums`` are exact fixed-point sums (int64 grid counts, ``bits`` per key;
    ``bits`` 0 is a plain count), ``maxima`` elementwise maxima, and ``best``
    an elementwise maximum with the location where it was reached (ties go to
    the smaller location, so the winner does not depend on order).
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)
    maxima: dict[str, np.ndarray] = field(default_factory=dict)
    best: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add(self, key: str, values: np.ndarray, bits: int = FINE_BITS, *, already_quantised: bool = False) -> None:
        """Add float64 ``values`` (or int64 grid counts) to the total ``key``."""
        q = np.asarray(values, dtype=np.int64) if already_quantised or bits == 0 else quantise(values, bits)
        if key in self.sums:
            if self.bits[key] != bits:
                raise ValueError(f"{key} is kept at {self.bits[key]} bits, not {bits}")
            self.sums[key] = self.sums[key] + q
        else:
            self.sums[key], self.bits[key] = q.copy(), bits

    def count_at(self, key: str, size: int, index: np.ndarray, values: np.ndarray | None = None,
                 bits: int = 0) -> None:
        """Scatter-add ``values`` (ones when None) at ``index`` into a total of length ``size``."""
        q = np.ones(len(index), dtype=np.int64) if values is None else (
            np.asarray(values, np.int64) if bits == 0 else quantise(values, bits))
        dense = np.zeros(size, dtype=np.int64)
        np.add.at(dense, np.asarray(index, dtype=np.int64), q)
        self.add(key, dense, bits, already_quantised=True)

    def maximum(self, key: str, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        self.maxima[key] = np.maximum(self.maxima[key], v) if key in self.maxima else v.copy()

    def best_at(self, key: str, size: int, index: np.ndarray, values: np.ndarray, where: np.ndarray) -> None:
        """For each ``index`` (< ``size``), keep the largest value and its location ``where``."""
        index, values, where = (np.asarray(index, np.int64), np.asarray(values, np.float64),
                                np.asarray(where, np.int64))
        dense = (np.full(size, -np.inf), np.full(size, -1, dtype=np.int64))
        if len(index):
            order = np.lexsort((where, -values, index))  # per index: largest value, then smallest location
            first = np.ones(len(order), dtype=bool)
            first[1:] = index[order][1:] != index[order][:-1]
            pick = order[first]
            dense[0][index[pick]], dense[1][index[pick]] = values[pick], where[pick]
        self._merge_best(key, dense)

    def _merge_best(self, key: str, new: tuple[np.ndarray, np.ndarray]) -> None:
        if key not in self.best:
            self.best[key] = (new[0].copy(), new[1].copy())
            return
        value, loc = self.best[key]
        take = (new[0] > value) | ((new[0] == value) & (new[1] >= 0) & ((loc < 0) | (new[1] < loc)))
        self.best[key] = (np.where(take, new[0], value), np.where(take, new[1], loc))

    def merge(self, other: "Totals") -> None:
        """Fold ``other``'s totals into these (exact: the result does not depend on the order of merges)."""
        for key, q in other.sums.items():
            self.add(key, q, other.bits[key], already_quantised=True)
        for key, v in other.maxima.items():
            self.maximum(key, v)
        for key, pair in other.best.items():
            self._merge_best(key, pair)

    def total(self, key: str) -> np.ndarray:
        """The float64 value of the sum ``key``."""
        return self.sums[key].astype(np.float64) / 2.0 ** self.bits[key]

    def __contains__(self, key: str) -> bool:
        return key in self.sums or key in self.maxima or key in self.best

    def to_state(self) -> dict:
        """Plain arrays for saving (see :meth:`from_state`)."""
        return {"sums": self.sums, "bits": self.bits, "maxima": self.maxima,
                "best": {k: {"value": v, "loc": loc} for k, (v, loc) in self.best.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "Totals":
        return cls({k: np.asarray(v, np.int64) for k, v in state["sums"].items()}, dict(state["bits"]),
                   {k: np.asarray(v, np.float64) for k, v in state["maxima"].items()},
                   {k: (np.asarray(d["value"], np.float64), np.asarray(d["loc"], np.int64))
                    for k, d in state["best"].items()})


# Student's t quantile, for intervals over few sequences (no SciPy needed).

def _t_cdf(t: float, df: int) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom (Simpson's rule on the density, t >= 0)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 2000
    xs = np.linspace(0.0, t, n + 1)
    dens = np.exp(log_c - (df + 1) / 2 * np.log1p(xs**2 / df))
    h = t / n
    integral = h / 3 * (dens[0] + dens[-1] + 4 * dens[1:-1:2].sum() + 2 * dens[2:-1:2].sum())
    return 0.5 + integral


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, to about 1e-9."""
    if df < 1:
        return math.nan
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(n: int, total: float, total_sq: float, level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Mean and the ``level`` t-interval of ``n`` per-sequence values from their sum and sum of squares.

    With one sequence the interval is ``(nan, nan)``: one draw says nothing of the spread.
    """
    if n == 0:
        return math.nan, (math.nan, math.nan)
    mean = total / n
    if n < 2:
        return mean, (math.nan, math.nan)
    var = max(total_sq - n * mean * mean, 0.0) / (n - 1)
    half = t_quantile(0.5 + level / 2, n - 1) * math.sqrt(var / n)
    return mean, (mean - half, mean + half)


def ece(counts: np.ndarray, conf_sums: np.ndarray, acc_sums: np.ndarray) -> float:
    """Expected calibration error from per-bin counts and sums of confidence and accuracy (last axis = bins).

    ``ECE = sum_b (n_b / n) |mean conf_b - mean acc_b| = sum_b |conf_b - acc_b| / n`` with sums per bin,
    as the papers' ``calculate_ece_with_ci`` computes it from equal-width bins of the top-1 probability.
    """
    counts = np.asarray(counts, np.float64)
    n = counts.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(np.asarray(conf_sums) - np.asarray(acc_sums)).sum(-1) / n


def median_from_histogram(counts: np.ndarray, width: float) -> float:
    """The median of values counted in bins ``[i*width, (i+1)*width)``, each value taken as its bin's middle.

    As ``np.median``: the middle value, or the mean of the two middle values of an even count.
    """
    total = int(counts.sum())
    if total == 0:
        return math.nan
    cumulative = np.cumsum(counts)
    lower = int(np.searchsorted(cumulative, (total + 1) // 2))
    upper = int(np.searchsorted(cumulative, total // 2 + 1))
    return ((lower + upper) / 2 + 0.5) * width


def poisson_weights(seed: int, sequence: int, replicates: int) -> np.ndarray:
    """Bootstrap weights of one sequence: ``replicates`` Poisson(1) draws seeded by the sequence's index.

    The Poisson bootstrap resamples a stream without holding it: each replicate
    counts each sequence ``Poisson(1)`` times.  Seeding by the sequence's global
    index makes the weights independent of order, sharding and resumption.
    """
    return np.random.default_rng([seed, sequence]).poisson(1.0, replicates).astype(np.int64)


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN replicates dropped)."""
    r = np.asarray(replicates, np.float64)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(r, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def head_and_sequence_bootstrap(err: np.ndarray, ref: np.ndarray, seed: int) -> np.ndarray:
    """NMAE replicates that resample heads and sequences, as the papers' ``get_global_nmae_with_bootstrap_ci``.

    ``err`` and ``ref`` are ``(replicates, heads)``: per head, the Poisson-weighted
    sums over sequences of ``|DLA - DE|`` and ``|DE|``.  Each replicate then
    draws heads with replacement (multinomial counts) and takes the ratio of sums.
    """
    b, h = err.shape
    counts = np.random.default_rng([seed, 2**31]).multinomial(h, np.full(h, 1.0 / h), size=b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts * err).sum(-1) / (counts * ref).sum(-1)
