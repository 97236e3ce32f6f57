"""Entropy ("confidence") neurons of the last MLP layer: their weight signature and their mean ablation.

Stolfo et al. 2024 ("Confidence regulation neurons in language models") found last-layer neurons with a large
output weight ``w_out`` that writes almost only into the *effective null space* of the unembedding (its bottom
singular directions).  Such a neuron barely moves any logit directly; it changes the residual stream's norm, and
so the final LayerNorm's scale, which sharpens or flattens the whole distribution: it regulates entropy.  Baroni et
al. 2025 found that the neurons keep their signature once LN is removed, but mean-ablating them no longer does
anything: the path through the LN scale is gone.

**Signature** (:func:`neuron_signature`), as ``mech_interp/entropy_neurons/svd_comparison.py`` of
``submarat/removing-layer-norm`` (@583a9e6, lines 58-77 and 91-98) computes it on models loaded through
TransformerLens with ``fold_ln``, ``center_writing_weights`` and ``center_unembed`` (``load_models.py``):
``w_out`` is the neuron's row of ``W_out`` centred over d_model, ``W_U`` the unembedding with ``ln_f``'s weight
folded in, centred over d_model, then over the vocabulary.  ``LogitVar(w_out)`` is the variance over the
vocabulary (unbiased, ``torch.var``'s default) of the cosine between ``w_out`` and each column of ``W_U``; the
papers rank neurons by ``||w_out|| / LogitVar``.  ``null_share`` is Stolfo et al.'s measure: the share of
``||w_out||^2`` in the ``null_k`` bottom singular directions of ``W_U`` (the exact null direction that centring
creates, the all-ones vector, left out).

**Ablation** (:func:`neuron_ablation`), as ``mech_interp/entropy_neurons/ablate_all_models.py`` (lines 118-140 and
225-295): a neuron's ``mlp.hook_post`` activation is replaced by its mean over a corpus (``NeuronMeans``), at every
position; a last-layer neuron writes only into the final residual stream, so the ablated stream is
``x' = x + sum_i (mean_i - a_i) w_out_i`` and the run needs no second forward pass.  With
``g_i = (C w_out_i * w_f) W_U^T`` (a vocabulary vector per neuron) and the final LN scale ``s(x)``:

* total: ``logits' = (s(x) / s(x')) (logits - b_U) + sum_i (mean_i - a_i) g_i / s(x') + b_U``, the model's own
  LN recomputed;
* direct: the same with ``s(x') := s(x)``, the scale frozen (Stolfo et al.'s direct effect, through ``W_U``);
* through the LN scale: total - direct.

For an LN-free model ``s = 1`` on both sides, the two are the same computation, and the part through the LN is
exactly 0.  The papers report ``|Δ loss|`` and ``|Δ entropy|`` per token (median and quartiles); here the signed
changes are kept per position, and :func:`ablation_summary` gives both.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..compare import frozen
from ..errors import InputError
from ..model import LoadedModel

PAPERS_NEURONS: dict[tuple[int, int, int], tuple[str, tuple[int, ...]]] = {
    (12, 768, 3072): ("small", (584, 2123, 2870)),
    (24, 1024, 4096): ("medium", (3144, 1083, 1108)),
}
"""The last-layer neurons the papers ablate (``ablate_all_models.py``, line 517-518), by (layers, d_model, d_mlp)."""
NULL_K = 10
"""Bottom singular directions of ``W_U`` taken as its effective null space (the all-ones direction left out)."""
MEANS_SEQUENCES = 250
"""Sequences of the papers' means (``ablate_all_models.py``, line 46: 250 samples of 512 tokens, no BOS)."""
MEANS_SEQ_LEN = 512
POSITION_CHUNK = 16
"""Positions whose vocabulary-wide rows an ablation handles at a time (16 x 50257 floats: a few MB, in cache)."""


def parse_neurons(value: str) -> tuple[int, ...] | None:
    """``marked`` -> None (each model's own marked neurons); else comma-separated neuron indices."""
    if value.strip() == "marked":
        return None
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise InputError(f"neurons are numbers such as 584,2123 (or 'marked'), not {value[:40]!r}") from None
    if not out:
        raise InputError("no neuron given: type numbers such as 584,2123, or 'marked'")
    return out


def papers_neurons(model: LoadedModel) -> tuple[str, tuple[int, ...]] | None:
    """``(size, neurons)`` the papers ablate when ``model`` has GPT-2 small's or medium's shape, else None."""
    i = model.info
    return PAPERS_NEURONS.get((i.n_layers, i.d_model, i.d_mlp))


@dataclass(frozen=True)
class NeuronSignature:
    """The weight signature of every last-layer MLP neuron of one model (``M`` = d_mlp, ``d`` = d_model)."""

    name: str
    ln_free: bool
    layer: int
    """The last layer's index (the neurons' block)."""
    w_out_norm: np.ndarray
    """(M,) ``||w_out||`` of each neuron, ``w_out`` centred over d_model."""
    logit_var: np.ndarray
    """(M,) the papers' ``LogitVar``: unbiased variance over the vocabulary of ``cos(w_out, W_U[:, v])``."""
    ratio: np.ndarray
    """(M,) ``||w_out|| / LogitVar``, the papers' ranking."""
    null_share: np.ndarray
    """(M,) share of ``||w_out||^2`` in the ``null_k`` bottom singular directions of ``W_U`` (Stolfo et al.)."""
    null_k: int
    singular_values: np.ndarray
    """(d - 1,) singular values of the centred ``W_U``, descending, divided by the largest (the null direction of
    centring left out)."""
    ranking: np.ndarray
    """(M,) neuron indices by ``ratio``, largest first (``np.argsort(-ratio)``, as the script)."""
    marked: tuple[int, ...]
    """The neurons to show: the papers' for GPT-2 small or medium shapes, else the top three by ``ratio``."""
    marked_source: str
    """``papers (small)``, ``papers (medium)`` or ``signature``."""

    def __post_init__(self) -> None:
        m = self.w_out_norm.shape[0]
        assert self.logit_var.shape == self.ratio.shape == self.null_share.shape == self.ranking.shape == (m,)
        assert np.all((self.null_share >= -1e-6) & (self.null_share <= 1 + 1e-6))


def _effective_unembedding(model: LoadedModel) -> torch.Tensor:
    """(d, V) float64-ready ``W_U`` as TransformerLens' ``fold_ln`` + ``center_unembed`` leave it."""
    w = model.weights
    W = (w.W_U_rows.float() * w.w_U.float()).T  # (d, V): ln_f's weight folded into the unembedding
    W = W - W.mean(0, keepdim=True)  # fold_ln centres the unembedding over d_model
    return W - W.mean(1, keepdim=True)  # center_unembed: over the vocabulary


def _gram(W: torch.Tensor, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(W W^T, Wn Wn^T, mean of Wn's columns)`` in float64, ``Wn`` = ``W`` with unit columns, chunked over V."""
    d, V = W.shape
    G, Gn, m = np.zeros((d, d)), np.zeros((d, d)), np.zeros(d)
    for start in range(0, V, chunk):
        block = W[:, start:start + chunk].double()
        unit = block / block.norm(dim=0, keepdim=True).clamp_min(1e-300)
        G += (block @ block.T).numpy()
        Gn += (unit @ unit.T).numpy()
        m += unit.sum(1).numpy()
    return G, Gn, m / V


def neuron_signature(model: LoadedModel, null_k: int = NULL_K) -> NeuronSignature:
    """The signature of every last-layer neuron of ``model`` (module docstring); a few seconds for GPT-2 small.

    ``LogitVar`` needs no ``M x V`` matrix: with unit columns ``u_v`` of ``W_U``, mean ``m`` and
    ``Gn = sum_v u_v u_v^T``, ``sum_v cos^2 = w^T Gn w / |w|^2``, so the unbiased variance is
    ``(w^T Gn w / |w|^2 - V (w.m)^2 / |w|^2) / (V - 1)``.
    """
    info = model.info
    if not 1 <= null_k < info.d_model - 1:
        raise InputError(f"the null space takes 1 to {info.d_model - 2} singular directions, not {null_k}")
    layer = info.n_layers - 1
    with torch.inference_mode():
        W_out = model.weights.W_out[layer].double().cpu()
        W_out = W_out - W_out.mean(1, keepdim=True)  # center_writing_weights
        W_U = _effective_unembedding(model).cpu()
        G, Gn, mean_unit = _gram(W_U)
    V = W_U.shape[1]
    wo = W_out.numpy()
    sq = np.einsum("md,md->m", wo, wo)
    norm = np.sqrt(sq)
    safe = np.where(sq > 0, sq, 1.0)
    mean_cos = wo @ mean_unit
    logit_var = (np.einsum("md,de,me->m", wo, Gn, wo) / safe - V * mean_cos**2 / safe) / (V - 1)
    logit_var = np.maximum(logit_var, 0.0)
    ratio = norm / np.where(logit_var > 0, logit_var, np.finfo(float).tiny)
    evals, evecs = np.linalg.eigh(G)  # ascending; the first is centring's null direction (the all-ones vector)
    ones = np.ones(info.d_model) / np.sqrt(info.d_model)
    trivial = int(np.argmax(np.abs(evecs.T @ ones)))
    keep = [i for i in range(info.d_model) if i != trivial]
    evals, evecs = evals[keep], evecs[:, keep]
    bottom = evecs[:, :null_k]
    null_share = np.einsum("mk,mk->m", wo @ bottom, wo @ bottom) / safe
    singular = np.sqrt(np.maximum(evals[::-1], 0.0))
    ranking = np.argsort(-ratio, kind="stable")
    found = papers_neurons(model)
    marked, source = (found[1], f"papers ({found[0]})") if found else (tuple(int(i) for i in ranking[:3]), "signature")
    return NeuronSignature(
        name=info.name, ln_free=model.ln_free, layer=layer, w_out_norm=frozen(norm), logit_var=frozen(logit_var),
        ratio=frozen(ratio), null_share=frozen(np.clip(null_share, 0.0, 1.0)), null_k=null_k,
        singular_values=frozen(singular / singular[0]), ranking=frozen(ranking, np.int64), marked=marked,
        marked_source=source)


@dataclass(frozen=True)
class NeuronMeans:
    """Each last-layer neuron's mean activation over a corpus: what mean ablation puts in its place."""

    name: str
    values: np.ndarray
    """(d_mlp,) mean of ``blocks.{L-1}.mlp.hook_post`` over every position but each sequence's last."""
    sequences: int
    tokens: int
    """Positions averaged over."""
    source: str
    """The corpus, as :meth:`~noln_core.corpus.Corpus.describe` says it."""


def neuron_means(model: LoadedModel, sequences: np.ndarray, source: str = "given sequences",
                 batch: int = 8) -> NeuronMeans:
    """Mean last-layer activations over ``sequences`` (N, T) of token ids, positions ``:-1`` of each, as
    ``ablate_all_models.py`` (lines 118-140) averages ``mlp_mid``."""
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or sequences.shape[0] == 0 or sequences.shape[1] < 2:
        raise InputError("neuron means need at least one sequence of at least 2 tokens")
    name = f"blocks.{model.info.n_layers - 1}.mlp.hook_post"
    total = torch.zeros(model.info.d_mlp, dtype=torch.float64)
    kept: dict[str, torch.Tensor] = {}
    for start in range(0, len(sequences), batch):
        ids = torch.as_tensor(np.asarray(sequences[start:start + batch], dtype=np.int64))
        model.forward(ids, observer=kept.__setitem__, wants=name.__eq__, return_logits=False)
        total += kept.pop(name)[:, :-1].double().sum((0, 1)).cpu()
    count = sequences.shape[0] * (sequences.shape[1] - 1)
    return NeuronMeans(model.info.name, frozen(total / count, np.float64), int(sequences.shape[0]), int(count), source)


def _fingerprint(model: LoadedModel) -> str:
    """What makes two loaded models the same for the means: identity, dtype and the last block's MLP weights."""
    info, w, layer = model.info, model.weights, model.info.n_layers - 1
    h = hashlib.sha256(json.dumps([info.source, info.revision, info.commit, info.dtype, info.ln_free]).encode())
    for t in (w.W_in[layer], w.b_in[layer], w.W_QKV[layer], w.W_E[:64]):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def corpus_means(model: LoadedModel, corpus, seq_len: int | None = None, sequences: int = MEANS_SEQUENCES,
                 cache_dir: Path | None = None) -> NeuronMeans:
    """:class:`NeuronMeans` over ``sequences`` of ``seq_len`` tokens of ``corpus`` (no BOS), as the papers' 250 x 512
    (``seq_len`` defaults to 512, or the model's context when shorter).  With ``cache_dir`` the result is kept
    there under a digest of the model and the corpus, and read back next time."""
    from ..corpus import prepare_chunks

    seq_len = min(seq_len or MEANS_SEQ_LEN, model.info.n_ctx)
    if sequences < 1:
        raise InputError(f"neuron means need at least 1 sequence, not {sequences}")
    key = hashlib.sha256(json.dumps([_fingerprint(model), corpus.identity(), seq_len, sequences],
                                    sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"neuron-means-{key}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            with np.load(path) as f:
                meta = json.loads(str(f["meta"]))
                values = frozen(f["values"], np.float64)
            if values.shape == (model.info.d_mlp,):
                return NeuronMeans(model.info.name, values, meta["sequences"], meta["tokens"], meta["source"])
        except (OSError, ValueError, KeyError, EOFError):  # a broken or foreign file: measure again, replace it
            pass
    with tempfile.TemporaryDirectory(prefix="noln-means-") as tmp:
        chunks = prepare_chunks(corpus, model.tokenizer, Path(tmp), seq_len, max_tokens=sequences * seq_len,
                                eot_id=model.info.bos_token_id, d_vocab=model.info.d_vocab)
        means = neuron_means(model, np.array(chunks.tokens()), corpus.describe())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, suffix=".npz.partial")
        with os.fdopen(fd, "wb") as out:
            np.savez(out, values=means.values, meta=json.dumps(
                {"sequences": means.sequences, "tokens": means.tokens, "source": means.source}))
        os.replace(tmp_name, path)
    return means


@dataclass(frozen=True)
class NeuronAblation:
    """Mean ablation of last-layer neurons on one text (``n`` tokens, ``R`` rows: each neuron, then all together).

    Every change is *ablated minus clean*; ``total = direct + via_ln`` holds to rounding by construction, and for an
    LN-free model ``via_ln`` is exactly 0.
    """

    name: str
    ln_free: bool
    neurons: tuple[int, ...]
    labels: tuple[str, ...]
    """(R,) ``neuron 584`` ..., then ``all 3`` when more than one neuron is ablated."""
    rows: tuple[tuple[int, ...], ...]
    """(R,) the neurons each row ablates."""
    loss: np.ndarray
    """(n - 1,) clean per-token loss (position ``i`` predicts token ``i + 1``)."""
    entropy: np.ndarray
    """(n,) clean next-token entropy (nats)."""
    loss_total: np.ndarray
    """(R, n - 1) change of the loss, the final LN recomputed."""
    loss_direct: np.ndarray
    """(R, n - 1) change of the loss with the final LN's scale frozen at its clean value."""
    loss_via_ln: np.ndarray
    """(R, n - 1) ``loss_total - loss_direct``: the part through the final LN's scale."""
    entropy_total: np.ndarray
    """(R, n)."""
    entropy_direct: np.ndarray
    """(R, n)."""
    entropy_via_ln: np.ndarray
    """(R, n)."""
    scale_change: np.ndarray | None
    """(R, n) relative change of the final LN's scale, ``s(x') / s(x) - 1``; None for LN-free models."""
    activation: np.ndarray
    """(K, n) each ablated neuron's clean activation."""
    means: np.ndarray
    """(K,) the means put in their place."""
    means_source: str

    def __post_init__(self) -> None:
        r, n1 = self.loss_total.shape
        assert self.loss_direct.shape == self.loss_via_ln.shape == (r, n1) == (len(self.labels), self.loss.shape[0])
        assert self.entropy_total.shape == self.entropy_direct.shape == self.entropy_via_ln.shape == (r, n1 + 1)
        if self.ln_free:
            assert not self.loss_via_ln.any() and not self.entropy_via_ln.any() and self.scale_change is None


def _changes(p: torch.Tensor, plogp: torch.Tensor, logp: torch.Tensor, delta: torch.Tensor,
             targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(change of the loss of ``targets``, change of the entropy) at each position when logits with probabilities
    ``p`` (and ``plogp = p * log p``, both (n, V)) move by ``delta``, computed from ``delta`` itself so that small
    changes keep their precision in float32: ``Δlse = log(sum p e^Δ / sum p)``, ``Δloss = Δlse - Δ[target]`` and,
    with ``x = e^(Δ - Δlse) - 1`` formed element by element (so that ``p' = p (1 + x)``),
    ``ΔH = Δlse - sum p x log p - sum p (1 + x) Δ``: every sum adds small terms, so each change is exact to about
    1e-7 nats however small it is.  One buffer, a dozen fast passes over the vocabulary; ``delta`` is kept."""
    dot = torch.linalg.vecdot
    buf = torch.exp(delta)
    dlse = torch.log(dot(p, buf) / p.sum(-1))
    x = buf.mul_(torch.exp(-dlse)[:, None]).sub_(1.0)
    d_entropy = dlse - dot(plogp, x)
    d_entropy -= dot(x.add_(1.0).mul_(p), delta)  # sum p' Δ, with p' = p (1 + x)
    d_loss = dlse - delta.gather(-1, targets[:, None])[:, 0]
    d_loss, d_entropy = d_loss.double(), d_entropy.double()
    bad = ~(torch.isfinite(d_loss) & torch.isfinite(d_entropy))
    if bad.any():  # e^Δ overflowed (an exploding token): those positions directly, log-sum-exp in float64
        old = logp[bad].double()
        new = torch.log_softmax(old + delta[bad].double(), -1)
        d_loss[bad] = (old - new).gather(-1, targets[bad][:, None])[:, 0]
        d_entropy[bad] = (old.exp() * old).sum(-1) - (new.exp() * new).sum(-1)
    return d_loss, d_entropy


def neuron_ablation(model: LoadedModel, token_ids: Sequence[int], neurons: Sequence[int],
                    means: NeuronMeans) -> NeuronAblation:
    """Mean-ablate each of ``neurons`` (last layer) and then all of them together on ``token_ids``; one forward pass.

    Raises InputError for an unknown neuron or a text of fewer than 2 tokens.
    """
    info, w = model.info, model.weights
    neurons = tuple(dict.fromkeys(int(i) for i in neurons))
    if not neurons:
        raise InputError("choose at least one neuron to ablate")
    bad = [i for i in neurons if not 0 <= i < info.d_mlp]
    if bad:
        raise InputError(f"neuron {bad[0]} does not exist: the last layer has neurons 0 to {info.d_mlp - 1}")
    if len(token_ids) < 2:
        raise InputError("the text needs at least 2 tokens: one to read, one to predict")
    if means.values.shape != (info.d_mlp,):
        raise InputError(f"the means are for a model with {means.values.shape[0]} neurons, not {info.d_mlp}")
    layer = info.n_layers - 1
    post_name, resid_name = f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_resid_post"
    kept: dict[str, torch.Tensor] = {}
    ids = torch.as_tensor([list(token_ids)], dtype=torch.long)
    logits = model.forward(ids, observer=kept.__setitem__, wants={post_name, resid_name}.__contains__)[0]
    x = kept[resid_name][0].double()  # (n, d)
    idx = torch.tensor(neurons, device=x.device)
    act = kept[post_name][0][:, idx].double()  # (n, K)
    mean = torch.as_tensor(np.asarray(means.values)[list(neurons)], dtype=torch.float64, device=x.device)
    delta = mean[None, :] - act  # (n, K): what each ablation adds to the neuron's activation
    with torch.inference_mode():
        w_out = w.W_out[layer][idx].double()  # (K, d)
        cw = w_out - w_out.mean(-1, keepdim=True)  # the final LN (or the LN-free readout) centres
        g = ((cw * w.w_U.double()).float() @ w.W_U_rows.float().T)  # (K, V): each neuron's write, unembedded
        b = w.b_U.float()
        centred = x - x.mean(-1, keepdim=True)
        targets = ids[0, 1:].to(x.device)
        rows = [(i,) for i in range(len(neurons))] + ([tuple(range(len(neurons)))] if len(neurons) > 1 else [])
        s_old = (centred.pow(2).mean(-1, keepdim=True) + info.eps).sqrt() if not model.ln_free else None
        n = logits.shape[0]
        # (R, n) results; the loss has no target at the last position (its column is dropped at the end)
        out = {k: torch.zeros(len(rows), n, dtype=torch.float64) for k in ("lt", "ld", "et", "ed", "sc")}
        clean_loss, clean_entropy = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        padded = torch.cat([targets, targets[:1]])  # a stand-in target for the last position
        for start in range(0, n, POSITION_CHUNK):  # a few positions at a time: the vocabulary-wide rows stay in cache
            c = slice(start, min(start + POSITION_CHUNK, n))
            z = logits[c].float()
            logp = torch.log_softmax(z, -1)
            p = logp.exp()
            plogp = p * logp
            clean_loss[c] = -logp.gather(-1, padded[c, None])[:, 0].double().cpu()
            clean_entropy[c] = -plogp.sum(-1, dtype=torch.float64).cpu()
            zb = z - b if not model.ln_free else None
            for k, row in enumerate(rows):
                r = list(row)
                shift = delta[c][:, r].float() @ g[r]  # (c, V): the ablation's write, unembedded, before any scale
                if model.ln_free:  # no scale: direct and total are one computation, through the LN exactly 0
                    loss, entropy = _changes(p, plogp, logp, shift, padded[c])
                    for key, value in (("lt", loss), ("ld", loss), ("et", entropy), ("ed", entropy)):
                        out[key][k, c] = value.cpu()
                    continue
                c_new = centred[c] + delta[c][:, r] @ cw[r]
                s_new = (c_new.pow(2).mean(-1, keepdim=True) + info.eps).sqrt()
                out["sc"][k, c] = (s_new / s_old[c] - 1)[:, 0].cpu()
                # the scale recomputed: z' - b = (s_old / s_new) (z - b) + shift / s_new
                total = (shift / s_new.float()).addcmul_(zb, (s_old[c] / s_new - 1).float())
                loss, entropy = _changes(p, plogp, logp, total, padded[c])
                out["lt"][k, c], out["et"][k, c] = loss.cpu(), entropy.cpu()
                direct = shift.div_(s_old[c].float())  # the clean scale, frozen
                loss, entropy = _changes(p, plogp, logp, direct, padded[c])
                out["ld"][k, c], out["ed"][k, c] = loss.cpu(), entropy.cpu()
    clean_loss = clean_loss[:-1]
    for key in ("lt", "ld"):
        out[key] = out[key][:, :-1]
    if model.ln_free:
        out["sc"] = None
    stack = out
    labels = tuple(f"neuron {neurons[r[0]]}" if len(r) == 1 else f"all {len(r)}" for r in rows)
    return NeuronAblation(
        name=info.name, ln_free=model.ln_free, neurons=neurons, labels=labels,
        rows=tuple(tuple(neurons[i] for i in r) for r in rows),
        loss=frozen(clean_loss, np.float64), entropy=frozen(clean_entropy, np.float64),
        loss_total=frozen(stack["lt"], np.float64), loss_direct=frozen(stack["ld"], np.float64),
        loss_via_ln=frozen(stack["lt"] - stack["ld"], np.float64),
        entropy_total=frozen(stack["et"], np.float64), entropy_direct=frozen(stack["ed"], np.float64),
        entropy_via_ln=frozen(stack["et"] - stack["ed"], np.float64),
        scale_change=None if model.ln_free else frozen(stack["sc"], np.float64),
        activation=frozen(act.T, np.float64), means=frozen(mean, np.float64), means_source=means.source)


@dataclass(frozen=True)
class AblationSummary:
    """The papers' summary of one ablation row: ``|Δ|`` per token, median and quartiles, and the mean."""

    label: str
    loss_median: float
    loss_quartiles: tuple[float, float]
    loss_mean: float
    entropy_median: float
    entropy_quartiles: tuple[float, float]
    entropy_mean: float
    via_ln_share: float
    """``sum |Δloss via LN| / (sum |Δloss direct| + sum |Δloss via LN|)``: how much of the effect goes through the
    LN scale (0 for LN-free models)."""


def ablation_summary(ablation: NeuronAblation) -> tuple[AblationSummary, ...]:
    """Per row, ``|Δloss|`` and ``|Δentropy|`` at the positions that predict a token, as ``print_ablation_summary``
    (``ablate_all_models.py`` lines 453-488): median and ``np.percentile`` 25/75, plus the mean."""
    out = []
    for r, label in enumerate(ablation.labels):
        loss = np.abs(ablation.loss_total[r])
        ent = np.abs(ablation.entropy_total[r][:-1])  # the script crops logits[:, :-1] for both
        direct, via = np.abs(ablation.loss_direct[r]).sum(), np.abs(ablation.loss_via_ln[r]).sum()
        out.append(AblationSummary(
            label, float(np.median(loss)), (float(np.percentile(loss, 25)), float(np.percentile(loss, 75))),
            float(loss.mean()), float(np.median(ent)), (float(np.percentile(ent, 25)), float(np.percentile(ent, 75))),
            float(ent.mean()), float(via / (direct + via)) if direct + via > 0 else 0.0))
    return tuple(out)
