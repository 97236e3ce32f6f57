"""Attention patterns and attention sinks.

A head is an *attention sink* on a prompt when it puts at least 30% of its
attention on the first position, averaged over the query positions after it
(the criterion of Baroni et al. 2025, arXiv:2507.02559, who report the share
of such heads in GPT-2 medium falling from 55.3% to 45.3% once LayerNorm is
removed).  The *sink rate* is the share of all heads that are sinks.
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
    """(L, H) mean attention on position 0 over query positions 1..n-1 (NaN with one token)."""
    is_sink: np.ndarray
    """(L, H) bool: ``to_first >= threshold``."""
    sink_rate: float
    """Share of heads that are sinks (NaN with one token)."""
    threshold: float
    patterns: np.ndarray | None
    """(L, H, n, n) full patterns when the run kept them."""


def attention(result, threshold: float = SINK_THRESHOLD) -> tuple[AttentionSummary, ...]:
    """Attention-sink summary for every model of a :class:`~noln_core.compare.RunResult`."""
    out = []
    for run in result.runs:
        if run.attn_to_first.shape[-1] > 1:
            to_first = run.attn_to_first[:, :, 1:].astype(np.float64).mean(-1)
            is_sink = to_first >= threshold
            rate = float(is_sink.mean())
        else:
            to_first = np.full(run.attn_to_first.shape[:2], np.nan)
            is_sink = np.zeros(to_first.shape, dtype=bool)
            rate = float("nan")
        out.append(AttentionSummary(run.name, run.info.ln_free, to_first, is_sink, rate, threshold, run.attn_patterns))
    return tuple(out)
