"""A study's results: documented dataclasses built from the exact totals, and the JSON document.

Every interval is a 95% interval over sequences: a t-interval for means, and
a bootstrap (Poisson weights per sequence, seeded by the sequence's index) for
the calibration error and the NMAE, whose bootstrap also resamples heads as the
papers' ``get_global_nmae_with_bootstrap_ci`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .measure import (
    DIFF_EDGES, LOSS_BIN, NMAE_EPSILON, SINK_THRESHOLD, VALUE_BIAS, Settings, model_pairs, norm_labels,
)
from .stats import (
    Totals, ece, head_and_sequence_bootstrap, histogram_percentiles, mean_ci, papers_nmae_bootstrap,
    percentile_ci,
)

Interval = tuple[float, float]

NMAE_DEFINITIONS = {
    "last-token": "papers (run_analysis.py): logit of each sequence's last token at the last position, "
                  "centred unembedding, b_U included; value biases b_V counted in b_O, not in the heads "
                  "(TransformerLens' fold_value_biases)",
    "logit-diff": "this app: logit of the true next token minus the model's top other token, at the position "
                  "that predicts the sequence's last token; value biases b_V counted in each head",
}
VALUE_BIAS_DEFINITIONS = {
    "b_O": "each head's b_V . W_O (with ln_1's bias folded into b_V) belongs to the layer's bias b_O, as "
           "TransformerLens' default fold_value_biases=True leaves it; stack_head_results excludes it",
    "head": "each head's output z . W_O includes its value bias b_V (attention sums to 1)",
}
SINK_DEFINITIONS = {
    "papers": "Baroni et al. 2025 (utils.calculate_sink_rate): share of (layer, head, query) with attention on "
              f"position 0 > {SINK_THRESHOLD}, query 0 included",
    "gu2024": "Gu et al. 2024 (sail-sg/Attention-Sink, compute_attention_sink): share of heads whose mean "
              f"attention on position 0 over all queries 0..T-1 (query 0 included) is > {SINK_THRESHOLD}",
}
NORM_DEFINITION = ("L2 norm at position 0 of the centred residual stream (TransformerLens' center_writing_weights, "
                   "as the papers load their models), at hook_embed, hook_pos_embed, each block's resid_mid and "
                   "resid_post, and ln_final.hook_normalized (residual_norms.py): mean, standard deviation "
                   "(unbiased) and maximum over sequences")
CE_PERCENTILES = (0.05, 2.5, 50.0, 97.5, 99.95)
"""Per-token loss percentiles reported (the papers' footnotes give the 95% and 99.9% ranges and the median)."""


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
    """Per-token median loss (to within ``LOSS_BIN / 2`` below 32 nats, a relative 2**-17 above), as the papers'."""
    ce_percentiles: dict[float, float]
    """Per-token loss percentiles (``CE_PERCENTILES``), as ``np.percentile`` of ``pile_eval.py``."""
    loss_by_position: np.ndarray
    """(seq_len - 1,) mean loss at each predicted position."""
    loss_by_position_ci: np.ndarray
    """(seq_len - 1, 2) its 95% interval."""
    loss_histogram: np.ndarray
    """(bins,) per-token loss counts in bins of ``LOSS_BIN`` nats over [0, 32)."""
    losses_beyond: int
    """Per-token losses of 32 nats or more (counted in relative bins; in the median and percentiles)."""
    entropy: Estimate | None
    """Mean entropy of the next-token distribution (nats); None when not measured."""
    ece: Estimate | None
    """Expected calibration error (top-1, equal-width bins); None when not measured."""
    reliability: dict[str, np.ndarray] | None
    """``confidence``, ``accuracy``, ``count`` per bin (``(bins,)``): the reliability diagram."""
    nmae: Estimate | None
    """NMAE of per-head DLA against the direct effect: mean over heads x sequences of |DLA - DE| over
    (mean |DE| + 1e-10), as ``run_analysis.py``."""
    nmae_per_head: np.ndarray | None
    """(L, H) per-head NMAE: mean |DLA - DE| over (mean |DE| + 1e-10), per head."""
    nmae_bootstrap: str | None
    """``papers`` (their resampling of heads and sequences, exactly) or ``poisson`` (for studies too large to
    keep every sequence's values, ``ROWS_CAP``)."""
    dla_per_head: np.ndarray | None
    """(L, H) mean DLA per head."""
    direct_effect_per_head: np.ndarray | None
    """(L, H) mean direct effect per head."""
    first_token_norm: dict[str, np.ndarray] | None
    """``labels`` (``norm_labels``: embed, pos_embed, L0 mid, L0 post, ..., ln_final) and ``mean``, ``std``,
    ``max`` over sequences of position 0's centred residual norm there, each ``(2L + 3,)`` (``NORM_DEFINITION``)."""
    sink_rate: dict[str, Estimate] | None
    """``papers`` and ``gu2024`` (see ``SINK_DEFINITIONS``)."""
    sink_heads: np.ndarray | None
    """(L, H) mean attention on position 0 over all queries (Gu et al.'s importance score of the first token)."""
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
    corpus_spec: dict = field(default_factory=dict)
    """Where the text came from and how it was sampled: ``kind``, ``source``, ``config``, ``split``, ``field``,
    ``sampling`` (the :class:`~noln_core.corpus.Sampling`'s fields)."""
    max_tokens: int | None = None
    """The budget the study was given (None: the whole corpus)."""
    skipped_rows: int = 0
    """Rows too short for a sequence, left out (``first-tokens`` sampling)."""


def _estimate(t: Totals, key: str, n: int, rate: bool = False) -> Estimate:
    """The mean of a per-sequence value and its t-interval; a rate's interval is clipped to [0, 1]."""
    mean, ci = mean_ci(n, float(t.total(key)[0]), float(t.total(key + "_sq")[0]))
    if rate and all(math.isfinite(c) for c in ci):
        ci = (max(ci[0], 0.0), min(ci[1], 1.0))
    return Estimate(mean, ci)


def build_result(totals: Totals, models, settings: Settings, *, seq_len: int, bos: bool, processes: int,
                 corpus: str, complete: bool, context: Callable[[int], str], top: int = 20,
                 corpus_spec: dict | None = None, max_tokens: int | None = None, skipped_rows: int = 0) -> StudyResult:
    """Turn the exact totals into the documented numbers (rank 0 only, after the totals are merged).

    ``context(where)`` is the text up to a location (``sequence * seq_len + position``), the token there last.
    """
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
        far = totals.sparse.get(k + "loss_hist_far")
        percentiles = histogram_percentiles(hist, LOSS_BIN, CE_PERCENTILES, far)
        ece_est = reliability = None
        if k + "ece_count" in totals:
            counts = totals.count(k + "ece_count")
            conf, acc = totals.total(k + "ece_conf"), totals.total(k + "ece_acc")
            boot = (ece(totals.count(k + "ece_count_boot"), totals.total(k + "ece_conf_boot"),
                        totals.total(k + "ece_acc_boot")) if k + "ece_count_boot" in totals else np.array([]))
            ece_est = Estimate(float(ece(counts, conf, acc)), percentile_ci(boot))
            with np.errstate(invalid="ignore", divide="ignore"):
                reliability = {"confidence": conf / counts, "accuracy": acc / counts, "count": counts.copy()}
        nmae = per_head = dla = de = boot_kind = None
        if k + "nmae_err" in totals and n:
            err, ref = totals.total(k + "nmae_err") / n, totals.total(k + "nmae_ref") / n  # per head, over sequences
            value = float(err.mean() / (ref.mean() + NMAE_EPSILON))  # run_analysis.py, lines 228-230
            ci = (math.nan, math.nan)
            if k + "nmae_rows" in totals:
                _, rows = totals.sorted_rows(k + "nmae_rows")
                ci = percentile_ci(papers_nmae_bootstrap(rows[:, 0], rows[:, 1], settings.bootstrap, settings.seed))
                boot_kind = "papers"
            elif k + "nmae_err_boot" in totals:
                ci = percentile_ci(head_and_sequence_bootstrap(totals.total(k + "nmae_err_boot"),
                                                               totals.total(k + "nmae_ref_boot"), settings.seed))
                boot_kind = "poisson"
            nmae = Estimate(value, ci)
            per_head = (err / (ref + NMAE_EPSILON)).reshape(L, H)  # lines 213-218
            dla = (totals.total(k + "nmae_dla") / n).reshape(L, H)
            de = (totals.total(k + "nmae_de") / n).reshape(L, H)
        norms = None
        if k + "norm0" in totals and n:
            mean = totals.total(k + "norm0") / n
            var = ((totals.total(k + "norm0_sq") - n * mean**2) / (n - 1)).clip(0) if n > 1 else np.full_like(mean,
                                                                                                              np.nan)
            norms = {"labels": norm_labels(L), "mean": mean, "std": np.sqrt(var),
                     "max": totals.maxima[k + "norm0_max"].copy()}
        sinks = sink_heads = None
        if k + "sink_papers" in totals:
            sinks = {"papers": _estimate(totals, k + "sink_papers", n, True),
                     "gu2024": _estimate(totals, k + "sink_gu", n, True)}
            sink_heads = (totals.total(k + "sink_head_mean") / max(n, 1)).reshape(L, H)
        exploding: list[ExplodingToken] = []
        if k + "explode_count" in totals:
            counts = totals.count(k + "explode_count")
            loss_sum = totals.total(k + "explode_loss")
            worst, where = totals.best[k + "explode_worst"]
            norm_max = totals.best[k + "explode_norm"][0]
            for tok in np.argsort(-counts, kind="stable")[:top]:
                if counts[tok] == 0:
                    break
                exploding.append(ExplodingToken(int(tok), decode([int(tok)]), int(counts[tok]),
                                                float(loss_sum[tok] / counts[tok]), float(worst[tok]),
                                                float(norm_max[tok]), context(where[tok])))
        info = model.info
        out.append(ModelStudy(
            name=info.name, source=info.source, revision=info.revision, ln_free=info.ln_free, n_sequences=n,
            n_tokens=n * P,
            ce=_estimate(totals, k + "loss", n) if n else Estimate(math.nan, (math.nan, math.nan)),
            ce_median=float(percentiles[CE_PERCENTILES.index(50.0)]),
            ce_percentiles=dict(zip(CE_PERCENTILES, percentiles.tolist())),
            loss_by_position=pos_mean, loss_by_position_ci=pos_ci, loss_histogram=hist,
            losses_beyond=int(far[1].sum()) if far is not None else 0,
            entropy=_estimate(totals, k + "entropy", n) if n and k + "entropy" in totals else None,
            ece=ece_est, reliability=reliability, nmae=nmae, nmae_per_head=per_head, nmae_bootstrap=boot_kind,
            dla_per_head=dla, direct_effect_per_head=de, first_token_norm=norms, sink_rate=sinks,
            sink_heads=sink_heads, exploding=tuple(exploding),
            exploding_positions=int(totals.sums[k + "explode_total"][0]) if k + "explode_total" in totals else 0))
    pairs = []
    for (i, j) in model_pairs(len(models), settings.pairs) if settings.wants("pairs") else []:
        k = f"p{i}_{j}."
        if k + "n" not in totals:
            continue
        n = int(totals.sums[k + "n"][0])
        counts = totals.count(k + "tok_count")
        abs_sum, signed = totals.total(k + "tok_abs"), totals.total(k + "tok_sum")
        worst, where = totals.best[k + "tok_worst"]
        parting = []
        for tok in np.argsort(-abs_sum, kind="stable")[:top]:
            if counts[tok] == 0 or abs_sum[tok] == 0:
                break
            parting.append(PartingToken(int(tok), decode([int(tok)]), int(counts[tok]), float(signed[tok] / counts[tok]),
                                        float(abs_sum[tok]), float(worst[tok]), context(where[tok])))
        pairs.append(PairStudy(
            models[i].info.name, models[j].info.name, _estimate(totals, k + "kl_ab", n),
            _estimate(totals, k + "kl_ba", n), _estimate(totals, k + "js", n), _estimate(totals, k + "agree", n, True),
            _estimate(totals, k + "dloss", n), totals.count(k + "dloss_hist").copy(), tuple(parting)))
    return StudyResult(seq_len, bos, processes, corpus, n_total, complete, settings, tuple(out), tuple(pairs),
                       corpus_spec=dict(corpus_spec or {}), max_tokens=max_tokens, skipped_rows=skipped_rows)


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
            "ce": {**_est(m.ce), "median": json_safe(m.ce_median),
                   "percentiles": {f"{p:g}": json_safe(v) for p, v in m.ce_percentiles.items()},
                   "tokens_beyond_32_nats": m.losses_beyond},
            "entropy": _est(m.entropy),
            "ece": None if m.ece is None else {
                "value": json_safe(m.ece.mean), "ci95": json_safe(list(m.ece.ci95)),
                "bins": {k: json_safe(v) for k, v in (m.reliability or {}).items()}},
            "nmae": None if m.nmae is None else {
                **_est(m.nmae), "definition": s.nmae_target, "value_bias": VALUE_BIAS[s.nmae_target],
                "bootstrap": m.nmae_bootstrap, "per_head": json_safe(m.nmae_per_head)},
            "first_token_norm": None if m.first_token_norm is None else {
                k: (list(v) if k == "labels" else json_safe(v)) for k, v in m.first_token_norm.items()},
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
        "corpus_spec": json_safe(result.corpus_spec), "max_tokens": result.max_tokens,
        "skipped_rows": result.skipped_rows, "n_sequences": result.n_sequences, "complete": result.complete,
        "settings": {"metrics": list(s.metrics), "nmae_target": s.nmae_target,
                     "nmae_definition": NMAE_DEFINITIONS[s.nmae_target],
                     "value_bias": {"counted_in": VALUE_BIAS[s.nmae_target],
                                    "definition": VALUE_BIAS_DEFINITIONS[VALUE_BIAS[s.nmae_target]]},
                     "sink_definitions": SINK_DEFINITIONS, "first_token_norm_definition": NORM_DEFINITION,
                     "ece_bins": s.ece_bins, "explode_loss": s.explode_loss, "explode_norm": s.explode_norm,
                     "bootstrap": s.bootstrap, "seed": s.seed, "pairs": s.pairs},
        "models": models, "pairs": pairs,
    }
