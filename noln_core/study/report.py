"""A study's files: ``study.json``, ``study.csv`` (one row per model) and ``study.md`` (the papers' layout).

``study.md`` puts the models side by side as the papers' tables do (original /
fine-tuned with LN / LN-free), one row per metric, and where a model is one of
the papers' models it adds the published numbers in their own rows, marked
"published", so that nobody mistakes them for this run's.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..registry import (
    BARONI_2025, HEIMERSHEIM_2024, PUBLISHED_CE_BARONI, PUBLISHED_CE_HEIMERSHEIM, REGISTRY, parse_spec,
)
from .results import StudyResult, to_json

# Published numbers (../shared/reference/PAPERS.md); columns: original, ln_control, ln_free.
_KIND_INDEX = {"original": 0, "ln_control": 1, "ln_free": 2}
_BARONI_OTHER = {  # (metric, size) -> (original, vanilla, LN-free), None where not published
    ("nmae", "small"): (0.4907, 0.5785, 0.0),
    ("sink_papers", "medium"): (0.553, None, 0.453),
    ("entropy", "medium"): (2.86, None, 2.53),
    ("ece", "medium"): (0.019, None, 0.034),
}


def published_corpus(corpus: str) -> str | None:
    """Which of the papers' corpora a study's corpus is, from its name."""
    c = corpus.lower()
    if "pile-filtered" in c or "pile_filtered" in c:
        return "Pile-filtered"
    if "pile" in c:
        return "Pile"
    if "openwebtext" in c or "owt" in c:
        return "OpenWebText"
    return None


def _known(source: str, revision: str | None):
    spec = source if revision is None else f"{source}@{revision}"
    if spec in REGISTRY:
        return REGISTRY[spec]
    try:
        repo, rev = parse_spec(spec)
    except Exception:
        return None
    for key in (f"{repo}@{rev}" if rev else repo, repo):
        if key in REGISTRY:
            return REGISTRY[key]
    bare = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
            "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}.get(repo)
    return REGISTRY.get(bare) if bare else None


def published(source: str, revision: str | None, corpus: str) -> dict[str, tuple[float, str]]:
    """The papers' numbers for a model (metric -> (value, citation)); empty when it is not one of theirs."""
    known = _known(source, revision)
    if known is None or known.kind not in _KIND_INDEX:
        return {}
    i, out = _KIND_INDEX[known.kind], {}
    name = published_corpus(corpus)
    if known.repo_id == "apollo-research/gpt2_noLN":
        if name in PUBLISHED_CE_HEIMERSHEIM:
            out["ce"] = (PUBLISHED_CE_HEIMERSHEIM[name][i], HEIMERSHEIM_2024)
        return out
    if name in PUBLISHED_CE_BARONI and known.size in PUBLISHED_CE_BARONI[name]:
        out["ce"] = (PUBLISHED_CE_BARONI[name][known.size][i], BARONI_2025)
    for (metric, size), values in _BARONI_OTHER.items():
        if size == known.size and values[i] is not None:
            out[metric] = (values[i], BARONI_2025)
    return out


def _f(x, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _ci(e: dict | None, digits: int = 4, scale: float = 1.0) -> str:
    if not e or e.get("mean") is None:
        return ""
    lo, hi = e["ci95"]
    text = _f(e["mean"] * scale, digits)
    if lo is not None and hi is not None:
        text += f" [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
    return text


def rows(doc: dict) -> list[dict]:
    """One flat row per model: the CSV's rows."""
    out = []
    for m in doc["models"]:
        def get(path, default=None):
            x = m
            for p in path:
                if x is None:
                    return default
                x = x.get(p) if isinstance(x, dict) else x[p]
            return x
        norms = get(["first_token_norm", "max"]) or []
        out.append({
            "name": m["name"], "source": m["source"], "revision": m["revision"], "ln_free": m["ln_free"],
            "n_sequences": m["n_sequences"], "n_tokens": m["n_tokens"],
            "ce_mean": get(["ce", "mean"]), "ce_ci95_lo": get(["ce", "ci95", 0]), "ce_ci95_hi": get(["ce", "ci95", 1]),
            "ce_median": get(["ce", "median"]),
            "entropy_mean": get(["entropy", "mean"]), "ece": get(["ece", "value"]),
            "ece_ci95_lo": get(["ece", "ci95", 0]), "ece_ci95_hi": get(["ece", "ci95", 1]),
            "nmae": get(["nmae", "mean"]), "nmae_ci95_lo": get(["nmae", "ci95", 0]),
            "nmae_ci95_hi": get(["nmae", "ci95", 1]), "nmae_definition": get(["nmae", "definition"]),
            "sink_rate_papers": get(["sink_rate", "papers", "mean"]),
            "sink_rate_gu2024": get(["sink_rate", "gu2024", "mean"]),
            "first_token_norm_max": max(norms) if norms else None,
            "exploding_positions": m["exploding_positions"],
        })
    return out


def markdown(doc: dict) -> str:
    """The study as a Markdown table, models as columns, with the papers' published numbers labelled."""
    models = doc["models"]
    head = "| | " + " | ".join(f"{m['name']}{' (LN-free)' if m['ln_free'] else ''}" for m in models) + " |"
    lines = [f"# Study: {doc['corpus']}", "",
             f"{doc['n_sequences']} sequences of {doc['seq_len']} tokens, "
             f"{'BOS first' if doc['bos'] else 'no BOS (the papers convention)'}, "
             f"{doc['processes']} process(es){'' if doc['complete'] else '; STOPPED EARLY, partial'}. "
             "Intervals are 95% over sequences.", "", head, "|---" * (len(models) + 1) + "|"]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("CE (nats) [95% CI]", [_ci(m["ce"]) for m in models])
    row("CE per-token median", [_f(m["ce"]["median"]) for m in models])
    row("Entropy (nats)", [_ci(m["entropy"]) for m in models])
    row("Calibration error (ECE)", [_ci({"mean": m["ece"]["value"], "ci95": m["ece"]["ci95"]}) if m["ece"] else ""
                                    for m in models])
    if any(m["nmae"] for m in models):
        row(f"DLA vs direct effect, NMAE % ({doc['settings']['nmae_target']})",
            [_ci(m["nmae"], 2, 100) for m in models])
    row("Sink rate % (papers' definition)", [_ci((m["sink_rate"] or {}).get("papers"), 1, 100) for m in models])
    row("Sink rate % (Gu et al. 2024)", [_ci((m["sink_rate"] or {}).get("gu2024"), 1, 100) for m in models])
    row("First-token residual norm, max over layers",
        [_f(max(m["first_token_norm"]["max"]), 1) if m["first_token_norm"] else "" for m in models])
    row("Exploding positions", [str(m["exploding_positions"]) for m in models])
    pubs = [published(m["source"], m["revision"], doc["corpus"]) for m in models]
    labels = {"ce": "CE", "nmae": "NMAE %", "sink_papers": "Sink rate %", "entropy": "Entropy", "ece": "ECE"}
    corpus = published_corpus(doc["corpus"])
    for metric, label in labels.items():
        if any(metric in p for p in pubs):
            scale = 100 if metric in ("nmae", "sink_papers") else 1
            cites = sorted({p[metric][1].split(",")[0] for p in pubs if metric in p})
            where = f", {corpus}" if metric == "ce" else ""
            row(f"*published: {label}{where} ({'; '.join(cites)})*",
                [f"*{_f(p[metric][0] * scale, 2 if scale == 100 else 4)}*" if metric in p else "" for p in pubs])
    if any(pubs):
        lines += ["", "Published rows are the papers' numbers for these model ids (PAPERS.md), measured on their "
                  "corpora and settings: NMAE over 1000 x 512-token Pile sequences, CE over 1024-token chunks."]
    for p in doc["pairs"]:
        lines += ["", f"**{p['a']} vs {p['b']}**: KL(A||B) {_ci(p['kl_ab'])}, KL(B||A) {_ci(p['kl_ba'])}, "
                  f"JS {_ci(p['js'])}, top-1 agreement {_ci(p['top1_agreement'])}"]
    return "\n".join(lines) + "\n"


def write_outputs(result: StudyResult, out: Path, positions: int = 16) -> dict:
    """Write ``study.json``, ``study.csv`` and ``study.md`` into ``out``; return the JSON document."""
    doc = to_json(result, positions)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1))
    table = rows(doc)
    with open(out / "study.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (out / "study.md").write_text(markdown(doc))
    return doc
