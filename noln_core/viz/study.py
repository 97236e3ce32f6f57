"""Figures and tables of a study (:class:`noln_core.study.StudyResult`): pure builders, nothing computed anew.

They read the result's attributes only (this layer never imports the study
engine, which sits beside it).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .figures import model_label, safe

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939")


def _colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def _names(result) -> list[str]:
    return [model_label(i, m.name) + (" (LN-free)" if m.ln_free else "") for i, m in enumerate(result.models)]


def _err(e) -> tuple[float, float]:
    lo, hi = e.ci95
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 0.0
    return e.mean - lo, hi - e.mean


def ce_intervals(result) -> go.Figure:
    """Mean cross-entropy per model with its 95% interval over sequences, and the per-token median."""
    names = _names(result)
    means = [m.ce.mean for m in result.models]
    errs = [_err(m.ce) for m in result.models]
    fig = go.Figure(go.Scatter(x=means, y=names, mode="markers+text", name="mean, 95% interval",
                               text=[f"{m:.3f}" for m in means], textposition="top center", cliponaxis=False,
                               error_x=dict(type="data", symmetric=False, array=[e[1] for e in errs],
                                            arrayminus=[e[0] for e in errs]),
                               marker=dict(size=11, color=[_colour(i) for i in range(len(names))])))
    fig.add_trace(go.Scatter(x=[m.ce_median for m in result.models], y=names, mode="markers", name="per-token median",
                             marker=dict(symbol="diamond-open", size=10, color="black")))
    # One row per model, each labelled on the axis; the legend below the plot, inside the figure.
    fig.update_layout(title="Cross-entropy (nats), 95% interval over sequences", xaxis_title="nats",
                      height=200 + 70 * len(names), margin=dict(t=60, b=110),
                      yaxis=dict(type="category", categoryorder="array", categoryarray=names, autorange="reversed",
                                 automargin=True),
                      legend=dict(orientation="h", yanchor="top", y=-0.3, xanchor="left", x=0))
    return fig


def loss_by_position(result) -> go.Figure:
    """Mean loss at each position of the sequence, with its 95% band, per model (log position axis)."""
    fig = go.Figure()
    for i, (name, m) in enumerate(zip(_names(result), result.models)):
        x = np.arange(1, len(m.loss_by_position) + 1)
        ci = m.loss_by_position_ci
        if np.isfinite(ci).all():
            fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([ci[:, 1], ci[::-1, 0]]),
                                     fill="toself", line=dict(width=0), fillcolor=_colour(i), opacity=0.2,
                                     showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=m.loss_by_position, name=name, line=dict(color=_colour(i))))
    fig.update_layout(title="Loss by position in the sequence (tokens of context seen)",
                      xaxis=dict(title="tokens seen", type="log"), yaxis_title="mean loss (nats)", height=420)
    return fig


def reliability(result) -> go.Figure:
    """Reliability diagram: accuracy against confidence per bin, one line per model (the diagonal is calibrated)."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                               line=dict(dash="dash", color="grey")))
    for i, (name, m) in enumerate(zip(_names(result), result.models)):
        if m.reliability is None:
            continue
        keep = m.reliability["count"] > 0
        label = f"{name}: ECE {m.ece.mean:.4f}"
        fig.add_trace(go.Scatter(x=m.reliability["confidence"][keep], y=m.reliability["accuracy"][keep],
                                 mode="lines+markers", name=label, line=dict(color=_colour(i)),
                                 customdata=m.reliability["count"][keep],
                                 hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata} tokens"))
    fig.update_layout(title="Calibration of the top-1 prediction", xaxis=dict(title="confidence", range=[0, 1]),
                      yaxis=dict(title="accuracy", range=[0, 1]), height=440)
    return fig


def loss_difference_histogram(result, pair_index: int = 0) -> go.Figure:
    """Per-token loss(B) - loss(A) of one pair (log counts; the outer bins hold the tails)."""
    pair = result.pairs[pair_index]
    edges = result.diff_edges
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(x=centres, y=pair.loss_diff_histogram, width=edges[1] - edges[0], marker_color="#555"))
    fig.update_layout(title=f"Per-token loss({safe(pair.b)}) − loss({safe(pair.a)}): mean {pair.loss_diff.mean:+.4f}",
                      xaxis_title="nats (positive: B is worse)", yaxis=dict(title="tokens", type="log"), height=380)
    return fig


def nmae_intervals(result) -> go.Figure:
    """NMAE of per-head DLA against the direct effect, per model, with its 95% bootstrap interval."""
    rows = [(n, m) for n, m in zip(_names(result), result.models) if m.nmae is not None]
    fig = go.Figure(go.Bar(x=[n for n, _ in rows], y=[100 * m.nmae.mean for _, m in rows],
                           error_y=dict(type="data", symmetric=False, array=[100 * _err(m.nmae)[1] for _, m in rows],
                                        arrayminus=[100 * _err(m.nmae)[0] for _, m in rows]),
                           marker_color=[_colour(i) for i in range(len(rows))],
                           text=[f"{100 * m.nmae.mean:.2f}%" for _, m in rows], textposition="outside"))
    fig.update_layout(title=f"DLA against the true direct effect: NMAE ({result.settings.nmae_target} target)",
                      yaxis_title="NMAE (%)", height=400)
    return fig


def first_token_norms(result) -> go.Figure:
    """The first token's centred residual norm at each hook, as the papers plot it: mean ± one standard deviation
    over sequences (line and band), with the maximum (dotted)."""
    fig = go.Figure()
    for i, (name, m) in enumerate(zip(_names(result), result.models)):
        if m.first_token_norm is None:
            continue
        norm = m.first_token_norm
        x = list(norm["labels"])
        mean, std = np.asarray(norm["mean"]), np.nan_to_num(np.asarray(norm["std"]))
        fig.add_trace(go.Scatter(x=x + x[::-1], y=np.concatenate([mean + std, (mean - std)[::-1]]), fill="toself",
                                 line=dict(width=0), fillcolor=_colour(i), opacity=0.2, showlegend=False,
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=mean, name=f"{name} mean ± sd", line=dict(color=_colour(i))))
        fig.add_trace(go.Scatter(x=x, y=norm["max"], name=f"{name} max", line=dict(color=_colour(i), dash="dot")))
    fig.update_layout(title="Residual norm of the first token (centred stream), mean ± sd over sequences",
                      yaxis=dict(title="L2 norm"), xaxis=dict(title="hook", tickangle=-60), height=460)
    return fig


def summary_frame(result) -> pd.DataFrame:
    """One row per model: every headline number with its interval."""
    rows = []
    for m in result.models:
        def est(e, scale=1.0):
            return (None, None, None) if e is None else (e.mean * scale, e.ci95[0] * scale, e.ci95[1] * scale)
        ce, ent, ece, nmae = est(m.ce), est(m.entropy), est(m.ece), est(m.nmae, 100)
        sinks = m.sink_rate or {}
        rows.append({
            "model": m.name, "LN-free": m.ln_free, "sequences": m.n_sequences, "tokens": m.n_tokens,
            "CE": ce[0], "CE lo": ce[1], "CE hi": ce[2], "CE median (per token)": m.ce_median,
            "entropy": ent[0], "ECE": ece[0], "ECE lo": ece[1], "ECE hi": ece[2],
            "NMAE %": nmae[0], "NMAE lo": nmae[1], "NMAE hi": nmae[2],
            "sink rate (papers)": sinks["papers"].mean if "papers" in sinks else None,
            "sink rate (Gu 2024)": sinks["gu2024"].mean if "gu2024" in sinks else None,
            "first-token norm, largest mean": float(np.max(m.first_token_norm["mean"])) if m.first_token_norm else None,
            "first-token norm max": float(np.max(m.first_token_norm["max"])) if m.first_token_norm else None,
            "exploding positions": m.exploding_positions,
        })
    return pd.DataFrame(rows)


def exploding_frame(result) -> pd.DataFrame:
    """Exploding tokens of every model: token, count, loss, norm and the context of the worst occurrence."""
    rows = [{"model": m.name, "token": repr(e.token), "token id": e.token_id, "count": e.count,
             "mean loss": e.mean_loss, "max loss": e.max_loss, "max norm": e.max_norm, "context": e.context}
            for m in result.models for e in m.exploding]
    return pd.DataFrame(rows, columns=["model", "token", "token id", "count", "mean loss", "max loss", "max norm",
                                       "context"])


def pairs_frame(result) -> pd.DataFrame:
    """One row per pair: KL both ways, JS, top-1 agreement and the mean loss difference, with intervals."""
    rows = []
    for p in result.pairs:
        row = {"A": p.a, "B": p.b}
        for label, e in (("KL(A‖B)", p.kl_ab), ("KL(B‖A)", p.kl_ba), ("JS", p.js), ("top-1 agreement", p.top1_agreement),
                         ("loss(B) − loss(A)", p.loss_diff)):
            row[label], row[label + " lo"], row[label + " hi"] = e.mean, e.ci95[0], e.ci95[1]
        rows.append(row)
    return pd.DataFrame(rows)


def parting_frame(result, pair_index: int = 0) -> pd.DataFrame:
    """The tokens where one pair's losses part most, with the context of the worst occurrence."""
    p = result.pairs[pair_index]
    return pd.DataFrame([{"token": repr(t.token), "token id": t.token_id, "count": t.count, "mean loss(B) − loss(A)":
                          t.mean_diff, "total |difference|": t.total_abs_diff, "worst |difference|": t.worst_diff,
                          "context": t.context} for t in p.parting],
                        columns=["token", "token id", "count", "mean loss(B) − loss(A)", "total |difference|",
                                 "worst |difference|", "context"])
