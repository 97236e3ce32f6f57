"""Figures of the papers' other findings (entropy neurons, attribution patching), as pure builders: each takes the
dataclasses of :mod:`noln_core.findings` and returns a Plotly figure, computing nothing new."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..findings.neurons import NeuronAblation, NeuronSignature, ablation_summary
from ..findings.patching import Patching
from .figures import (
    DIVERGING, MODEL_COLOURS, TICKS_PX, TITLE_GAP_PX, grid_axes, hover_tokens, position_axis, symmetric,
    model_label,
)

PART_COLOURS = {"direct": "#0072B2", "through the final LN": "#E69F00"}


def signature_scatter(signatures: Sequence[NeuronSignature], shown: Sequence[Sequence[int]] | None = None) -> go.Figure:
    """The papers' scatter (``svd_comparison.py``, ``all_models_neurons.png``): each last-layer neuron's ``||w_out||``
    against ``LogitVar`` (log scale), one panel per model, the marked (or ``shown``) neurons in orange."""
    fig = make_subplots(rows=1, cols=len(signatures), horizontal_spacing=0.08,
                        subplot_titles=[model_label(i, s.name) for i, s in enumerate(signatures)])
    for i, s in enumerate(signatures):
        marked = list(shown[i]) if shown is not None else list(s.marked)
        neurons = np.arange(s.w_out_norm.shape[0])
        fig.add_trace(go.Scattergl(
            x=s.w_out_norm, y=s.logit_var, mode="markers", name="neurons", showlegend=i == 0,
            marker=dict(color="#999999", size=4, opacity=0.5), customdata=np.stack([neurons, s.null_share], -1),
            hovertemplate="neuron %{customdata[0]}<br>‖w_out‖ %{x:.3f}<br>LogitVar %{y:.2e}"
                          "<br>null-space share %{customdata[1]:.1%}<extra></extra>"), row=1, col=i + 1)
        fig.add_trace(go.Scatter(
            x=s.w_out_norm[marked], y=s.logit_var[marked], mode="markers+text", text=[str(n) for n in marked],
            textposition="top center", name="marked neurons", showlegend=i == 0,
            marker=dict(color="#D55E00", size=9), customdata=np.stack([marked, s.null_share[marked]], -1),
            hovertemplate="neuron %{customdata[0]}<br>‖w_out‖ %{x:.3f}<br>LogitVar %{y:.2e}"
                          "<br>null-space share %{customdata[1]:.1%}<extra></extra>"), row=1, col=i + 1)
        fig.update_xaxes(title_text="‖w_out‖", row=1, col=i + 1)
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="LogitVar(w_out)", row=1, col=1)
    fig.update_layout(title="Last-layer neurons: output norm against the spread of their direct logit effect",
                      height=440, legend=dict(orientation="h", y=-0.22))
    return fig


def ablation_parts(ablations: Sequence[NeuronAblation], tokens: Sequence[str], row: int = -1,
                   quantity: str = "loss") -> go.Figure:
    """Per position, the change of the loss (or entropy) when ablating row ``row`` (default: all the neurons), as
    stacked bars of its direct part and its part through the final LN's scale, one panel per model."""
    gap = TICKS_PX + TITLE_GAP_PX
    plot_px = 200 * len(ablations) + gap * (len(ablations) - 1)
    fig = make_subplots(rows=len(ablations), cols=1, vertical_spacing=gap / plot_px if len(ablations) > 1 else 0.0,
                        subplot_titles=[f"{model_label(i, a.name)}: ablating {a.labels[row]}"
                                        for i, a in enumerate(ablations)])
    shown = tokens[1:] if quantity == "loss" else tokens  # the loss at position i is of token i + 1
    hover = hover_tokens(shown)
    for i, a in enumerate(ablations):
        direct = getattr(a, f"{quantity}_direct")[row]
        via = getattr(a, f"{quantity}_via_ln")[row]
        for part, values in (("direct", direct), ("through the final LN", via)):
            fig.add_trace(go.Bar(x=np.arange(len(values)), y=values, name=part, showlegend=i == 0,
                                 marker_color=PART_COLOURS[part], customdata=hover, legendgroup=part,
                                 hovertemplate=f"pos %{{x}} %{{customdata}}<br>{part} %{{y:+.2e}}<extra></extra>"),
                          row=i + 1, col=1)
        position_axis(fig, shown, row=i + 1, col=1)
        fig.update_yaxes(title_text=f"Δ {quantity}", row=i + 1, col=1)
    fig.update_layout(barmode="relative", height=plot_px + 90 + TICKS_PX, margin=dict(t=90, b=TICKS_PX),
                      title=f"Mean ablation: Δ {quantity} per position, direct and through the final LayerNorm's scale",
                      legend=dict(orientation="h", y=1.06, x=0))
    return fig


def patching_heatmaps(results: Sequence[Patching], tokens: Sequence[str]) -> go.Figure:
    """The papers' figure for one prompt pair: normalised activation patching (top) and attribution patching
    (bottom) over layer x position of ``resid_pre`` and the final stream, a column per model, one scale."""
    maps = [(r.normalised(r.resid_act), r.normalised(r.resid_attr)) for r in results]
    bound = symmetric(*[m for pair in maps for m in pair])
    cols = len(results)
    gap = TICKS_PX + TITLE_GAP_PX
    rows_px = 2 * 240 + gap
    fig = make_subplots(rows=2, cols=cols, horizontal_spacing=0.06, vertical_spacing=gap / rows_px,
                        subplot_titles=[f"activation · {model_label(i, r.name)}" for i, r in enumerate(results)]
                        + [f"attribution · {model_label(i, r.name)}" for i, r in enumerate(results)])
    hover = hover_tokens(tokens)
    for i, (r, (act, attr)) in enumerate(zip(results, maps)):
        for row, grid in ((1, act), (2, attr)):
            fig.add_trace(go.Heatmap(
                z=grid, x=np.arange(grid.shape[1]), y=list(r.resid_labels), zmin=-bound, zmax=bound, zmid=0,
                colorscale=DIVERGING, showscale=i == 0 and row == 1, colorbar=dict(title="normalised<br>logit diff"),
                customdata=np.array([hover] * grid.shape[0]),
                hovertemplate="%{y} at pos %{x} %{customdata}<br>%{z:+.3f}<extra></extra>"), row=row, col=i + 1)
            position_axis(fig, tokens, row=row, col=i + 1)
            fig.update_yaxes(autorange="reversed", showticklabels=i == 0, row=row, col=i + 1)
    fig.update_layout(height=rows_px + 90 + TICKS_PX, margin=dict(t=90, b=TICKS_PX),
                      title="Patching resid_pre: activation (top) against attribution (bottom), ÷ (clean − corrupted)")
    return fig


def patching_scatter(results: Sequence[Patching]) -> go.Figure:
    """Every cell's attribution against its activation patching (normalised), per model; the diagonal is exact."""
    fig = go.Figure()
    values = [np.concatenate([r.normalised(r.resid_act).ravel(), r.normalised(r.resid_attr).ravel()]) for r in results]
    lim = symmetric(*values) * 1.05
    fig.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="attribution = activation",
                             line=dict(color="grey", dash="dot")))
    for i, r in enumerate(results):
        labels = [f"{lab} pos {p}" for lab in r.resid_labels for p in range(r.resid_act.shape[1])]
        fig.add_trace(go.Scatter(
            x=r.normalised(r.resid_act).ravel(), y=r.normalised(r.resid_attr).ravel(), mode="markers", text=labels,
            name=f"{model_label(i, r.name)}: NMAE {r.resid_agreement.nmae:.1%}",
            marker=dict(color=MODEL_COLOURS[i % 4], size=6),
            hovertemplate="%{text}<br>activation %{x:+.3f}<br>attribution %{y:+.3f}<extra></extra>"))
    fig.update_layout(title="Attribution against activation patching, every layer × position",
                      xaxis_title="activation patching (normalised)", yaxis_title="attribution patching (normalised)",
                      height=460, legend=dict(orientation="h", y=-0.25))
    return fig


def head_patching_heatmaps(results: Sequence[Patching]) -> go.Figure:
    """Per head (``z`` at every position): activation (top) and attribution (bottom) patching, normalised."""
    grids = [(r.normalised(r.z_act), r.normalised(r.z_attr)) for r in results]
    bound = symmetric(*[g for pair in grids for g in pair])
    fig = make_subplots(rows=2, cols=len(results), horizontal_spacing=0.06, vertical_spacing=0.16,
                        subplot_titles=[f"activation · {model_label(i, r.name)}" for i, r in enumerate(results)]
                        + [f"attribution · {model_label(i, r.name)}" for i, r in enumerate(results)])
    for i, (act, attr) in enumerate(grids):
        for row, g in ((1, act), (2, attr)):
            fig.add_trace(go.Heatmap(z=g, zmin=-bound, zmax=bound, zmid=0, colorscale=DIVERGING,
                                     showscale=i == 0 and row == 1, colorbar=dict(title="normalised"),
                                     hovertemplate="L%{y} H%{x}<br>%{z:+.3f}<extra></extra>"), row=row, col=i + 1)
    grid_axes(fig, *grids[0][0].shape)
    fig.update_yaxes(title_text="layer", row=2, col=1)
    fig.update_layout(title="Patching each head's output (z at every position)", height=620)
    return fig


def signature_frame(signatures: Sequence[NeuronSignature], shown: Sequence[Sequence[int]]) -> pd.DataFrame:
    """The shown neurons of each model: norm, LogitVar, rank by the papers' ratio, share in W_U's null space."""
    rows = []
    for i, (s, neurons) in enumerate(zip(signatures, shown)):
        rank = {int(n): r + 1 for r, n in enumerate(s.ranking)}
        for n in neurons:
            rows.append({"model": f"{chr(65 + i)}: {s.name}", "neuron": int(n), "‖w_out‖": float(s.w_out_norm[n]),
                         "LogitVar": float(s.logit_var[n]), "rank by ‖w_out‖/LogitVar": rank[int(n)],
                         f"share in the bottom {s.null_k} singular directions of W_U": float(s.null_share[n])})
    return pd.DataFrame(rows)


def ablation_frame(ablations: Sequence[NeuronAblation]) -> pd.DataFrame:
    """The papers' summary per model and ablation: |Δloss| and |Δentropy| median [quartiles], means, and the share
    of the loss effect that goes through the final LN's scale."""
    rows = []
    for i, a in enumerate(ablations):
        for s in ablation_summary(a):
            rows.append({"model": f"{chr(65 + i)}: {a.name}", "ablated": s.label,
                         "|Δloss| median": s.loss_median, "|Δloss| Q1": s.loss_quartiles[0],
                         "|Δloss| Q3": s.loss_quartiles[1], "|Δloss| mean": s.loss_mean,
                         "|Δentropy| median": s.entropy_median, "|Δentropy| mean": s.entropy_mean,
                         "share through the final LN": s.via_ln_share})
    return pd.DataFrame(rows)


def patching_frame(results: Sequence[Patching], tokens: Sequence[str]) -> pd.DataFrame:
    """Every cell of every model's maps, long format: activation and attribution patching, raw and normalised."""
    rows = []
    for i, r in enumerate(results):
        for layer, label in enumerate(r.resid_labels):
            for pos in range(r.resid_act.shape[1]):
                act, attr = float(r.resid_act[layer, pos]), float(r.resid_attr[layer, pos])
                rows.append({"model": f"{chr(65 + i)}: {r.name}", "site": label, "position": pos,
                             "token": tokens[pos], "activation": act, "attribution": attr,
                             "activation (normalised)": float(r.normalised(np.float64(act))),
                             "attribution (normalised)": float(r.normalised(np.float64(attr)))})
    return pd.DataFrame(rows)
