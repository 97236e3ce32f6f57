"""Attention patterns equal HF's, and the sink rate follows its definition."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import PROMPTS, hf_run
from noln_core import attention, compare


@pytest.fixture(scope="module")
def result(ln_model, noln_model):
    return compare([ln_model, noln_model], PROMPTS[2])


def test_patterns_equal_hf(result, ln_dir, noln_dir):
    for summary, directory in zip(attention(result), (ln_dir, noln_dir)):
        ref = np.stack([a.numpy() for a in hf_run(directory, list(result.token_ids))["attentions"]])
        np.testing.assert_allclose(summary.patterns, ref, atol=1e-5)
        np.testing.assert_allclose(summary.patterns.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(summary.patterns, k=1) == 0)


def test_sink_rate_is_gu_et_al_s_code(result, ln_dir):
    """compute_attention_sink (sail-sg/Attention-Sink): the first token's mean attention over all queries, > 0.3."""
    import torch

    import papers

    attentions = hf_run(ln_dir, list(result.token_ids))["attentions"]
    summary = attention(result)[0]
    assert summary.sink_rate == pytest.approx(papers.compute_attention_sink([a[None] for a in attentions]))
    ref = torch.stack(attentions).numpy()
    np.testing.assert_allclose(summary.to_first, ref[:, :, :, 0].mean(-1), atol=1e-5)  # query 0 included


def test_papers_sink_rate_counts_every_query_above_the_threshold(result, ln_dir):
    """Baroni et al.'s code (utils.calculate_sink_rate): (layer, head, query) with attention on 0 > 0.3, query 0 in."""
    ref = np.stack([a.numpy() for a in hf_run(ln_dir, list(result.token_ids))["attentions"]])  # (L, H, q, k)
    on_first = ref[..., 0]
    L, H, T = on_first.shape
    summary = attention(result)[0]
    assert summary.sink_rate_papers == pytest.approx((on_first > 0.3).sum() / (L * H * T))
    assert summary.sink_rate_papers >= 1 / T  # query 0 attends only to itself


def test_threshold_is_a_parameter(result):
    low, high = attention(result, threshold=0.0)[0], attention(result, threshold=1.0)[0]
    assert low.sink_rate == 1.0 and high.sink_rate == 0.0 and high.threshold == 1.0


def test_attention_to_first_is_kept_without_full_patterns(ln_model):
    result = compare(ln_model, PROMPTS[2], max_pattern_elements=1)
    summary = attention(result)[0]
    assert summary.patterns is None and np.isfinite(summary.sink_rate)
