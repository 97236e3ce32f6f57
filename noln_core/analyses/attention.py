"""Attention patterns and attention sinks, by two definitions, each with its source.

* ``sink_rate`` (Gu et al. 2024, "When Attention Sink Emerges in Language
  Models", as their code computes it: ``compute_attention_sink`` in
  ``sail-sg/Attention-Sink``, ``eval_sink_open_source.py`` lines 41-49): a head
  is an *attention sink* on a prompt when its attention on the first position,
  averaged over *every* query (the first included, whose attention on itself
  is 1), is strictly above 30%; the rate is the share of heads that are sinks.
  On short prompts the first query weighs in: with 10 tokens it alone adds
  0.1 to every head's average.
* ``sink_rate_papers`` (Baroni et al. 2025, arXiv:2507.02559, their code's
  ``utils.calculate_sink_rate``): the share of (layer, head, query) triples,
  query 0 included, whose attention on position 0 is strictly above 0.3.  This
  is the definition behind the paper's GPT-2 medium figures (55.3% for the
  fine-tune with LN, 45.3% for the LN-free model: ``sink_rate.py`` compares
  those two), measured over a corpus (``noln_core.study``), not one prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SINK_THRESHOLD = 0.3


@dataclass(frozen=True)
class AttentionSummary:
    """One model's attention to the first position (L layers, H heads, n tokens)."""

    name: str
    ln_free: bool
    to_first: np.ndarray
    """(L, H) mean attention on position 0 over all query positions 0..n-1: Gu et al.'s importance score of the
    first token (NaN with one token, which attends only to itself)."""
    is_sink: np.ndarray
    """(L, H) bool: ``to_first > threshold``."""
    sink_rate: float
    """Gu et al. 2024: share of heads that are sinks (NaN with one token)."""
    threshold: float
    patterns: np.ndarray | None
    """(L, H, n, n) full patterns when the run kept them."""
    sink_rate_papers: float = float("nan")
    """Baroni et al. 2025's code: share of (layer, head, query), query 0 included, with attention on 0 > threshold."""


def attention(result, threshold: float = SINK_THRESHOLD) -> tuple[AttentionSummary, ...]:
    """Attention-sink summary for every model of a :class:`~noln_core.compare.RunResult`."""
    out = []
    for run in result.runs:
        if run.attn_to_first.shape[-1] > 1:
            to_first = run.attn_to_first.astype(np.float64).mean(-1)  # every query, the first included
            is_sink = to_first > threshold
            rate = float(is_sink.mean())
        else:
            to_first = np.full(run.attn_to_first.shape[:2], np.nan)
            is_sink = np.zeros(to_first.shape, dtype=bool)
            rate = float("nan")
        papers = float((run.attn_to_first > threshold).mean())
        out.append(AttentionSummary(run.name, run.info.ln_free, to_first, is_sink, rate, threshold, run.attn_patterns,
                                    papers))
    return tuple(out)
