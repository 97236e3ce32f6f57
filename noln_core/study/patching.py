"""The papers' attribution-patching study: activation against attribution patching over many IOI prompt pairs.

``attr_vs_act_patching_(per_prompt).py`` and ``analysis_attr_vs_act_patching_(per_prompt).py`` of
``submarat/removing-layer-norm`` (@583a9e6) run 30 sets of 16 IOI prompts (480) through each model, normalise each
prompt's maps by its ``clean - corrupted`` logit difference (lines 136-154 of the analysis) and show the mean maps,
activation above attribution patching.  They state the finding in words (attribution patching does not get more
accurate without LN); here it is a number per model: the agreement of the two maps (NMAE and correlation over
layer x position of ``resid_pre``, and over heads), per prompt, with a 95% t-interval over prompts, and the same
agreement of the mean maps their figure shows.

Data-parallel like the study: under ``accelerate launch`` prompt ``i`` goes to process ``i mod P``; each prompt's
numbers do not depend on which process computed them or on the others, and process 0 gathers them in prompt
order, so 2 processes give the 1-process result exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..compare import frozen
from ..errors import InputError
from ..findings.ioi import PAPERS_PROMPTS, ioi_pairs
from ..findings.patching import Agreement, agreement, patching
from ..model import LoadedModel
from ..tokenizer import token_pieces, tokenize
from .engine import World, check_tokenizers
from .stats import mean_ci


@dataclass(frozen=True)
class Estimate:
    """A mean over prompts with its 95% t-interval (over the prompts where the value is defined)."""

    mean: float
    low: float
    high: float
    n: int


def estimate(values: Sequence[float]) -> Estimate:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    mean, (low, high) = mean_ci(len(v), float(v.sum()), float((v * v).sum()))
    return Estimate(mean, low, high, len(v))


@dataclass(frozen=True)
class PatchingSummary:
    """One model's agreement between activation and attribution patching over the study's prompts."""

    name: str
    ln_free: bool
    resid_nmae: Estimate
    """Per-prompt ``mean |attr - act| / mean |act|`` over layer x position of ``resid_pre`` (the final row too)."""
    resid_correlation: Estimate
    z_nmae: Estimate
    """The same over layer x head (``z`` at every position)."""
    z_correlation: Estimate
    final_error: float
    """Largest gap ``|attr - act|`` (logits) at the final stream's last position over the prompts, where activation
    patching restores the clean logit difference exactly: float noise for an LN-free model (the readout is affine),
    the LN's curvature with LN."""
    mean_act: np.ndarray | None
    """(L + 1, n) the papers' figure: the mean normalised activation patching, when every prompt has n tokens."""
    mean_attr: np.ndarray | None
    mean_agreement: Agreement | None
    """Agreement of the two mean maps."""


@dataclass(frozen=True)
class PatchingStudy:
    prompts: int
    seed: int
    templates: int
    processes: int
    tokens: tuple[str, ...] | None
    """The first prompt's tokens (the mean maps' columns), when every prompt has the same length."""
    models: tuple[PatchingSummary, ...]
    per_prompt: tuple[dict, ...]
    """One row per prompt: its texts, and per model ``resid_nmae``, ``resid_correlation``, ``z_nmae``,
    ``z_correlation``, ``normaliser``."""


def _one(models: Sequence[LoadedModel], index: int, pair) -> dict:
    row: dict = {"index": index, "clean": pair.clean, "corrupted": pair.corrupted, "answer": pair.answer,
                 "counterfactual": pair.counterfactual, "models": []}
    for m in models:
        p = patching(m, pair.clean, pair.corrupted, pair.answer, pair.counterfactual)
        act, attr = p.normalised(p.resid_act), p.normalised(p.resid_attr)
        row["models"].append({
            "resid_nmae": p.resid_agreement.nmae, "resid_correlation": p.resid_agreement.correlation,
            "z_nmae": p.z_agreement.nmae, "z_correlation": p.z_agreement.correlation, "normaliser": p.normaliser,
            "final_error": abs(p.resid_attr[-1, -1] - p.resid_act[-1, -1]),
            "act": act, "attr": attr, "n": int(p.clean_ids.shape[0])})
    return row


def patching_study(models: Sequence[LoadedModel], prompts: int = PAPERS_PROMPTS, seed: int = 0, templates: int = 1,
                   world: World = World(), progress: Callable[[int, int], None] | None = None) -> PatchingStudy | None:
    """Activation against attribution patching for every model on ``prompts`` IOI pairs (:func:`ioi_pairs`, names
    limited to single tokens every model has an unembedding for).  Returns the study on process 0, None elsewhere."""
    if not models:
        raise InputError("a patching study needs at least one model")
    check_tokenizers(list(models))

    def usable(token_id: int) -> bool:
        return all(bool(m.weights.W_U_rows[token_id].any()) for m in models)

    pairs = ioi_pairs(prompts, seed, templates, tokenizer=models[0].tokenizer, usable=usable)
    mine = [(i, p) for i, p in enumerate(pairs) if i % world.processes == world.rank]
    rows = []
    for done, (i, pair) in enumerate(mine, 1):
        rows.append(_one(models, i, pair))
        if progress is not None:
            progress(done, len(mine))
    if world.processes > 1:
        gathered = world.gather(rows)
        if gathered is None:
            return None
        rows = [row for part in gathered for row in part]
    rows.sort(key=lambda r: r["index"])
    lengths = {m["n"] for r in rows for m in r["models"]}
    same = len(lengths) == 1
    summaries = []
    for k, m in enumerate(models):
        per = [r["models"][k] for r in rows]
        mean_act = frozen(np.mean([x["act"] for x in per], 0), np.float64) if same else None
        mean_attr = frozen(np.mean([x["attr"] for x in per], 0), np.float64) if same else None
        summaries.append(PatchingSummary(
            name=m.info.name, ln_free=m.ln_free,
            resid_nmae=estimate([x["resid_nmae"] for x in per]),
            resid_correlation=estimate([x["resid_correlation"] for x in per]),
            z_nmae=estimate([x["z_nmae"] for x in per]), z_correlation=estimate([x["z_correlation"] for x in per]),
            final_error=float(max(x["final_error"] for x in per)), mean_act=mean_act, mean_attr=mean_attr,
            mean_agreement=agreement(mean_act, mean_attr) if same else None))
    tokens = None
    if same:
        tokens = token_pieces(models[0].tokenizer, tokenize(models[0], rows[0]["clean"]))[0]
    per_prompt = tuple({**{k: v for k, v in r.items() if k != "models"}, "models": [
        {k: v for k, v in x.items() if k not in ("act", "attr", "n")} for x in r["models"]]} for r in rows)
    return PatchingStudy(prompts=len(rows), seed=seed, templates=templates, processes=world.processes,
                         tokens=tokens, models=tuple(summaries), per_prompt=per_prompt)
