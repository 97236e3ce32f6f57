"""Next-token predictions, per-token loss and how two models' distributions differ.

For each model: ``log p(token[i+1] | tokens[..i])`` (the per-token loss is its
negative), the top-k predictions at the analysed position and the entropy ``H = -sum p log p``.  For
each pair of models, per position: ``KL(A||B) = sum p_A (log p_A - log p_B)``
both ways, the Jensen-Shannon divergence ``JS = (KL(A||M) + KL(B||M)) / 2``
with ``M = (p_A + p_B)/2`` (symmetric, at most ln 2), and whether their top-1
predictions agree.  All in nats.

The per-position divergences are computed by the run while the full logits
exist (:mod:`noln_core.divergence`); :func:`next_token` summarises what it kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NextTokenStats:
    """One model's next-token behaviour on the run's tokens (``n`` tokens, ``k`` top predictions)."""

    name: str
    loss: np.ndarray
    """(n - 1,) per-token cross-entropy ``-log p(token[i+1] | ..i)``, nats."""
    mean_loss: float
    """Mean of ``loss`` (NaN for a single token)."""
    entropy: np.ndarray
    """(n,) entropy of the prediction at each position."""
    top_ids: np.ndarray
    """(k,) most likely next tokens at the analysed position."""
    top_probs: np.ndarray
    """(k,) their probabilities."""
    top_tokens: tuple[str, ...]
    """(k,) the same tokens as text."""


@dataclass(frozen=True)
class PairStats:
    """Two models' predictions compared per position."""

    a: str
    b: str
    a_index: int
    """Index of model ``a`` in the run (0 for A, 1 for B, 2 for C)."""
    b_index: int
    kl_ab: np.ndarray
    """(n,) KL(A || B)."""
    kl_ba: np.ndarray
    """(n,) KL(B || A)."""
    js: np.ndarray
    """(n,) Jensen-Shannon divergence."""
    top1_agree: np.ndarray
    """(n,) bool."""
    agreement: float
    """Share of positions whose top-1 predictions agree."""
    loss_diff: np.ndarray
    """(n - 1,) loss of B minus loss of A: positive where B predicts the real next token worse."""


@dataclass(frozen=True)
class NextTokenAnalysis:
    models: tuple[NextTokenStats, ...]
    pairs: tuple[PairStats, ...]


def next_token(result) -> NextTokenAnalysis:
    """Summarise next-token predictions of every model in a :class:`~noln_core.compare.RunResult`."""
    stats = []
    for run in result.runs:
        loss = -run.next_logprobs
        stats.append(NextTokenStats(
            name=run.name, loss=loss, mean_loss=float(loss.mean()) if loss.size else float("nan"),
            entropy=run.entropy, top_ids=run.top_ids, top_probs=np.exp(run.top_logprobs),
            top_tokens=run.top_tokens,
        ))
    pairs = tuple(
        PairStats(
            a=stats[p.a].name, b=stats[p.b].name, a_index=p.a, b_index=p.b, kl_ab=p.kl_ab, kl_ba=p.kl_ba, js=p.js, top1_agree=p.top1_agree,
            agreement=float(p.top1_agree.mean()), loss_diff=stats[p.b].loss - stats[p.a].loss,
        )
        for p in result.pairs
    )
    return NextTokenAnalysis(models=tuple(stats), pairs=pairs)
