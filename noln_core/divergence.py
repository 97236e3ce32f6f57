"""Entropy and divergences of next-token distributions, on full log-probability tensors.

``KL(P||Q) = sum p (log p - log q)``; the Jensen-Shannon divergence
``JS = (KL(P||M) + KL(Q||M)) / 2`` with ``M = (p + q)/2`` is symmetric and at
most ln 2.  All in nats, over the last axis.

These sit below the run (:mod:`noln_core.compare`), which applies them while a
forward pass's full-vocabulary log-probs exist; the analyses then summarise
what it kept.
"""

from __future__ import annotations

import math

import torch


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last axis of log-probabilities."""
    return -(logprobs.exp() * logprobs).sum(-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q)`` over the last axis; exactly 0 when ``logp`` is ``logq``."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) over the last axis, in ``[0, ln 2]``."""
    # log M = log p + log((1 + q/p) / 2), written so that identical inputs give exactly 0.
    d = logq - logp
    logm = logp + (torch.logaddexp(torch.zeros_like(d), d) - math.log(2.0))
    return (0.5 * (kl_divergence(logp, logm) + kl_divergence(logq, logm))).clamp(0.0, math.log(2.0))
