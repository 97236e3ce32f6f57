"""Tidy pandas tables of every analysis: what the app shows as tables and offers as CSV.

Each function takes an analysis dataclass (or a :class:`~noln_core.compare.RunResult`)
and returns a long-format ``DataFrame``; nothing is recomputed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..analyses.attention import AttentionSummary
from ..analyses.attribution import DirectLogitAttribution
from ..analyses.direct_effect import HeadDirectEffect
from ..analyses.logit_diff import LogitDiffAnalysis
from ..analyses.next_token import NextTokenAnalysis
from ..analyses.residual_norms import ResidualNorms


def letter(index: int) -> str:
    """The letter of the ``index``-th model of a run: A, B, C..."""
    return chr(65 + index)


def model_labels(names) -> list[str]:
    """``A: name``, ``B: name``...: unique column labels even when two models share a display name."""
    return [f"{letter(i)}: {name}" for i, name in enumerate(names)]


def pair_label(pair) -> str:
    """``A vs C``: a pair of models by their letters (a :class:`~noln_core.analyses.next_token.PairStats`)."""
    return f"{letter(pair.a_index)} vs {letter(pair.b_index)}"


def tokens_frame(result) -> pd.DataFrame:
    """One row per token: position, id, BPE piece, decoded text."""
    return pd.DataFrame({
        "position": np.arange(result.n_tokens), "token_id": result.token_ids,
        "piece": list(result.pieces), "text": list(result.tokens),
    })


def top_predictions_frame(result) -> pd.DataFrame:
    """Top-k next tokens at the analysed position for every model, with each model's probability of every listed
    token."""
    labels = model_labels(r.name for r in result.runs)
    rows = []
    for label, run in zip(labels, result.runs):
        for rank, (tid, text, lp) in enumerate(zip(run.top_ids, run.top_tokens, run.top_logprobs), 1):
            row = {"model": label, "rank": rank, "token_id": int(tid), "token": text, "prob": float(np.exp(lp))}
            for other_label, other in zip(labels, result.runs):
                row[f"p[{other_label}]"] = float(np.exp(other.position_logprobs[int(tid)]))
            rows.append(row)
    return pd.DataFrame(rows)


def per_token_frame(result, analysis: NextTokenAnalysis) -> pd.DataFrame:
    """Per position: each model's loss (predicting the next token) and entropy, and each pair's KL/JS/agreement."""
    n = result.n_tokens
    frame = pd.DataFrame({"position": np.arange(n), "token": list(result.tokens),
                          "next_token": list(result.tokens[1:]) + [None]})
    labels = model_labels(m.name for m in analysis.models)
    for label, stats in zip(labels, analysis.models):
        frame[f"loss[{label}]"] = np.append(stats.loss, np.nan)
        frame[f"entropy[{label}]"] = stats.entropy
    for pair in analysis.pairs:
        a, b = letter(pair.a_index), letter(pair.b_index)
        frame[f"KL({a}||{b})"] = pair.kl_ab
        frame[f"KL({b}||{a})"] = pair.kl_ba
        frame[f"JS({a},{b})"] = pair.js
        frame[f"top1_agree({a},{b})"] = pair.top1_agree
    return frame


def logit_lens_frame(analysis: LogitDiffAnalysis) -> pd.DataFrame:
    rows = [
        {"model": m.name, "ln_free": m.ln_free, "step": i, "label": label, "logit_diff": float(v)}
        for m in analysis.models for i, (label, v) in enumerate(zip(m.lens_labels, m.lens))
    ]
    return pd.DataFrame(rows)


def norms_frame(norms: tuple[ResidualNorms, ...], tokens) -> pd.DataFrame:
    rows = []
    for m in norms:
        for name in ("resid_pre", "resid_mid", "resid_post", "ln1_scale", "ln2_scale"):
            values = getattr(m, name)
            if values is None:
                continue
            for layer in range(values.shape[0]):
                for pos in range(values.shape[1]):
                    rows.append({"model": m.name, "quantity": name, "layer": layer, "position": pos,
                                 "token": tokens[pos], "value": float(values[layer, pos])})
        if m.ln_final_scale is not None:
            rows += [{"model": m.name, "quantity": "ln_final_scale", "layer": None, "position": pos,
                      "token": tokens[pos], "value": float(v)} for pos, v in enumerate(m.ln_final_scale)]
    return pd.DataFrame(rows)


def dla_frame(dlas: tuple[DirectLogitAttribution, ...]) -> pd.DataFrame:
    rows = []
    for d in dlas:
        rows += [{"model": d.name, "component": label, "dla": float(v)} for label, v in zip(d.labels, d.values)]
        rows.append({"model": d.name, "component": "constant (bias)", "dla": d.constant})
        rows.append({"model": d.name, "component": "logit difference", "dla": d.logit_diff})
    return pd.DataFrame(rows)


def heads_frame(dlas: tuple[DirectLogitAttribution, ...], effects: tuple[HeadDirectEffect, ...] | None = None) -> pd.DataFrame:
    rows = []
    for i, d in enumerate(dlas):
        L, H = d.heads.shape
        for layer in range(L):
            for head in range(H):
                row = {"model": d.name, "layer": layer, "head": head, "dla": float(d.heads[layer, head])}
                if effects is not None:
                    row["direct_effect"] = float(effects[i].direct_effect[layer, head])
                rows.append(row)
    return pd.DataFrame(rows)


def head_source_frame(dlas: tuple[DirectLogitAttribution, ...], layer: int, tokens) -> pd.DataFrame:
    rows = []
    for d in dlas:
        for head in range(d.head_source.shape[1]):
            for src, v in enumerate(d.head_source[layer, head]):
                rows.append({"model": d.name, "layer": layer, "head": head, "source": src, "token": tokens[src],
                             "dla": float(v)})
    return pd.DataFrame(rows)


def neurons_frame(dlas: tuple[DirectLogitAttribution, ...], k: int = 20) -> pd.DataFrame:
    rows = [{"model": d.name, "rank": r, "layer": layer, "neuron": n, "dla": v}
            for d in dlas for r, (layer, n, v) in enumerate(d.top_neurons(k), 1)]
    return pd.DataFrame(rows)


def attention_frame(summaries: tuple[AttentionSummary, ...]) -> pd.DataFrame:
    rows = []
    for s in summaries:
        L, H = s.to_first.shape
        rows += [{"model": s.name, "layer": layer, "head": head, "attention_to_first": float(s.to_first[layer, head]),
                  "sink": bool(s.is_sink[layer, head])} for layer in range(L) for head in range(H)]
    return pd.DataFrame(rows)


def pattern_frame(names, patterns, layer: int, head: int, tokens) -> pd.DataFrame:
    """One head's pattern per model (``patterns[i]`` of ``names[i]``, each ``(n, n)``), one row per causal pair."""
    rows = []
    for name, pat in zip(names, patterns):
        rows += [{"model": name, "layer": layer, "head": head, "query": q, "key": k, "query_token": tokens[q],
                  "key_token": tokens[k], "attention": float(pat[q, k])}
                 for q in range(pat.shape[0]) for k in range(q + 1)]
    return pd.DataFrame(rows)
