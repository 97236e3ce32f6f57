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


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (rows, vocab) tensors, without an elementwise temporary."""
    return torch.einsum("rv,rv->r", a, b)


def distribution_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse, probs, entropy, argmax)`` of rows of logits, in as few passes over the vocabulary as we know.

    One fused softmax gives the probabilities; the log-normaliser is read off
    the most likely token (``lse = z_max - log p_max``, exact since
    ``p_max >= 1/vocab``), and ``H = lse - sum p * z``.  The same numbers as
    :func:`entropy` on ``log_softmax(logits)``, without a log-probability tensor.
    """
    probs = torch.softmax(logits, -1)
    top = logits.argmax(-1, keepdim=True)
    lse = (logits.gather(-1, top) - probs.gather(-1, top).log())[:, 0]
    return lse, probs, lse - _dot(probs, logits), top[:, 0]


def pair_divergences(logits_a: torch.Tensor, logits_b: torch.Tensor, probs_a: torch.Tensor, probs_b: torch.Tensor,
                     lse_a: torch.Tensor, lse_b: torch.Tensor, entropy_a: torch.Tensor, entropy_b: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(KL(A||B), KL(B||A), JS)`` per row from logits, fused (inputs as :func:`distribution_stats` gives them).

    ``KL(A||B) = sum p_A (z_A - z_B) - (lse_A - lse_B)`` since ``sum p_A = 1``;
    ``JS = H(M) - (H(A) + H(B)) / 2`` with ``M = (p_A + p_B) / 2``.  Identical
    logits give exactly 0 for both KLs; JS is then 0 up to rounding (~1e-7).
    ``logits_b`` and ``probs_b`` are overwritten (they become ``z_A - z_B``, then ``M log M``), so that a pair needs no
    vocabulary-sized memory of its own.
    """
    diff = logits_b.neg_().add_(logits_a)  # z_A - z_B, in B's storage
    gap = lse_a - lse_b
    kl_ab = (_dot(probs_a, diff) - gap).clamp_min_(0.0)
    kl_ba = (gap - _dot(probs_b, diff)).clamp_min_(0.0)
    mixture = probs_b.add_(probs_a).mul_(0.5)
    mixture_plogp = torch.special.xlogy(mixture, mixture, out=mixture).sum(-1)  # in place: M is not needed after
    js = (-mixture_plogp - 0.5 * (entropy_a + entropy_b)).clamp_(0.0, math.log(2.0))
    return kl_ab, kl_ba, js
