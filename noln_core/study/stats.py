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

import functools
import math
from dataclasses import dataclass, field

import numpy as np

FINE_BITS = 32
"""Grid of per-sequence values (means of losses, probabilities, rates): exact totals up to about 9e18."""
WIDE_BITS = 20
"""Grid of values that can be large (squares, norms, exploding losses): exact totals up to about 3.8e22."""
LIMB = 32
"""A fixed-point sum is two int64 limbs, ``hi * 2**LIMB + lo`` with ``0 <= lo < 2**LIMB``."""
_LOW = (1 << LIMB) - 1
_LIMIT = 2.0**94
"""Largest grid count one value may have: its ``hi`` limb then stays below ``2**62``."""


class StudyRangeError(ValueError):
    """A value a study cannot sum exactly: not finite, or beyond about 1e18 (1e22 for squares)."""


def quantise(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (float64) rounded onto the ``2**-bits`` grid, as two int64 limbs: ``(2, *values.shape)``.

    The grid count ``q = rint(x * 2**bits)`` is an integer-valued float64 (scaling by a power of two is
    exact), split exactly into ``hi = floor(q / 2**32)`` and ``lo = q - hi * 2**32``: both are made of bits
    of ``q``'s mantissa, so no rounding happens however large ``q`` is.  A loss of 1e8 nats, squared
    (1e16), is an ordinary value (the GPT-2 XL LN-free model reaches 5e6 nats on the Pile).
    """
    x = np.asarray(values, dtype=np.float64)
    q = np.rint(x * 2.0**bits)
    bad = ~np.isfinite(q) | (np.abs(q) >= _LIMIT)
    if bad.any():
        worst = x.ravel()[bad.ravel()][0]
        what = "not finite" if not np.isfinite(worst) else f"beyond the study's exact range (2^{94 - bits})"
        raise StudyRangeError(f"a value of {worst:.4g} is {what}")
    hi = np.floor(q / 2.0**LIMB)
    lo = q - hi * 2.0**LIMB
    return np.stack([hi.astype(np.int64), lo.astype(np.int64)])


def carry(q: np.ndarray) -> np.ndarray:
    """Two limbs with ``lo`` brought back into ``[0, 2**LIMB)`` (the same number; in place, returned)."""
    q[0] += q[1] >> LIMB  # arithmetic shift: floor division, right for negative lo too
    q[1] &= _LOW
    return q


def limb_sum(q: np.ndarray, axis: int = 0) -> np.ndarray:
    """The exact sum over ``axis`` (of the values' axes) of quantised values ``q`` (``(2, ...)``)."""
    return carry(q.sum(axis=axis + 1))


def limb_matmul(weights: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``weights @ values`` exactly, for int64 ``weights`` ``(r, n)`` and quantised values ``q`` ``(2, n, ...)``.

    Each product of a weight (a bootstrap count, at most a few dozen) and a limb fits int64 with room.
    """
    return carry(np.stack([np.tensordot(weights, q[0], 1), np.tensordot(weights, q[1], 1)]))


def limb_float(q: np.ndarray, bits: int) -> np.ndarray:
    """The float64 value of two limbs on the ``2**-bits`` grid (a deterministic function of the exact sum)."""
    return (q[0].astype(np.float64) * 2.0**LIMB + q[1].astype(np.float64)) / 2.0**bits


SPARSE_FROM = 32.0
"""Per-token losses from this value up are counted in relative bins (see :func:`sparse_key`)."""
SPARSE_SHIFT = 36
"""Bits of a float64 dropped by :func:`sparse_key`: 16 mantissa bits stay, a relative bin width of 2**-16."""


def sparse_key(values: np.ndarray) -> np.ndarray:
    """Order-preserving bin keys of positive finite values: the float64 bit pattern without its last 36 bits.

    Positive IEEE doubles sort like their bit patterns, so keys sort like the values; a bin spans a
    relative width of ``2**-16`` (1.5e-5), whatever the magnitude, so a loss of 5e6 nats is counted as
    finely, relative to its size, as one of 40.
    """
    return np.asarray(values, dtype=np.float64).view(np.int64) >> SPARSE_SHIFT


def sparse_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``[lower, upper)`` range of each :func:`sparse_key` bin."""
    keys = np.asarray(keys, dtype=np.int64)
    return (keys << SPARSE_SHIFT).view(np.float64), ((keys + 1) << SPARSE_SHIFT).view(np.float64)


@dataclass
class Totals:
    """Mergeable running totals, keyed by name.

    ``sums`` are exact fixed-point sums (``bits`` per key: two int64 limbs, see :func:`quantise`; ``bits``
    0 is a plain int64 count), ``maxima`` elementwise maxima, ``best`` an elementwise maximum with the
    location where it was reached (ties go to the smaller location, so the winner does not depend on
    order), and ``sparse`` counts keyed by int64 bin keys (unbounded support: losses beyond the dense
    histogram).
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)
    maxima: dict[str, np.ndarray] = field(default_factory=dict)
    best: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Per-sequence values keyed by global sequence index: ``(index (n,), values (n, ...))``."""

    def add(self, key: str, values: np.ndarray, bits: int = FINE_BITS, *, already_quantised: bool = False) -> None:
        """Add float64 ``values`` (or, ``already_quantised``, their limbs ``(2, ...)``) to the total ``key``.

        With ``bits`` 0 the values are integer counts.
        """
        if bits == 0:
            q = np.asarray(values, dtype=np.int64)
        else:
            q = carry(np.array(values, dtype=np.int64)) if already_quantised else quantise(values, bits)
        if key in self.sums:
            if self.bits[key] != bits:
                raise ValueError(f"{key} is kept at {self.bits[key]} bits, not {bits}")
            total = self.sums[key] + q
            self.sums[key] = total if bits == 0 else carry(total)
        else:
            self.sums[key], self.bits[key] = q.copy(), bits

    def count_at(self, key: str, size: int, index: np.ndarray, values: np.ndarray | None = None,
                 bits: int = 0) -> None:
        """Scatter-add ``values`` (ones when None) at ``index`` into a total of length ``size``."""
        index = np.asarray(index, dtype=np.int64)
        if values is None or bits == 0:
            dense = np.zeros(size, dtype=np.int64)
            np.add.at(dense, index, 1 if values is None else np.asarray(values, np.int64))
            self.add(key, dense, 0)
            return
        q = quantise(values, bits)
        dense = np.zeros((2, size), dtype=np.int64)
        np.add.at(dense[0], index, q[0])
        np.add.at(dense[1], index, q[1])
        self.add(key, dense, bits, already_quantised=True)

    def count_sparse(self, key: str, keys: np.ndarray) -> None:
        """Count each int64 bin key (any number of distinct keys; merged exactly)."""
        keys, counts = np.unique(np.asarray(keys, dtype=np.int64), return_counts=True)
        self._merge_sparse(key, (keys, counts.astype(np.int64)))

    def _merge_sparse(self, key: str, new: tuple[np.ndarray, np.ndarray]) -> None:
        if key in self.sparse:
            keys = np.concatenate([self.sparse[key][0], new[0]])
            counts = np.concatenate([self.sparse[key][1], new[1]])
            keys, where = np.unique(keys, return_inverse=True)
            new = (keys, np.bincount(where, counts, minlength=len(keys)).astype(np.int64))
        self.sparse[key] = (np.asarray(new[0], np.int64).copy(), np.asarray(new[1], np.int64).copy())

    def add_rows(self, key: str, index: np.ndarray, values: np.ndarray) -> None:
        """Keep ``values[i]`` for global sequence ``index[i]`` (each sequence once, whatever the sharding)."""
        index, values = np.asarray(index, np.int64), np.asarray(values)
        if key in self.rows:
            index = np.concatenate([self.rows[key][0], index])
            values = np.concatenate([self.rows[key][1], values])
        self.rows[key] = (index, values)

    def sorted_rows(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``key`` in order of sequence index: the same arrays whatever the order they came in."""
        index, values = self.rows[key]
        order = np.argsort(index, kind="stable")
        return index[order], values[order]

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
        for key, pair in other.sparse.items():
            self._merge_sparse(key, pair)
        for key, (index, values) in other.rows.items():
            self.add_rows(key, index, values)

    def total(self, key: str) -> np.ndarray:
        """The float64 value of the sum ``key``."""
        bits = self.bits[key]
        return self.sums[key].astype(np.float64) if bits == 0 else limb_float(self.sums[key], bits)

    def count(self, key: str) -> np.ndarray:
        """The int64 counts of the count total ``key`` (kept at 0 bits)."""
        if self.bits[key] != 0:
            raise ValueError(f"{key} is a fixed-point sum, not a count")
        return self.sums[key]

    def __contains__(self, key: str) -> bool:
        return any(key in d for d in (self.sums, self.maxima, self.best, self.sparse, self.rows))

    def to_state(self) -> dict:
        """Plain arrays for saving or sending (see :meth:`from_state`).

        Mostly-empty arrays (the vocabulary-sized counts of exploding and parting tokens, the loss histogram's
        320,000 bins) are stored as their non-empty entries only, so a state holds what it counted, not what it
        could count: a study of one short sequence saves kilobytes, not megabytes.
        """
        return {"sums": {k: _pack(v, 0) for k, v in self.sums.items()}, "bits": self.bits,
                "maxima": self.maxima,
                "best": {k: {"value": _pack(v, -np.inf), "loc": _pack(loc, -1)} for k, (v, loc) in self.best.items()},
                "sparse": {k: {"keys": keys, "counts": counts} for k, (keys, counts) in self.sparse.items()},
                "rows": {k: {"index": index, "values": values} for k, (index, values) in self.rows.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "Totals":
        return cls({k: _unpack(v, np.int64, 0) for k, v in state["sums"].items()}, dict(state["bits"]),
                   {k: np.asarray(v, np.float64) for k, v in state["maxima"].items()},
                   {k: (_unpack(d["value"], np.float64, -np.inf), _unpack(d["loc"], np.int64, -1))
                    for k, d in state["best"].items()},
                   {k: (np.asarray(d["keys"], np.int64), np.asarray(d["counts"], np.int64))
                    for k, d in state.get("sparse", {}).items()},
                   {k: (np.asarray(d["index"], np.int64), np.asarray(d["values"]))
                    for k, d in state.get("rows", {}).items()})


def _pack(array: np.ndarray, fill) -> np.ndarray | dict:
    """``array``, or its entries other than ``fill`` when those are fewer than a quarter of it."""
    flat = np.asarray(array).ravel()
    where = np.flatnonzero(flat != fill)
    if len(where) * 4 >= flat.size:
        return array
    return {"shape": list(np.shape(array)), "index": where.astype(np.int64), "values": flat[where]}


def _unpack(packed, dtype, fill) -> np.ndarray:
    if not isinstance(packed, dict):
        return np.asarray(packed, dtype)
    out = np.full(int(np.prod(packed["shape"])), fill, dtype=dtype)
    out[np.asarray(packed["index"], np.int64)] = np.asarray(packed["values"], dtype)
    return out.reshape(packed["shape"])


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


@functools.lru_cache(maxsize=256)
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


def histogram_percentiles(counts: np.ndarray, width: float, percentiles, sparse: tuple | None = None) -> np.ndarray:
    """Percentiles (0 to 100, as ``np.percentile``'s linear interpolation) of values counted in bins.

    ``counts[i]`` counts values in ``[i*width, (i+1)*width)``; ``sparse`` (``(keys, counts)`` of
    :func:`sparse_key` bins, all above the dense range) counts the rest.  Each value is taken as its
    bin's middle: exact to half a bin (``width / 2`` below, a relative ``2**-17`` above).
    """
    counts = np.asarray(counts, dtype=np.int64)
    mids = (np.arange(len(counts)) + 0.5) * width
    if sparse is not None and len(sparse[0]):
        lower, upper = sparse_bounds(sparse[0])
        mids = np.concatenate([mids, (lower + upper) / 2])
        counts = np.concatenate([counts, np.asarray(sparse[1], np.int64)])
    total = int(counts.sum())
    out = np.full(len(np.atleast_1d(percentiles)), math.nan)
    if total == 0:
        return out
    cumulative = np.cumsum(counts)
    for i, p in enumerate(np.atleast_1d(percentiles)):
        h = (total - 1) * float(p) / 100
        below = int(math.floor(h))
        above = min(below + 1, total - 1)
        a = mids[int(np.searchsorted(cumulative, below + 1))]  # the value of order statistic `below` (0-based)
        b = mids[int(np.searchsorted(cumulative, above + 1))]
        out[i] = a + (h - below) * (b - a)
    return out


def median_from_histogram(counts: np.ndarray, width: float, sparse: tuple | None = None) -> float:
    """The median (as ``np.median``) of values counted in bins: see :func:`histogram_percentiles`."""
    return float(histogram_percentiles(counts, width, [50.0], sparse)[0])


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


def papers_nmae_bootstrap(err: np.ndarray, ref: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """NMAE replicates exactly as ``run_analysis.py``'s ``get_global_nmae_with_bootstrap_ci`` (lines 382-400).

    ``err`` and ``ref`` are ``(sequences, heads)`` of ``|DLA - DE|`` and ``|DE|``.  Each replicate draws
    ``heads`` head indices, then ``sequences`` sequence indices, with replacement (``np.random.choice``,
    in that order), and takes ``mean(err) / (mean(ref) + 1e-10)``.  The papers draw from NumPy's unseeded
    global generator; here a ``RandomState(seed)``, the same algorithm, so the replicates are reproducible
    (``np.random.seed(seed)`` before their function gives the same draws).
    """
    rng = np.random.RandomState(seed)
    e, r = np.asarray(err).T, np.asarray(ref).T  # (heads, samples), as their DLA_heads
    n_heads, n_samples = e.shape
    out = np.empty(replicates)
    for i in range(replicates):
        heads = rng.choice(n_heads, n_heads, replace=True)
        samples = rng.choice(n_samples, n_samples, replace=True)
        out[i] = e[heads][:, samples].mean() / (r[heads][:, samples].mean() + 1e-10)
    return out


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
