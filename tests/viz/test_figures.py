"""Figure and table builders show the analyses' numbers, safely labelled."""

from __future__ import annotations

import numpy as np
import pytest

from noln_core import (
    attention, compare, direct_logit_attribution, head_direct_effects, logit_difference, next_token, residual_norms,
)
from noln_core.viz import figures, tables


@pytest.fixture(scope="module")
def result(ln_model, noln_model):
    return compare([ln_model, noln_model], "<script>alert(1)</script> and <img src=x onerror=alert(2)>\t\x0c end",
                   " Mary", " John")


def test_token_labels_are_escaped_and_visible():
    assert figures.token_label("<b>") == "&lt;b&gt;"
    assert figures.token_label(" a\tb\n") == "␣a⇥b↵"
    assert figures.token_label("\x0c") == "␌" and figures.token_label("\x01") == "\\x01"
    assert figures.token_label("x" * 40).endswith("…")


def test_no_raw_html_from_user_text_in_any_figure(result):
    nt, norms, dla = next_token(result), residual_norms(result), direct_logit_attribution(result)
    figs = [
        figures.loss_strip(nt, result.tokens), figures.divergence_chart(nt, result.tokens),
        figures.norm_heatmaps(norms, result.tokens), figures.norm_ratio_heatmap(norms, result.tokens),
        figures.ln_scale_heatmap(norms[0], result.tokens), figures.head_source_heatmaps(dla, 2, result.tokens),
        figures.attention_patterns([s.name for s in attention(result)],
                                   [s.patterns[1, 2] for s in attention(result)], 1, 2, result.tokens),
    ]
    for fig in figs:
        text = fig.to_json()
        assert "<script>" not in text and "<img" not in text


def test_quotes_in_labels_are_shown_as_typed(ln_model):
    """Plotly shows ``&quot;`` literally: labels escape <, > and & only, so a quote stays a quote."""
    result = compare(ln_model, 'He said "hi" & <b>left</b>', " the", " a")
    fig = figures.loss_strip(next_token(result), result.tokens)
    ticks = " ".join(fig.layout.xaxis.ticktext)
    assert '"' in ticks and "&quot;" not in ticks and "&lt;" in ticks
    assert figures.safe('a "b" <c>') == 'a "b" &lt;c&gt;'


def test_head_patterns_computed_alone_equal_the_kept_ones(ln_model, noln_model):
    """A pattern from a forward pass up to its layer equals the one a full run keeps."""
    from noln_core.compare import head_pattern

    result = compare([ln_model, noln_model], "The quick brown fox jumps over the lazy dog", " the", " a")
    for model, run in zip((ln_model, noln_model), result.runs):
        for layer, head in ((0, 0), (2, 3)):
            np.testing.assert_allclose(head_pattern(model, result.token_ids, layer, head),
                                       run.attn_patterns[layer, head], atol=1e-6)
    lean = compare([ln_model, noln_model], "The quick brown fox jumps over the lazy dog", " the", " a",
                   keep_patterns=False)
    assert all(r.attn_patterns is None for r in lean.runs) and lean.nbytes < result.nbytes
    np.testing.assert_allclose(lean.runs[1].attn_to_first, result.runs[1].attn_to_first, atol=1e-6)


def test_head_heatmaps_use_one_symmetric_scale(result):
    dla = direct_logit_attribution(result)
    fig = figures.head_heatmaps(dla)
    assert len(fig.data) == 3
    np.testing.assert_allclose(fig.data[0].z, dla[0].heads)
    np.testing.assert_allclose(fig.data[2].z, dla[1].heads - dla[0].heads)
    bounds = {(t.zmin, t.zmax) for t in fig.data}
    assert len(bounds) == 1 and next(iter(bounds))[0] == -next(iter(bounds))[1]
    assert fig.data[0].colorscale == fig.data[2].colorscale


def test_scatter_plots_dla_against_direct_effect(result):
    effects = head_direct_effects(result)
    fig = figures.dla_vs_direct_effect(effects)
    np.testing.assert_allclose(fig.data[2].x, effects[1].direct_effect.ravel())
    np.testing.assert_allclose(fig.data[2].y, effects[1].dla.ravel())
    assert f"NMAE {effects[1].nmae:.2%}" in fig.data[2].name


def test_norm_heatmaps_share_a_log_scale_and_can_drop_bos(result):
    norms = residual_norms(result)
    fig = figures.norm_heatmaps(norms, result.tokens, include_bos=False)
    assert fig.data[0].zmin == fig.data[1].zmin and fig.data[0].zmax == fig.data[1].zmax
    np.testing.assert_allclose(fig.data[1].z, np.log10(norms[1].hidden[:, 1:]), rtol=1e-6)


def test_ln_scale_heatmap_refuses_ln_free_models(result):
    with pytest.raises(ValueError, match="LN-free"):
        figures.ln_scale_heatmap(residual_norms(result)[1], result.tokens)


def test_lens_chart_plots_the_lens(result):
    analysis = logit_difference(result)
    fig = figures.logit_lens_chart(analysis)
    for trace, model in zip(fig.data, analysis.models):
        np.testing.assert_allclose(trace.y, model.lens)


def test_tables_carry_the_numbers(result):
    dla = direct_logit_attribution(result)
    frame = tables.dla_frame(dla)
    free = frame[frame.model == dla[1].name]
    parts = free[~free.component.isin(["logit difference"])].dla.sum()
    assert parts == pytest.approx(dla[1].logit_diff, abs=1e-4)
    heads = tables.heads_frame(dla, head_direct_effects(result))
    assert len(heads) == 2 * 3 * 4 and {"dla", "direct_effect"} <= set(heads.columns)
    per_token = tables.per_token_frame(result, next_token(result))
    assert len(per_token) == result.n_tokens
    top = tables.top_predictions_frame(result)
    assert len(top) == 20 and (top["prob"] <= 1).all()
    assert len(tables.tokens_frame(result)) == result.n_tokens
    summaries = attention(result)
    frame = tables.pattern_frame([s.name for s in summaries], [s.patterns[0, 0] for s in summaries], 0, 0, result.tokens)
    assert len(frame) == 2 * result.n_tokens * (result.n_tokens + 1) // 2


def test_the_study_ce_chart_gives_each_model_a_labelled_row_and_keeps_its_legend_inside(ln_model, noln_model,
                                                                                        tmp_path):
    """The chart once was 200 px tall with both models' dots on one row, only A labelled, its legend cut off."""
    from noln_core.study import Settings, parse_corpus, run_study
    from noln_core.viz import study as viz

    result = run_study([ln_model, noln_model, ln_model], parse_corpus("demo"), seq_len=16, batch=2, max_tokens=64,
                       settings=Settings(metrics=("ce",)), state_dir=tmp_path / "s")
    fig = viz.ce_intervals(result)
    rows = list(fig.layout.yaxis.categoryarray)
    assert len(rows) == len(set(rows)) == 3 and list(fig.data[0].y) == rows  # one distinct, labelled row each
    assert fig.layout.yaxis.type == "category" and fig.layout.yaxis.automargin
    assert [t for t in fig.data[0].text] == [f"{m.ce.mean:.3f}" for m in result.models]  # each dot says its value
    legend, margin = fig.layout.legend, fig.layout.margin
    assert legend.orientation == "h" and legend.y < 0 and margin.b >= 100  # below the plot, within the figure
    assert fig.layout.height >= 60 * 3 + 200
