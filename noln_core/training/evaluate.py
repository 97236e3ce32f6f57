"""Corpus evaluation: mean next-token cross-entropy over fixed-length chunks, as the papers report it.

The papers evaluate mean cross-entropy over 1024-token chunks of OpenWebText
and The Pile.  :func:`corpus_loss` does the same on any token stream, batched,
with only the final residual stream and logits materialised (no activations
are captured), so it runs at the speed of plain forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model import LoadedModel


@dataclass(frozen=True)
class CorpusLoss:
    """A model's loss on a corpus."""

    name: str
    mean_loss: float
    """Mean next-token cross-entropy over every predicted token, nats."""
    median_chunk_loss: float
    """Median over chunks of each chunk's mean loss (robust to a few exploding chunks)."""
    chunk_losses: np.ndarray
    """(n_chunks,) each chunk's mean loss."""
    tokens: int
    """Number of tokens predicted."""


def corpus_loss(model: LoadedModel, tokens: np.ndarray, chunk: int | None = None, batch: int = 8,
                prepend_bos: bool = True) -> CorpusLoss:
    """Mean cross-entropy of ``model`` on ``tokens`` split into chunks of ``chunk`` tokens (default: the context)."""
    chunk = min(chunk or model.info.n_ctx, model.info.n_ctx)
    body = chunk - 1 if prepend_bos else chunk
    n_chunks = len(tokens) // body
    if n_chunks == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one chunk of {body}")
    rows = np.asarray(tokens[: n_chunks * body], dtype=np.int64).reshape(n_chunks, body)
    if prepend_bos:
        rows = np.concatenate([np.full((n_chunks, 1), model.info.bos_token_id), rows], axis=1)
    losses = []
    for start in range(0, n_chunks, batch):
        ids = torch.from_numpy(rows[start:start + batch]).to(model.device)
        logits = model.forward(ids)
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        losses.append(-lp.gather(-1, ids[:, 1:, None])[..., 0].mean(-1).cpu())
    per_chunk = torch.cat(losses).numpy()
    return CorpusLoss(model.info.name, float(per_chunk.mean()), float(np.median(per_chunk)), per_chunk,
                      int(n_chunks * (chunk - 1)))
