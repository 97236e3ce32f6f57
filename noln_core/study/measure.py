"""One batch of a study: every model on the same sequences, reduced at once to per-sequence numbers.

Nothing vocabulary-sized outlives a block of rows: the final residual stream is
kept (``batch x seq_len x d_model``), and logits are made from it a block of
rows at a time, for every model together so that pairs can be compared, then
dropped.  What each sequence contributes is added to :class:`~.stats.Totals`
(exact, order-free sums), keyed as :mod:`noln_core.study.results` reads them.

Definitions (each labelled with its source in the results):

* **CE**: next-token cross-entropy at positions ``0..T-2`` (the last token has
  nothing to predict), as ``pile_eval.py`` computes it.
* **Calibration**: top-1 probability against top-1 accuracy in equal-width
  bins (``analyse_models.py``'s ``calculate_ece_with_ci``, 10 bins, binned with
  ``np.digitize`` on ``np.linspace(0, 1, 11)`` as there).
* **NMAE of DLA against the direct effect** per head, at one position per
  sequence.  ``last-token`` (the papers', ``run_analysis.py``): the attributed
  quantity is the logit of the sequence's last token read at the last position,
  with the unembedding centred over the vocabulary (TransformerLens'
  ``center_unembed``) and ``b_U`` included.  ``logit-diff`` (this app's): the
  logit of the true next token minus the model's top other token, at the
  position that predicts the last token.  DLA divides each head's output by the
  cached final scale; the direct effect recomputes the final LN without it.
  Where a head's value bias ``b_V`` (with ``ln_1``'s bias folded into it) is
  counted follows the target: ``last-token`` counts it in the layer's ``b_O``,
  as TransformerLens' default ``fold_value_biases=True`` leaves it in the
  papers' models (so ``stack_head_results`` excludes it); ``logit-diff`` counts
  it in each head, as the app's Attribution page does by default.
* **Attention sinks**: ``papers`` (``utils.calculate_sink_rate``): the share of
  (layer, head, query) triples, query 0 included, whose attention on position 0
  is strictly above 0.3.  ``gu2024`` (Gu et al. 2024, their code's
  ``compute_attention_sink`` in ``sail-sg/Attention-Sink``): the share of heads
  whose mean attention on position 0 over *all* queries ``0..T-1`` (query 0
  included) is strictly above 0.3.
* **First-token norms**: the L2 norm at position 0 of the centred residual
  stream (TransformerLens' ``center_writing_weights``, with which the papers
  load every model) at ``hook_embed``, ``hook_pos_embed``, each block's
  ``hook_resid_mid`` and ``hook_resid_post`` and ``ln_final.hook_normalized``,
  as ``mech_interp/residual_stream/residual_norms.py`` plots them (mean and
  standard deviation over sequences), with the maximum beside.
* **Exploding tokens**: predicted positions whose loss exceeds a threshold, or
  (from position 1 on) whose last-layer residual norm exceeds a multiple of its
  sequence's median.  Position 0 is left out of the norm test: its large norm
  in models with LN is the attention-sink phenomenon, reported on its own.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..divergence import distribution_stats, pair_divergences
from ..model import LoadedModel
from .stats import (
    FINE_BITS, SPARSE_FROM, WIDE_BITS, Totals, limb_matmul, limb_sum, poisson_weights, quantise, sparse_key,
)

METRICS = ("ce", "entropy", "calibration", "nmae", "norms", "sinks", "exploding", "pairs")
"""What a study can measure; ``ce`` (with the per-token median and loss by position) is always measured."""
NMAE_TARGETS = ("last-token", "logit-diff")
SINK_THRESHOLD = 0.3
LOSS_BIN = 1e-4
"""Width of the per-token loss histogram's bins (nats): the per-token median is exact to half of it."""
LOSS_BINS = round(SPARSE_FROM / LOSS_BIN)
"""Bins of the dense loss histogram, covering [0, 32) nats; larger losses are counted in relative bins
(:func:`~.stats.sparse_key`), so the median and percentiles stay right for any finite loss."""
NMAE_EPSILON = 1e-10
"""Added to the mean |direct effect| in every NMAE, as ``run_analysis.py`` does (lines 217-218, 229-230)."""
ROWS_CAP = 2**21
"""Per-(sequence, head) NMAE values kept for the papers' bootstrap, at most (sequences x heads); above it the
interval comes from Poisson weights instead (:func:`~.stats.head_and_sequence_bootstrap`)."""
VALUE_BIAS = {"last-token": "b_O", "logit-diff": "head"}
"""Where each NMAE target counts a head's value bias ``b_V``: in the layer's ``b_O`` (TransformerLens'
``fold_value_biases``, the papers' models) or in the head (the app's default)."""
DIFF_EDGES = np.linspace(-10.0, 10.0, 401)
"""Edges of the per-token loss-difference histogram of a pair (nats); the outer bins take the rest."""


@dataclass(frozen=True)
class Settings:
    """What to measure and how; the defaults are the papers' choices (see the README's study section)."""

    metrics: tuple[str, ...] = METRICS
    nmae_target: str = "last-token"
    ece_bins: int = 10
    explode_loss: float = 20.0
    """Loss (nats) above which a position is exploding: twice the loss of a uniform guess over GPT-2's vocabulary."""
    explode_norm: float = 5.0
    """Multiple of the sequence's median last-layer residual norm above which a position is exploding."""
    bootstrap: int = 1000
    seed: int = 0
    pairs: str = "all"
    """``all`` pairs of models, or ``first``: each model against the first."""
    row_bytes: int = 256 * 2**20
    """Memory for the logits of one block of rows, all models together."""

    def wants(self, metric: str) -> bool:
        return metric == "ce" or metric in self.metrics


def model_pairs(n: int, how: str) -> list[tuple[int, int]]:
    if how == "first":
        return [(0, j) for j in range(1, n)]
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


_MEANS: "weakref.WeakKeyDictionary[LoadedModel, tuple[torch.Tensor, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _vocabulary_means(model: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean unembedding row and mean ``b_U`` over the vocabulary (float64), once per model.

    Summed a block of rows at a time, so no float64 copy of the whole unembedding is ever made.
    """
    if model not in _MEANS:
        rows = model.weights.W_U_rows
        total = sum(rows[i:i + 4096].double().sum(0) for i in range(0, rows.shape[0], 4096))
        _MEANS[model] = (total / rows.shape[0], model.weights.b_U.double().mean())
    return _MEANS[model]


def _readout_direction(model: LoadedModel, a: torch.Tensor, b: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, const)`` per sequence, float64: the quantity is ``(C x / sigma) . u + const``.

    With ``b`` None it is token ``a``'s logit minus the vocabulary's mean logit
    (the centred unembedding); else the logit difference ``a - b``.
    """
    w = model.weights
    rows, w_u, b_u = w.W_U_rows, w.w_U.double(), w.b_U.double()
    if b is None:
        mean_row, mean_bias = _vocabulary_means(model)
        u = (rows[a].double() - mean_row) * w_u
        const = b_u[a] - mean_bias
    else:
        u = (rows[a].double() - rows[b].double()) * w_u
        const = b_u[a] - b_u[b]
    return u - u.mean(-1, keepdim=True), const


def norm_labels(n_layers: int) -> tuple[str, ...]:
    """The hooks of the first-token norm figure, in order (``residual_norms.py``'s ``get_hook_names``)."""
    return ("embed", "pos_embed", *(f"L{l} {k}" for l in range(n_layers) for k in ("mid", "post")), "ln_final")


def _capture(model: LoadedModel, ids: torch.Tensor, settings: Settings, read_pos: int):
    """One forward pass: the final residual stream and the small things each metric needs."""
    L = model.info.n_layers
    last = f"blocks.{L - 1}.hook_resid_post"
    want_norms, want_sinks, want_nmae = (settings.wants("norms"), settings.wants("sinks"),
                                         settings.wants("nmae"))
    norms, to_first, heads = [], [], []
    box = {}
    H, dh = model.info.n_heads, model.info.d_head
    W_O = model.weights.W_O
    d = model.info.d_model
    without_value_bias = VALUE_BIAS[settings.nmae_target] == "b_O"

    def wanted(name: str) -> bool:
        if name == last:
            return True
        if want_norms and (name in ("hook_embed", "hook_pos_embed") or name.endswith("hook_resid_mid")
                           or name.endswith("hook_resid_post")):
            return True
        if want_sinks and name.endswith("attn.hook_attn_to_first"):
            return True
        return want_nmae and name.endswith("attn.hook_z")

    def observe(name: str, x: torch.Tensor) -> None:
        if name.startswith("hook_") or name.endswith("hook_resid_mid") or name.endswith("hook_resid_post"):
            if want_norms:
                first = x[:, 0].double()
                norms.append((first - first.mean(-1, keepdim=True)).norm(dim=-1))  # the centred stream's norm
            if name == last:
                box["resid"] = x
        elif name.endswith("hook_attn_to_first"):
            to_first.append(x.to(torch.float32, copy=True))  # a copy: the view would keep the kernel's output alive
        else:  # hook_z: each head's write into the residual stream at the read position
            layer = int(name.split(".")[1])
            z = x[:, read_pos].double()  # (batch, head, d_head)
            if without_value_bias:  # b_V . W_O moved to b_O, as fold_value_biases does (sum of attention = 1)
                z = z - model.weights.b_QKV[layer, 2 * d:].double().view(H, dh)
            heads.append(torch.einsum("bhk,hkd->bhd", z, W_O[layer].double().view(H, dh, -1)))

    model.forward(ids, observer=observe, wants=wanted, return_logits=False)
    if want_norms:  # ln_final.hook_normalized: the centred final stream over its LN scale (none without LN)
        final = box["resid"][:, 0].double()
        centred = final - final.mean(-1, keepdim=True)
        scale = 1.0 if model.ln_free else (centred.pow(2).mean(-1) + model.info.eps).sqrt()
        norms.append(centred.norm(dim=-1) / scale)
    return box["resid"], norms, to_first, heads


def measure_batch(models: list[LoadedModel], ids: torch.Tensor, first: int, settings: Settings,
                  totals: Totals, keep_rows: bool = False) -> None:
    """Add the sequences ``ids`` (``(batch, T)``, global indices ``first, first+1, ...``) to ``totals``.

    ``keep_rows`` keeps each sequence's per-head NMAE terms for the papers' bootstrap (see ``ROWS_CAP``).
    """
    n_seq, T = ids.shape
    ids = ids.to(models[0].device)
    targets = ids[:, 1:]
    seq_index = np.arange(first, first + n_seq)
    resampled = settings.bootstrap and (settings.wants("calibration") or settings.wants("nmae"))
    weights = (np.stack([poisson_weights(settings.seed, int(s), settings.bootstrap) for s in seq_index], 1)
               if resampled else None)  # (replicates, batch): only the bootstrapped metrics use them
    pairs = model_pairs(len(models), settings.pairs) if settings.wants("pairs") and len(models) > 1 else []
    read_pos = T - 1 if settings.nmae_target == "last-token" else T - 2
    resids = []
    for m, model in enumerate(models):
        resid, norms, to_first, heads = _capture(model, ids, settings, read_pos)
        resids.append(resid)
        key = f"m{m}."
        if norms:
            stacked = torch.stack(norms, 1).cpu().numpy()  # (batch, hooks)
            totals.add(key + "norm0", stacked.sum(0))
            totals.add(key + "norm0_sq", (stacked**2).sum(0))
            totals.maximum(key + "norm0_max", stacked.max(0))
        if to_first:
            _sinks(totals, key, torch.stack(to_first, 1))  # (batch, L, H, T)
        if heads:
            _nmae(totals, key, model, resid, torch.stack(heads, 1).flatten(1, 2), ids, read_pos, settings, weights,
                  seq_index if keep_rows else None)

    # Per-token statistics, a block of rows at a time, every model at once (pairs need them side by side).
    full = pairs or settings.wants("entropy") or settings.wants("calibration")
    stats, divergences = _row_stats(models, resids, targets, pairs, settings.row_bytes, full)
    _per_model(totals, models, stats, ids, seq_index, settings, weights, resids)
    if pairs:
        _pairs(totals, models, ids, pairs, seq_index, stats, divergences)


def _row_stats(models: list[LoadedModel], resids: list[torch.Tensor], targets: torch.Tensor, pairs,
               row_bytes: int, full: bool = True):
    """Per predicted position and model: loss, entropy, top-1 probability and id (``(batch, P)``, CPU);
    per pair: KL both ways and JS (``(batch, P)``).  Without ``full``, the loss alone (one log-sum-exp)."""
    b, P = targets.shape
    V = models[0].info.d_vocab
    rows_per = max(1, row_bytes // (((2 * len(models) + 2) if pairs else 2) * V * 4))
    flat_t = targets.reshape(-1)
    flat = [r[:, :P].reshape(b * P, -1) for r in resids]
    stats = [{k: [] for k in (("loss", "entropy", "conf", "top") if full else ("loss",))} for _ in models]
    divs = {pair: {k: [] for k in ("kl_ab", "kl_ba", "js")} for pair in pairs}
    for r0 in range(0, b * P, rows_per):
        t = flat_t[r0:r0 + rows_per, None]
        dist = {}
        for m, model in enumerate(models):
            logits = model.unembed(flat[m][r0:r0 + rows_per])
            st = stats[m]
            if not full:
                st["loss"].append((torch.logsumexp(logits, -1) - logits.gather(-1, t)[:, 0]).double())
                continue
            lse, probs, ent, top = distribution_stats(logits)
            st["loss"].append((lse - logits.gather(-1, t)[:, 0]).double())
            st["entropy"].append(ent.double())
            st["conf"].append(probs.gather(-1, top[:, None])[:, 0].double())
            st["top"].append(top)
            if pairs:
                dist[m] = (logits, probs, lse, ent)
        for (i, j) in pairs:
            li, pi, lsi, ei = dist[i]
            lj, pj, lsj, ej = dist[j]
            kl_ab, kl_ba, js = pair_divergences(li, lj.clone(), pi, pj.clone(), lsi, lsj, ei, ej)
            for k, v in (("kl_ab", kl_ab), ("kl_ba", kl_ba), ("js", js)):
                divs[(i, j)][k].append(v.double())
        del dist
    stats = [{k: torch.cat(v).reshape(b, P).cpu() for k, v in st.items()} for st in stats]
    divs = {pair: {k: torch.cat(v).reshape(b, P).cpu().numpy() for k, v in d.items()} for pair, d in divs.items()}
    return stats, divs


def _per_model(totals: Totals, models, stats, ids, seq_index, settings: Settings, weights, resids) -> None:
    n_seq, T = ids.shape
    targets = ids[:, 1:].cpu()
    for m, (model, st) in enumerate(zip(models, stats)):
        key = f"m{m}."
        loss = st["loss"].numpy()
        totals.add(key + "n", np.array([n_seq]), 0)
        per_seq = [("loss", loss.mean(1))]
        if settings.wants("entropy"):
            per_seq.append(("entropy", st["entropy"].numpy().mean(1)))
        for name, v in per_seq:
            totals.add(key + name, np.array([v.sum()]))
            totals.add(key + name + "_sq", np.array([(v**2).sum()]), WIDE_BITS)
        totals.add(key + "loss_pos", loss.sum(0), WIDE_BITS)
        totals.add(key + "loss_pos_sq", (loss**2).sum(0), WIDE_BITS)
        flat = loss.ravel()
        dense = flat < SPARSE_FROM
        bins = np.minimum((np.maximum(flat[dense], 0.0) / LOSS_BIN).astype(np.int64), LOSS_BINS - 1)
        totals.count_at(key + "loss_hist", LOSS_BINS, bins)
        if not dense.all():  # larger losses, up to any finite value, in relative bins
            totals.count_sparse(key + "loss_hist_far", sparse_key(flat[~dense]))
        if settings.wants("calibration"):
            conf = st["conf"].numpy()
            correct = (st["top"] == targets).numpy().astype(np.float64)
            nb = settings.ece_bins
            b = np.clip(np.digitize(conf, np.linspace(0, 1, nb + 1)) - 1, 0, nb - 1)  # analyse_models.py, lines 632-636
            per_seq = np.zeros((3, n_seq, nb))
            for s in range(n_seq):
                per_seq[0, s] = np.bincount(b[s], minlength=nb)
                per_seq[1, s] = np.bincount(b[s], conf[s], minlength=nb)
                per_seq[2, s] = np.bincount(b[s], correct[s], minlength=nb)
            totals.add(key + "ece_count", per_seq[0].sum(0), 0)
            for i, name in ((1, "ece_conf"), (2, "ece_acc")):
                q = quantise(per_seq[i], WIDE_BITS)
                totals.add(key + name, limb_sum(q), WIDE_BITS, already_quantised=True)
                if weights is not None:
                    totals.add(key + name + "_boot", limb_matmul(weights, q), WIDE_BITS, already_quantised=True)
            if weights is not None:
                totals.add(key + "ece_count_boot", weights @ per_seq[0].astype(np.int64), 0)
        if settings.wants("exploding"):
            _exploding(totals, key, model, loss, ids, resids[m], seq_index, settings)


def _exploding(totals: Totals, key: str, model: LoadedModel, loss: np.ndarray, ids: torch.Tensor,
               resid: torch.Tensor, seq_index: np.ndarray, settings: Settings) -> None:
    n_seq, T = ids.shape
    P = T - 1
    norm = resid[:, :P].double().norm(dim=-1).cpu().numpy()  # (batch, P) last-layer residual norms
    median = np.median(norm[:, 1:], axis=1, keepdims=True) if P > 1 else norm
    flag = loss > settings.explode_loss
    flag[:, 1:] |= norm[:, 1:] > settings.explode_norm * median
    s, p = np.nonzero(flag)
    totals.add(key + "explode_total", np.array([len(s)]), 0)
    if not len(s):
        return
    tokens = ids.cpu().numpy()[s, p]  # the input token whose residual exploded
    where = seq_index[s] * T + p
    V = model.info.d_vocab
    totals.count_at(key + "explode_count", V, tokens)
    totals.count_at(key + "explode_loss", V, tokens, loss[s, p], WIDE_BITS)
    totals.best_at(key + "explode_worst", V, tokens, loss[s, p], where)
    totals.best_at(key + "explode_norm", V, tokens, norm[s, p], where)


def _sinks(totals: Totals, key: str, to_first: torch.Tensor) -> None:
    """``to_first``: (batch, L, H, T) attention on position 0."""
    b, L, H, T = to_first.shape
    papers = (to_first > SINK_THRESHOLD).sum((1, 2, 3)).double() / (L * H * T)  # utils.py, lines 88-101
    importance = to_first.double().mean(-1)  # eval_sink_open_source.py, lines 46-47: every query, 0 included
    gu = (importance > SINK_THRESHOLD).double().mean((1, 2))  # line 48: strictly above epsilon
    for name, v in (("sink_papers", papers), ("sink_gu", gu)):
        v = v.cpu().numpy()
        totals.add(key + name, np.array([v.sum()]))
        totals.add(key + name + "_sq", np.array([(v**2).sum()]))
    totals.add(key + "sink_head_mean", importance.sum(0).cpu().numpy().ravel())


def _nmae(totals: Totals, key: str, model: LoadedModel, resid: torch.Tensor, heads: torch.Tensor,
          ids: torch.Tensor, read_pos: int, settings: Settings, weights, rows: np.ndarray | None) -> None:
    """Per-head DLA and direct effect at ``read_pos``; ``heads``: (batch, L*H, d) float64.

    As ``run_analysis.py`` (lines 128-199): DLA is each head's centred output over the cached final scale,
    dotted with the (vocabulary-centred) unembedding of the target; the direct effect subtracts the head
    from the final residual and recomputes the final LN.  ``rows`` (global sequence indices) keeps each
    sequence's per-head ``|DLA - DE|`` and ``|DE|`` for the papers' bootstrap.
    """
    x = resid[:, read_pos].double()  # (batch, d)
    if settings.nmae_target == "last-token":
        u, const = _readout_direction(model, ids[:, -1], None)
    else:
        logits = model.unembed(resid[:, read_pos])
        answer = ids[:, read_pos + 1]
        other = logits.scatter(-1, answer[:, None], -math.inf).argmax(-1)
        u, const = _readout_direction(model, answer, other)
    eps, ln = model.info.eps, not model.ln_free

    def centred(v: torch.Tensor) -> torch.Tensor:
        return v - v.mean(-1, keepdim=True)

    def scale(v: torch.Tensor) -> torch.Tensor:
        return (centred(v).pow(2).mean(-1) + eps).sqrt() if ln else torch.ones(v.shape[:-1], dtype=v.dtype,
                                                                                  device=v.device)

    def readout(v: torch.Tensor, uu: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
        return (centred(v) * uu).sum(-1) / scale(v) + cc

    full = readout(x, u, const)  # (batch,)
    ablated = readout(x[:, None] - heads, u[:, None], const[:, None])  # (batch, L*H)
    direct = full[:, None] - ablated
    dla = (centred(heads) * u[:, None]).sum(-1) / scale(x)[:, None]
    err, ref = (dla - direct).abs().cpu().numpy(), direct.abs().cpu().numpy()
    q_err, q_ref = quantise(err, FINE_BITS), quantise(ref, FINE_BITS)
    totals.add(key + "nmae_err", limb_sum(q_err), FINE_BITS, already_quantised=True)
    totals.add(key + "nmae_ref", limb_sum(q_ref), FINE_BITS, already_quantised=True)
    totals.add(key + "nmae_dla", dla.sum(0).cpu().numpy(), WIDE_BITS)
    totals.add(key + "nmae_de", direct.sum(0).cpu().numpy(), WIDE_BITS)
    if rows is not None:
        totals.add_rows(key + "nmae_rows", rows, np.stack([err, ref], 1).astype(np.float32))  # (batch, 2, L*H)
    elif weights is not None:
        totals.add(key + "nmae_err_boot", limb_matmul(weights, q_err), FINE_BITS, already_quantised=True)
        totals.add(key + "nmae_ref_boot", limb_matmul(weights, q_ref), FINE_BITS, already_quantised=True)


def _pairs(totals: Totals, models, ids, pairs, seq_index, stats, divergences) -> None:
    """KL both ways, JS, top-1 agreement and loss differences for each pair."""
    inputs = ids.cpu().numpy()
    b, T = inputs.shape
    P = T - 1
    tgt = inputs[:, 1:]
    V = models[0].info.d_vocab
    for (i, j) in pairs:
        key = f"p{i}_{j}."
        per_seq = {k: v.mean(1) for k, v in divergences[(i, j)].items()}
        per_seq["agree"] = (stats[i]["top"] == stats[j]["top"]).double().numpy().mean(1)
        diff = stats[j]["loss"].numpy() - stats[i]["loss"].numpy()  # (b, P): positive where B is worse
        per_seq["dloss"] = diff.mean(1)
        for name, v in per_seq.items():
            totals.add(key + name, np.array([v.sum()]))
            totals.add(key + name + "_sq", np.array([(v**2).sum()]), WIDE_BITS)
        totals.add(key + "n", np.array([b]), 0)
        hist = np.histogram(np.clip(diff, DIFF_EDGES[0], DIFF_EDGES[-1]), DIFF_EDGES)[0]
        totals.add(key + "dloss_hist", hist, 0)
        flat_t, flat_d = tgt.ravel(), diff.ravel()
        where = (seq_index[:, None] * T + np.arange(P)[None] + 1).ravel()  # the predicted token's location
        totals.count_at(key + "tok_count", V, flat_t)
        totals.count_at(key + "tok_abs", V, flat_t, np.abs(flat_d), WIDE_BITS)
        totals.count_at(key + "tok_sum", V, flat_t, flat_d, WIDE_BITS)
        totals.best_at(key + "tok_worst", V, flat_t, np.abs(flat_d), where)
