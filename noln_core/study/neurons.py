"""Entropy neurons over a corpus: the mean ablation of ``ablate_all_models.py``, with intervals.

``mech_interp/entropy_neurons/ablate_all_models.py`` of ``submarat/removing-layer-norm`` (@583a9e6) takes 250
Pile-filtered sequences of 512 tokens (``load_dataset.py``: ``shuffle(seed=42).take(250)``, no BOS), averages the
last layer's activations over them (lines 118-140), ablates each listed neuron to its mean on the same tokens and
prints the median and quartiles of ``|Δ loss|`` and ``|Δ entropy|`` per token (lines 225-296, 453-488).  Here the
same, for every model of a study, each effect also split into its direct part and its part through the final
LN's scale (:mod:`noln_core.findings.neurons`), with the mean ``|Δ|`` and a 95% t-interval over sequences.

Data-parallel: every process measures the means over all the sequences (the same batches, so the same float
sums) and ablates its shard (sequence ``i`` on process ``i mod P``); process 0 gathers the per-token values in
sequence order, so 2 processes give the 1-process result exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..findings.neurons import neuron_ablation, neuron_means, neuron_signature
from ..model import LoadedModel
from .engine import World
from .patching import Estimate, estimate


@dataclass(frozen=True)
class NeuronEffect:
    """One ablation (a neuron, or all the listed ones together) in one model, over the study's tokens."""

    label: str
    neurons: tuple[int, ...]
    loss: Estimate
    """Mean ``|Δ loss|`` per token (per-sequence means, t-interval over sequences)."""
    entropy: Estimate
    """Mean ``|Δ entropy|`` per token."""
    loss_direct: Estimate
    """Mean ``|Δ loss|`` of the direct part (the final LN's scale frozen)."""
    loss_via_ln: Estimate
    """Mean ``|Δ loss|`` of the part through the final LN's scale: exactly 0 for an LN-free model."""
    loss_median: float
    loss_quartiles: tuple[float, float]
    """The papers' summary of ``|Δ loss|`` over every token: ``np.percentile`` 25 and 75."""
    entropy_median: float
    entropy_quartiles: tuple[float, float]


@dataclass(frozen=True)
class NeuronStudyModel:
    name: str
    ln_free: bool
    neurons: tuple[int, ...]
    neurons_source: str
    """``papers (small)``, ``signature`` (the top three by the papers' ratio) or ``given``."""
    means_tokens: int
    effects: tuple[NeuronEffect, ...]


@dataclass(frozen=True)
class NeuronStudy:
    sequences: int
    seq_len: int
    processes: int
    models: tuple[NeuronStudyModel, ...]


def neuron_study(models: Sequence[LoadedModel], sequences: np.ndarray, neurons: tuple[int, ...] | None = None,
                 world: World = World()) -> NeuronStudy | None:
    """Mean-ablate ``neurons`` (None: each model's marked ones) over ``sequences`` (N, T); the study on process 0."""
    sequences = np.asarray(sequences)
    mine = [i for i in range(len(sequences)) if i % world.processes == world.rank]
    per_model = []
    for model in models:
        if neurons is None:
            sig = neuron_signature(model)
            chosen, source = sig.marked, sig.marked_source
        else:
            chosen, source = tuple(neurons), "given"
        means = neuron_means(model, sequences)
        rows = []
        for i in mine:
            a = neuron_ablation(model, sequences[i].tolist(), chosen, means)
            rows.append((i, np.abs(a.loss_total), np.abs(a.entropy_total[:, :-1]), np.abs(a.loss_direct),
                         np.abs(a.loss_via_ln), a.labels, a.rows))
        per_model.append((model, chosen, source, means.tokens, rows))
    if world.processes > 1:
        gathered = world.gather([rows for *_, rows in per_model])
        if gathered is None:
            return None
        per_model = [(m, c, s, t, [r for part in gathered for r in part[k]]) for k, (m, c, s, t, _) in
                     enumerate(per_model)]
    out = []
    for model, chosen, source, tokens, rows in per_model:
        rows.sort(key=lambda r: r[0])
        labels, row_neurons = rows[0][5], rows[0][6]
        effects = []
        for r, label in enumerate(labels):
            loss = np.stack([x[1][r] for x in rows])  # (N, T-1)
            ent = np.stack([x[2][r] for x in rows])
            direct = np.stack([x[3][r] for x in rows])
            via = np.stack([x[4][r] for x in rows])
            effects.append(NeuronEffect(
                label=label, neurons=row_neurons[r], loss=estimate(loss.mean(1)), entropy=estimate(ent.mean(1)),
                loss_direct=estimate(direct.mean(1)), loss_via_ln=estimate(via.mean(1)),
                loss_median=float(np.median(loss)),
                loss_quartiles=(float(np.percentile(loss, 25)), float(np.percentile(loss, 75))),
                entropy_median=float(np.median(ent)),
                entropy_quartiles=(float(np.percentile(ent, 25)), float(np.percentile(ent, 75)))))
        out.append(NeuronStudyModel(model.info.name, model.ln_free, tuple(chosen), source, tokens, tuple(effects)))
    return NeuronStudy(len(sequences), int(sequences.shape[1]), world.processes, tuple(out))


def neuron_markdown(study: NeuronStudy) -> str:
    lines = ["", "## Entropy neurons: mean ablation", "",
             f"{study.sequences} sequences of {study.seq_len} tokens; each neuron set to its mean over them "
             "(ablate_all_models.py). |Δ| per token: mean [95% interval over sequences], median [quartiles] as the "
             "papers print it, and the mean |Δ loss| split into its direct part and its part through the final LN's "
             "scale (exactly 0 without LN).", "",
             "| model | ablated | mean \\|Δ loss\\| | median \\|Δ loss\\| [Q1, Q3] | mean \\|Δ entropy\\| "
             "| direct | through the final LN |", "|---|---|---|---|---|---|---|"]
    for m in study.models:
        for e in m.effects:
            lines.append(
                f"| {m.name} ({'LN-free' if m.ln_free else 'with LN'}) | {e.label} | {_fmt(e.loss)} | "
                f"{e.loss_median:.2e} [{e.loss_quartiles[0]:.2e}, {e.loss_quartiles[1]:.2e}] | {_fmt(e.entropy)} | "
                f"{e.loss_direct.mean:.2e} | {e.loss_via_ln.mean:.2e} |")
    return "\n".join(lines) + "\n"


def _fmt(e: Estimate) -> str:
    return f"{e.mean:.2e} [{e.low:.2e}, {e.high:.2e}]" if e.n > 1 else f"{e.mean:.2e}"
