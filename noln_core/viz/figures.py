"""Plotly figure builders: each takes analysis dataclasses and returns a figure, computing nothing new.

Token labels are HTML-escaped (Plotly renders a subset of HTML in labels, and
tokens are user text) and whitespace is made visible.  Positions are numeric
axes with token tick labels, since repeated tokens would merge on a
categorical axis.  Signed quantities use one symmetric diverging scale
(``RdBu``, ColorBrewer's colour-blind-safe diverging map), magnitudes use
``Viridis``.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..analyses.attention import AttentionSummary
from ..analyses.attribution import DirectLogitAttribution
from ..analyses.direct_effect import HeadDirectEffect
from ..analyses.logit_diff import LogitDiffAnalysis
from ..analyses.next_token import NextTokenAnalysis
from ..analyses.residual_norms import ResidualNorms

DIVERGING = "RdBu"
SEQUENTIAL = "Viridis"
MODEL_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7")  # Okabe-Ito: colour-blind safe
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\x0c": "␌", "\r": "␍"}


def token_label(token: str, max_len: int = 16) -> str:
    """A token as a safe, visible tick label: whitespace shown, control characters escaped, HTML escaped."""
    shown = "".join(_VISIBLE.get(ch, ch if ch.isprintable() else f"\\x{ord(ch):02x}") for ch in token)
    if len(shown) > max_len:
        shown = shown[: max_len - 1] + "…"
    return html.escape(shown or "∅", quote=False)


def safe(text: str) -> str:
    """Escape user text for Plotly titles, legends and hover text.

    ``<``, ``>`` and ``&`` only: Plotly's label markup has no attributes to break out of once no tag can open, and
    it shows ``&quot;`` literally, so quotes stay as typed."""
    return html.escape(text, quote=False)


def model_label(index: int, name: str) -> str:
    """``A: name`` (escaped): the letter matches the tables' columns, and tells apart models with one name."""
    return f"{chr(65 + index)}: {safe(name)}"


ROW_PX = 90
"""Height of one strip of the loss figure."""
TITLE_GAP_PX = 48
"""Room above a panel for its title."""
TICKS_PX = 130
"""Room under a token axis for its labels, turned -60° (16 characters at most)."""


def position_axis(fig: go.Figure, tokens: Sequence[str], row=None, col=None, offset: int = 0) -> None:
    n = len(tokens)
    step = max(1, math.ceil(n / 60))
    ticks = list(range(0, n, step))
    fig.update_xaxes(tickmode="array", tickvals=[t + offset for t in ticks],
                     ticktext=[token_label(tokens[t]) for t in ticks], tickangle=-60, row=row, col=col)


def grid_axes(fig: go.Figure, n_layers: int, n_heads: int) -> None:
    """Integer ticks on layer × head grids, thinned for the large models."""
    fig.update_xaxes(title_text="head", dtick=max(1, math.ceil(n_heads / 25)))
    fig.update_yaxes(dtick=max(1, math.ceil(n_layers / 25)), autorange="reversed")
    fig.update_yaxes(title_text="layer", row=1, col=1)  # once, at the left: a later panel's would sit on its neighbour


def symmetric(*arrays: np.ndarray) -> float:
    finite = [np.abs(a[np.isfinite(a)]).max() for a in arrays if a is not None and np.isfinite(a).any()]
    return float(max(finite)) if finite and max(finite) > 0 else 1.0


def _log_ticks(lo: float, hi: float) -> np.ndarray:
    """1-2-5 ticks spanning ``10**lo .. 10**hi``."""
    values = [m * 10.0**k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)]
    inside = np.array([v for v in values if lo - 1e-9 <= math.log10(v) <= hi + 1e-9])
    return inside if inside.size >= 2 else np.array([10**lo, 10**hi])


def hover_tokens(tokens: Sequence[str]) -> list[str]:
    return [safe(repr(t)) for t in tokens]


def loss_strip(analysis: NextTokenAnalysis, tokens: Sequence[str]) -> go.Figure:
    """Per-token loss of each model (shared scale) and the difference between the first two (diverging)."""
    models = analysis.models
    rows = len(models) + (1 if analysis.pairs else 0)
    plot_px = ROW_PX * rows + TITLE_GAP_PX * (rows - 1)  # a fixed gap in pixels holds each panel's title
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=TITLE_GAP_PX / plot_px,
                        subplot_titles=[model_label(i, m.name) for i, m in enumerate(models)] + (["B − A"] if analysis.pairs else []))
    next_tokens = hover_tokens(tokens[1:])
    zmax = max(float(np.nanmax(m.loss)) if m.loss.size else 1.0 for m in models)
    for i, m in enumerate(models):
        fig.add_trace(go.Heatmap(z=[m.loss], x=np.arange(len(m.loss)), zmin=0, zmax=zmax, colorscale=SEQUENTIAL,
                                 customdata=[next_tokens], colorbar=dict(title="loss", y=0.75, len=0.5),
                                 showscale=i == 0, hovertemplate="pos %{x} → %{customdata}<br>loss %{z:.3f}<extra></extra>"),
                      row=i + 1, col=1)
    if analysis.pairs:
        diff = analysis.pairs[0].loss_diff
        bound = symmetric(diff)
        fig.add_trace(go.Heatmap(z=[diff], x=np.arange(len(diff)), zmin=-bound, zmax=bound, zmid=0,
                                 colorscale=DIVERGING, customdata=[next_tokens],
                                 colorbar=dict(title="B − A", y=0.2, len=0.4),
                                 hovertemplate="pos %{x} → %{customdata}<br>Δloss %{z:+.3f}<extra></extra>"),
                      row=rows, col=1)
    fig.update_yaxes(showticklabels=False)
    position_axis(fig, tokens[1:], row=rows, col=1)
    fig.update_layout(height=plot_px + 90 + TICKS_PX, title="Per-token loss (predicting the next token)",
                      margin=dict(t=90, b=TICKS_PX))
    return fig


def divergence_chart(analysis: NextTokenAnalysis, tokens: Sequence[str]) -> go.Figure:
    """KL both ways and JS divergence per position for each pair of models."""
    fig = go.Figure()
    x = np.arange(len(tokens))
    for pair in analysis.pairs:
        a, b = chr(65 + pair.a_index), chr(65 + pair.b_index)
        fig.add_trace(go.Scatter(x=x, y=pair.kl_ab, name=f"KL({a}‖{b})", mode="lines+markers"))
        fig.add_trace(go.Scatter(x=x, y=pair.kl_ba, name=f"KL({b}‖{a})", mode="lines+markers"))
        fig.add_trace(go.Scatter(x=x, y=pair.js, name=f"JS({a}, {b})", mode="lines+markers"))
    position_axis(fig, tokens)
    fig.update_layout(title="Divergence of next-token distributions per position", yaxis_title="nats",
                      legend=dict(orientation="h", y=-0.45), height=420)
    return fig


def logit_lens_chart(analysis: LogitDiffAnalysis) -> go.Figure:
    """The logit difference read off the residual stream after each sublayer, all models on one chart."""
    fig = go.Figure()
    for i, m in enumerate(analysis.models):
        fig.add_trace(go.Scatter(x=list(m.lens_labels), y=m.lens, mode="lines+markers",
                                 name=f"{model_label(i, m.name)} ({'LN-free' if m.ln_free else 'LN'})",
                                 line=dict(color=MODEL_COLOURS[i % 4])))
    fig.add_hline(y=0, line=dict(color="grey", dash="dot"))
    fig.update_layout(title=f"Logit lens of logit[{safe(repr(analysis.answer))}] − logit[{safe(repr(analysis.counterfactual))}]",
                      xaxis_title="residual stream after", yaxis_title="logit difference", height=420,
                      legend=dict(orientation="h", y=-0.3))
    return fig


def norm_heatmaps(norms: Sequence[ResidualNorms], tokens: Sequence[str], include_bos: bool = True) -> go.Figure:
    """resid_pre (+ final resid_post) norms, layer × position, each model on one shared log colour scale."""
    start = 0 if include_bos else 1
    grids = [m.hidden[:, start:] for m in norms]
    logs = [np.log10(np.maximum(g, 1e-12)) for g in grids]
    lo = min(float(g.min()) for g in logs)
    hi = max(float(g.max()) for g in logs)
    fig = make_subplots(rows=1, cols=len(norms), subplot_titles=[model_label(i, m.name) for i, m in enumerate(norms)], horizontal_spacing=0.06)
    ticks = _log_ticks(lo, hi)
    L = grids[0].shape[0] - 1
    layers = [f"L{i} pre" for i in range(L)] + ["final"]
    for i, (g, lg) in enumerate(zip(grids, logs)):
        fig.add_trace(go.Heatmap(z=lg, x=np.arange(start, start + g.shape[1]), y=layers, zmin=lo, zmax=hi,
                                 colorscale=SEQUENTIAL, customdata=g, showscale=i == 0,
                                 colorbar=dict(title="‖resid‖", tickvals=np.log10(ticks), ticktext=[f"{t:g}" for t in ticks]),
                                 hovertemplate="%{y}, pos %{x}<br>norm %{customdata:.4g}<extra></extra>"),
                      row=1, col=i + 1)
        position_axis(fig, tokens[start:], row=1, col=i + 1, offset=start)
        fig.update_yaxes(showticklabels=i == 0, row=1, col=i + 1)  # the same layers: labelled once, at the left
    fig.update_layout(title="Residual-stream norm (log colour scale shared by all models)", height=460)
    return fig


def norm_ratio_heatmap(norms: Sequence[ResidualNorms], tokens: Sequence[str], include_bos: bool = True) -> go.Figure:
    """log2 of model B's norm over model A's, layer × position (diverging: red = B smaller)."""
    start = 0 if include_bos else 1
    a, b = norms[0].hidden[:, start:], norms[1].hidden[:, start:]
    ratio = np.log2(np.maximum(b, 1e-12) / np.maximum(a, 1e-12))
    bound = symmetric(ratio)
    L = a.shape[0] - 1
    fig = go.Figure(go.Heatmap(z=ratio, x=np.arange(start, start + a.shape[1]), y=[f"L{i} pre" for i in range(L)] + ["final"],
                               zmin=-bound, zmax=bound, zmid=0, colorscale=DIVERGING, customdata=b / np.maximum(a, 1e-12),
                               colorbar=dict(title="log₂ B/A"),
                               hovertemplate="%{y}, pos %{x}<br>B/A = %{customdata:.3g}<extra></extra>"))
    position_axis(fig, tokens[start:], offset=start)
    fig.update_layout(title=f"Norm ratio B / A ({model_label(1, norms[1].name)} over {model_label(0, norms[0].name)})", height=420)
    return fig


def ln_scale_heatmap(norm: ResidualNorms, tokens: Sequence[str], include_bos: bool = True) -> go.Figure:
    """What each LayerNorm of a model with LN divides by (ln_1, ln_2 per layer, then ln_f)."""
    if norm.ln1_scale is None:
        raise ValueError(f"{norm.name} is LN-free: it has no LayerNorm scales")
    start = 0 if include_bos else 1
    L = norm.ln1_scale.shape[0]
    rows, labels = [], []
    for layer in range(L):
        rows += [norm.ln1_scale[layer, start:], norm.ln2_scale[layer, start:]]
        labels += [f"L{layer} ln1", f"L{layer} ln2"]
    rows.append(norm.ln_final_scale[start:])
    labels.append("ln_final")
    z = np.log10(np.stack(rows))
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(start, start + z.shape[1]), y=labels, colorscale=SEQUENTIAL,
                               customdata=np.stack(rows), colorbar=dict(title="log₁₀ scale"),
                               hovertemplate="%{y}, pos %{x}<br>divides by %{customdata:.4g}<extra></extra>"))
    position_axis(fig, tokens[start:], offset=start)
    fig.update_layout(title=f"LayerNorm scales of {safe(norm.name)}", height=max(360, 14 * len(labels) + 150))
    return fig


def dla_components_chart(dlas: Sequence[DirectLogitAttribution]) -> go.Figure:
    """DLA per component, models side by side, with the constant term as its own bar."""
    fig = go.Figure()
    for i, d in enumerate(dlas):
        fig.add_trace(go.Bar(x=list(d.labels) + ["constant"], y=list(d.values) + [d.constant],
                             name=f"{model_label(i, d.name)} ({'exact' if d.exact else 'cached LN scale'})",
                             marker_color=MODEL_COLOURS[i % 4]))
    fig.update_layout(barmode="group", title="Direct logit attribution per component", yaxis_title="contribution",
                      legend=dict(orientation="h", y=-0.35), height=440)
    return fig


def head_heatmaps(dlas: Sequence[DirectLogitAttribution]) -> go.Figure:
    """Layer × head DLA for each model, and B − A, on one symmetric diverging scale."""
    grids = [d.heads for d in dlas]
    titles = [model_label(i, d.name) for i, d in enumerate(dlas)]
    if len(dlas) >= 2:
        grids.append(dlas[1].heads - dlas[0].heads)
        titles.append("B − A")
    bound = symmetric(*grids)
    fig = make_subplots(rows=1, cols=len(grids), subplot_titles=titles, horizontal_spacing=0.05)
    for i, g in enumerate(grids):
        fig.add_trace(go.Heatmap(z=g, zmin=-bound, zmax=bound, zmid=0, colorscale=DIVERGING, showscale=i == 0,
                                 colorbar=dict(title="DLA"),
                                 hovertemplate="L%{y} H%{x}<br>%{z:+.4f}<extra></extra>"), row=1, col=i + 1)
    grid_axes(fig, *grids[0].shape)
    fig.update_layout(title="DLA per head (one symmetric scale for all panels)", height=420)
    return fig


def head_source_heatmaps(dlas: Sequence[DirectLogitAttribution], layer: int, tokens: Sequence[str]) -> go.Figure:
    """For one layer: each head's DLA split by source token, per model, on one symmetric scale."""
    grids = [d.head_source[layer] for d in dlas]
    bound = symmetric(*grids)
    # Each panel has its own token axis (labels turned -60°) and the next panel's title below it: a gap in pixels.
    gap = TICKS_PX + TITLE_GAP_PX
    plot_px = 220 * len(dlas) + gap * (len(dlas) - 1)
    fig = make_subplots(rows=len(dlas), cols=1, subplot_titles=[model_label(i, d.name) for i, d in enumerate(dlas)],
                        vertical_spacing=gap / plot_px if len(dlas) > 1 else 0.0)
    hover = hover_tokens(tokens)
    for i, g in enumerate(grids):
        fig.add_trace(go.Heatmap(z=g, x=np.arange(g.shape[1]), zmin=-bound, zmax=bound, zmid=0, colorscale=DIVERGING,
                                 showscale=i == 0, colorbar=dict(title="DLA"),
                                 customdata=np.array([hover] * g.shape[0]),
                                 hovertemplate=f"L{layer}H%{{y}} from pos %{{x}} %{{customdata}}<br>%{{z:+.4f}}<extra></extra>"),
                      row=i + 1, col=1)
        position_axis(fig, tokens, row=i + 1, col=1)
        fig.update_yaxes(title_text="head", dtick=max(1, math.ceil(g.shape[0] / 25)), row=i + 1, col=1)
    fig.update_layout(title=f"Layer {layer}: DLA of each head by source token", height=plot_px + 90 + TICKS_PX,
                      margin=dict(t=90, b=TICKS_PX))
    return fig


def dla_vs_direct_effect(effects: Sequence[HeadDirectEffect]) -> go.Figure:
    """Each head's DLA against its true direct effect; points on the diagonal are exact."""
    fig = go.Figure()
    lim = symmetric(*[e.dla for e in effects], *[e.direct_effect for e in effects])
    fig.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="DLA = direct effect",
                             line=dict(color="grey", dash="dot")))
    for i, e in enumerate(effects):
        L, H = e.dla.shape
        labels = [f"L{layer}H{head}" for layer in range(L) for head in range(H)]
        fig.add_trace(go.Scatter(x=e.direct_effect.ravel(), y=e.dla.ravel(), mode="markers", text=labels,
                                 name=f"{model_label(i, e.name)}: NMAE {e.nmae:.2%}", marker=dict(color=MODEL_COLOURS[i % 4]),
                                 hovertemplate="%{text}<br>direct effect %{x:+.4f}<br>DLA %{y:+.4f}<extra></extra>"))
    fig.update_layout(title="DLA against the true direct effect, per head", xaxis_title="direct effect (final LN recomputed)",
                      yaxis_title="DLA (cached final-LN scale)", height=480, legend=dict(orientation="h", y=-0.25))
    return fig


def attention_patterns(names: Sequence[str], patterns: Sequence[np.ndarray], layer: int, head: int,
                       tokens: Sequence[str]) -> go.Figure:
    """One head's attention pattern ``(n, n)`` in every model, side by side (``patterns[i]`` of model ``names[i]``).

    From a run that kept them: ``[s.patterns[layer, head] for s in attention(result)]``; from one that did not:
    :func:`noln_core.compare.head_pattern`.
    """
    shown = list(enumerate(zip(names, patterns)))
    fig = make_subplots(rows=1, cols=len(shown), subplot_titles=[model_label(i, name) for i, (name, _) in shown],
                        horizontal_spacing=0.08)
    hover = hover_tokens(tokens)
    for i, (_, (_, pattern)) in enumerate(shown):
        pat = pattern.astype(float).copy()
        pat[np.triu_indices_from(pat, k=1)] = np.nan
        custom = np.array([[f"{hover[q]} → {hover[k]}" for k in range(len(tokens))] for q in range(len(tokens))])
        fig.add_trace(go.Heatmap(z=pat, zmin=0, zmax=1, colorscale=SEQUENTIAL, showscale=i == 0, customdata=custom,
                                 colorbar=dict(title="attention"),
                                 hovertemplate="%{customdata}<br>%{z:.3f}<extra></extra>"), row=1, col=i + 1)
        position_axis(fig, tokens, row=1, col=i + 1)
        n = len(tokens)
        step = max(1, math.ceil(n / 40))
        fig.update_yaxes(tickmode="array", tickvals=list(range(0, n, step)),
                         ticktext=[token_label(tokens[t]) for t in range(0, n, step)], autorange="reversed",
                         showticklabels=i == 0, row=1, col=i + 1)  # the same queries: labelled once, at the left
    fig.update_layout(title=f"Attention pattern of L{layer}H{head} (rows: query, columns: key)", height=520)
    return fig


def sink_heatmaps(summaries: Sequence[AttentionSummary]) -> go.Figure:
    """Mean attention on the first token over every query (Gu et al.'s score), layer × head, per model (sinks are
    above the threshold)."""
    fig = make_subplots(rows=1, cols=len(summaries), horizontal_spacing=0.06,
                        subplot_titles=[f"{model_label(i, s.name)}: sink rate {s.sink_rate:.1%}" for i, s in enumerate(summaries)])
    for i, s in enumerate(summaries):
        fig.add_trace(go.Heatmap(z=s.to_first, zmin=0, zmax=1, colorscale=SEQUENTIAL, showscale=i == 0,
                                 colorbar=dict(title="to first"),
                                 hovertemplate="L%{y} H%{x}<br>%{z:.3f} of attention on position 0, averaged over "
                                               "every position<extra></extra>"),
                      row=1, col=i + 1)
    grid_axes(fig, *summaries[0].to_first.shape)
    fig.update_layout(title=f"Attention to the first token, mean over all positions (sink: > {summaries[0].threshold:.0%})",
                      height=420)
    return fig
