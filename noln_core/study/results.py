"""A study's results: documented dataclasses built from the exact totals, and the JSON document.

Every interval is a 95% interval over sequences: a t-interval for means, and
a bootstrap (Poisson weights per sequence, seeded by the sequence's index) for
the calibration error and the NMAE, whose bootstrap also resamples heads as the
papers' ``get_global_nmae_with_bootstrap_ci`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .measure import DIFF_EDGES, LOSS_BIN, SINK_THRESHOLD, Settings, model_pairs
from .stats import Totals, ece, head_and_sequence_bootstrap, mean_ci, median_from_histogram, percentile_ci

Interval = tuple[float, float]

NMAE_DEFINITIONS = {
    "last-token": "papers (run_analysis.py): logit of each sequence's last token at the last position, "
                  "centred unembedding, b_U included",
    "logit-diff": "this app: logit of the true next token minus the model's top other token, at the position "
                  "that predicts the sequence's last token",
}
SINK_DEFINITIONS = {
    "papers": "Baroni et al. 2025 (utils.calculate_sink_rate): share of (layer, head, query) with attention on "
              f"position 0 > {SINK_THRESHOLD}, query 0 included",
    "gu2024": "Gu et al. 2024: share of heads whose mean attention on position 0 over queries 1..T-1 is "
              f">= {SINK_THRESHOLD}",
}


@dataclass(frozen=True)
class Estimate:
    """A number with its 95% interval (``(nan, nan)`` when one sequence cannot give one)."""

    mean: float
    ci95: Interval


@dataclass(frozen=True)
class ExplodingToken:
    """A token whose positions exploded (loss over the threshold, or a last-layer norm far above its sequence's)."""

    token_id: int
    token: str
    count: int
    """Exploding positions holding this token (as input)."""
    mean_loss: float
    """Mean loss at those positions (nats)."""
    max_loss: float
    max_norm: float
    """Largest last-layer residual norm at those positions."""
    context: str
    """The text up to the worst occurrence, the token itself last."""


@dataclass(frozen=True)
class ModelStudy:
    """One model's numbers over the study's sequences."""

    name: str
    source: str
    revision: str | None
    ln_free: bool
    n_sequences: int
    n_tokens: int
    """Predicted tokens (``seq_len - 1`` per sequence)."""
    ce: Estimate
    """Mean next-token cross-entropy (nats), interval over sequences."""
    ce_median: float
    """Per-token median loss (to within ``LOSS_BIN / 2``), as the papers' medians."""
    loss_by_position: np.ndarray
    """(seq_len - 1,) mean loss at each predicted position."""
    loss_by_position_ci: np.ndarray
    """(seq_len - 1, 2) its 95% interval."""
    loss_histogram: np.ndarray
    """(bins,) per-token loss counts in bins of ``LOSS_BIN`` nats (the last bin takes the rest)."""
    entropy: Estimate | None
    """Mean entropy of the next-token distribution (nats); None when not measured."""
    ece: Estimate | None
    """Expected calibration error (top-1, equal-width bins); None when not measured."""
    reliability: dict[str, np.ndarray] | None
    """``confidence``, ``accuracy``, ``count`` per bin (``(bins,)``): the reliability diagram."""
    nmae: Estimate | None
    """NMAE of per-head DLA against the direct effect: mean over heads x sequences of |DLA - DE| / mean |DE|."""
    nmae_per_head: np.ndarray | None
    """(L, H) per-head NMAE."""
    dla_per_head: np.ndarray | None
    """(L, H) mean DLA per head."""
    direct_effect_per_head: np.ndarray | None
    """(L, H) mean direct effect per head."""
    first_token_norm: dict[str, np.ndarray] | None
    """``mean`` and ``max`` over sequences of position 0's residual norm, ``(L + 1,)``: embedding, then each block."""
    sink_rate: dict[str, Estimate] | None
    """``papers`` and ``gu2024`` (see ``SINK_DEFINITIONS``)."""
    sink_heads: np.ndarray | None
    """(L, H) mean attention on position 0 over queries 1..T-1."""
    exploding: tuple[ExplodingToken, ...]
    exploding_positions: int
    """Every exploding position (the tokens above are the most frequent)."""


@dataclass(frozen=True)
class PartingToken:
    """A target token where two models' losses part ways."""

    token_id: int
    token: str
    count: int
    mean_diff: float
    """Mean of loss(B) - loss(A) at positions predicting this token."""
    total_abs_diff: float
    """Sum of |loss(B) - loss(A)| over them: its share of the gap."""
    worst_diff: float
    context: str
    """The text up to the worst occurrence, the token itself last."""


@dataclass(frozen=True)
class PairStudy:
    """Two models compared token by token on the same sequences."""

    a: str
    b: str
    kl_ab: Estimate
    """Mean KL(A||B) over predicted tokens (nats)."""
    kl_ba: Estimate
    js: Estimate
    top1_agreement: Estimate
    loss_diff: Estimate
    """Mean loss(B) - loss(A)."""
    loss_diff_histogram: np.ndarray
    """(len(DIFF_EDGES) - 1,) per-token counts of loss(B) - loss(A) (outer bins take the tails)."""
    parting: tuple[PartingToken, ...]


@dataclass(frozen=True)
class StudyResult:
    """Everything a study measured: per model, per pair, and how."""

    seq_len: int
    bos: bool
    processes: int
    corpus: str
    n_sequences: int
    complete: bool
    """False for a study stopped before its end (the numbers cover what was done)."""
    settings: Settings
    models: tuple[ModelStudy, ...]
    pairs: tuple[PairStudy, ...]
    diff_edges: np.ndarray = field(default_factory=lambda: DIFF_EDGES.copy())
    loss_bin: float = LOSS_BIN


def _estimate(t: Totals, key: str, n: int, rate: bool = False) -> Estimate:
    """The mean of a per-sequence value and its t-interval; a rate's interval is clipped to [0, 1]."""
    mean, ci = mean_ci(n, float(t.total(key)[0]), float(t.total(key + "_sq")[0]))
    if rate and all(math.isfinite(c) for c in ci):
        ci = (max(ci[0], 0.0), min(ci[1], 1.0))
    return Estimate(mean, ci)


def _context(decode, tokens: np.ndarray, seq_len: int, where: int, width: int = 12) -> str:
    s, p = divmod(int(where), seq_len)
    return decode(tokens[s, max(0, p - width):p + 1].tolist())


def build_result(totals: Totals, models, settings: Settings, *, seq_len: int, bos: bool, processes: int,
                 corpus: str, tokens: np.ndarray, complete: bool, top: int = 20) -> StudyResult:
    """Turn the exact totals into the documented numbers (rank 0 only, after the totals are merged)."""
    decode = models[0].tokenizer.decode
    P = seq_len - 1
    out = []
    n_total = 0
    for m, model in enumerate(models):
        k = f"m{m}."
        n = int(totals.sums[k + "n"][0]) if k + "n" in totals.sums else 0
        n_total = max(n_total, n)
        L, H = model.info.n_layers, model.info.n_heads
        if n:
            pos_mean = totals.total(k + "loss_pos") / n
            pos_sq = totals.total(k + "loss_pos_sq")
            pos_ci = np.array([mean_ci(n, pos_mean[i] * n, pos_sq[i])[1] for i in range(P)])
        else:
            pos_mean, pos_ci = np.full(P, math.nan), np.full((P, 2), math.nan)
        hist = totals.sums.get(k + "loss_hist", np.zeros(1, np.int64))
        ece_est = reliability = None
        if k + "ece_count" in totals:
            counts = totals.sums[k + "ece_count"]
            conf, acc = totals.total(k + "ece_conf"), totals.total(k + "ece_acc")
            boot = (ece(totals.sums[k + "ece_count_boot"], totals.total(k + "ece_conf_boot"),
                        totals.total(k + "ece_acc_boot")) if k + "ece_count_boot" in totals else np.array([]))
            ece_est = Estimate(float(ece(counts, conf, acc)), percentile_ci(boot))
            with np.errstate(invalid="ignore", divide="ignore"):
                reliability = {"confidence": conf / counts, "accuracy": acc / counts, "count": counts.copy()}
        nmae = per_head = dla = de = None
        if k + "nmae_err" in totals:
            err, ref = totals.total(k + "nmae_err"), totals.total(k + "nmae_ref")
            value = float(err.sum() / ref.sum()) if ref.sum() > 0 else 0.0
            ci = (percentile_ci(head_and_sequence_bootstrap(totals.total(k + "nmae_err_boot"),
                                                            totals.total(k + "nmae_ref_boot"), settings.seed))
                  if k + "nmae_err_boot" in totals else (math.nan, math.nan))
            nmae = Estimate(value, ci)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_head = np.where(ref > 0, err / np.where(ref > 0, ref, 1), 0.0).reshape(L, H)
            dla = (totals.total(k + "nmae_dla") / max(n, 1)).reshape(L, H)
            de = (totals.total(k + "nmae_de") / max(n, 1)).reshape(L, H)
        norms = None
        if k + "norm0" in totals:
            norms = {"mean": totals.total(k + "norm0") / max(n, 1), "max": totals.maxima[k + "norm0_max"].copy()}
        sinks = sink_heads = None
        if k + "sink_papers" in totals:
            sinks = {"papers": _estimate(totals, k + "sink_papers", n, True),
                     "gu2024": _estimate(totals, k + "sink_gu", n, True)}
            sink_heads = (totals.total(k + "sink_head_mean") / max(n, 1)).reshape(L, H)
        exploding: list[ExplodingToken] = []
        if k + "explode_count" in totals:
            counts = totals.sums[k + "explode_count"]
            loss_sum = totals.total(k + "explode_loss")
            worst, where = totals.best[k + "explode_worst"]
            norm_max = totals.best[k + "explode_norm"][0]
            for tok in np.argsort(-counts, kind="stable")[:top]:
                if counts[tok] == 0:
                    break
                exploding.append(ExplodingToken(int(tok), decode([int(tok)]), int(counts[tok]),
                                                float(loss_sum[tok] / counts[tok]), float(worst[tok]),
                                                float(norm_max[tok]), _context(decode, tokens, seq_len, where[tok])))
        info = model.info
        out.append(ModelStudy(
            info.name, info.source, info.revision, info.ln_free, n, n * P,
            _estimate(totals, k + "loss", n) if n else Estimate(math.nan, (math.nan, math.nan)),
            median_from_histogram(hist, LOSS_BIN), pos_mean, pos_ci, hist,
            _estimate(totals, k + "entropy", n) if n and k + "entropy" in totals else None,
            ece_est, reliability, nmae, per_head, dla, de, norms, sinks, sink_heads, tuple(exploding),
            int(totals.sums[k + "explode_total"][0]) if k + "explode_total" in totals else 0))
    pairs = []
    for (i, j) in model_pairs(len(models), settings.pairs) if settings.wants("pairs") else []:
        k = f"p{i}_{j}."
        if k + "n" not in totals:
            continue
        n = int(totals.sums[k + "n"][0])
        counts = totals.sums[k + "tok_count"]
        abs_sum, signed = totals.total(k + "tok_abs"), totals.total(k + "tok_sum")
        worst, where = totals.best[k + "tok_worst"]
        parting = []
        for tok in np.argsort(-abs_sum, kind="stable")[:top]:
            if counts[tok] == 0 or abs_sum[tok] == 0:
                break
            parting.append(PartingToken(int(tok), decode([int(tok)]), int(counts[tok]), float(signed[tok] / counts[tok]),
                                        float(abs_sum[tok]), float(worst[tok]),
                                        _context(decode, tokens, seq_len, where[tok])))
        pairs.append(PairStudy(
            models[i].info.name, models[j].info.name, _estimate(totals, k + "kl_ab", n),
            _estimate(totals, k + "kl_ba", n), _estimate(totals, k + "js", n), _estimate(totals, k + "agree", n, True),
            _estimate(totals, k + "dloss", n), totals.sums[k + "dloss_hist"].copy(), tuple(parting)))
    return StudyResult(seq_len, bos, processes, corpus, n_total, complete, settings, tuple(out), tuple(pairs))


def json_safe(x: Any) -> Any:
    """A value ready for ``json.dumps``: arrays to lists, NumPy scalars to Python ones, NaN and infinities to None."""
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _est(e: Estimate | None) -> dict | None:
    return None if e is None else {"mean": json_safe(e.mean), "ci95": json_safe(list(e.ci95))}


def position_buckets(n: int, first: int = 16) -> list[tuple[int, int]]:
    """Positions ``0..first-1`` one by one, then doubling ranges ``[first, 2 first)``, ... up to ``n``."""
    out = [(p, p + 1) for p in range(min(first, n))]
    start = min(first, n)
    width = max(first, 1)
    while start < n:
        out.append((start, min(n, start + width)))
        start += width
        width *= 2
    return out


def to_json(result: StudyResult, positions: int = 16) -> dict[str, Any]:
    """The study's JSON document (every key is documented in the README's "Study" section).

    ``loss_by_position`` lists ``positions`` single positions (with intervals), then doubling ranges.
    """
    s = result.settings
    models = []
    for m in result.models:
        models.append({
            "name": m.name, "source": m.source, "revision": m.revision, "ln_free": m.ln_free,
            "n_sequences": m.n_sequences, "n_tokens": m.n_tokens,
            "ce": {**_est(m.ce), "median": json_safe(m.ce_median)},
            "entropy": _est(m.entropy),
            "ece": None if m.ece is None else {
                "value": json_safe(m.ece.mean), "ci95": json_safe(list(m.ece.ci95)),
                "bins": {k: json_safe(v) for k, v in (m.reliability or {}).items()}},
            "nmae": None if m.nmae is None else {
                **_est(m.nmae), "definition": s.nmae_target, "per_head": json_safe(m.nmae_per_head)},
            "first_token_norm": None if m.first_token_norm is None else {
                k: json_safe(v) for k, v in m.first_token_norm.items()},
            "sink_rate": None if m.sink_rate is None else {k: _est(v) for k, v in m.sink_rate.items()},
            "loss_by_position": [
                {"start": a, "end": b, "mean": json_safe(float(np.mean(m.loss_by_position[a:b]))),
                 "ci95": json_safe(list(m.loss_by_position_ci[a])) if b == a + 1 else None}
                for a, b in position_buckets(len(m.loss_by_position), positions)],
            "exploding": [{"token_id": e.token_id, "token": e.token, "count": e.count, "mean_loss": json_safe(e.mean_loss),
                           "max_loss": json_safe(e.max_loss), "max_norm": json_safe(e.max_norm), "context": e.context}
                          for e in m.exploding],
            "exploding_positions": m.exploding_positions,
        })
    pairs = [{
        "a": p.a, "b": p.b, "kl_ab": _est(p.kl_ab), "kl_ba": _est(p.kl_ba), "js": _est(p.js),
        "top1_agreement": _est(p.top1_agreement), "loss_diff": _est(p.loss_diff),
        "loss_diff_histogram": {"edges": json_safe(result.diff_edges), "counts": json_safe(p.loss_diff_histogram)},
        "parting": [{"token_id": t.token_id, "token": t.token, "count": t.count, "mean_diff": json_safe(t.mean_diff),
                     "total_abs_diff": json_safe(t.total_abs_diff), "worst_diff": json_safe(t.worst_diff),
                     "context": t.context} for t in p.parting],
    } for p in result.pairs]
    return {
        "processes": result.processes, "seq_len": result.seq_len, "bos": result.bos, "corpus": result.corpus,
        "n_sequences": result.n_sequences, "complete": result.complete,
        "settings": {"metrics": list(s.metrics), "nmae_target": s.nmae_target,
                     "nmae_definition": NMAE_DEFINITIONS[s.nmae_target], "sink_definitions": SINK_DEFINITIONS,
                     "ece_bins": s.ece_bins, "explode_loss": s.explode_loss, "explode_norm": s.explode_norm,
                     "bootstrap": s.bootstrap, "seed": s.seed, "pairs": s.pairs},
        "models": models, "pairs": pairs,
    }
