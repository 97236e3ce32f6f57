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

from .published import HEIMERSHEIM_NOTE, cites_heimersheim, matches, other_corpora
from .results import StudyResult, to_json

LABELS = {"ce": ("CE", 1, 4), "ce_median": ("CE per-token median", 1, 4), "ce_p2.5": ("CE per-token 2.5th percentile", 1, 4),
          "ce_p97.5": ("CE per-token 97.5th percentile", 1, 4), "ce_p99.95": ("CE per-token 99.95th percentile", 1, 4),
          "entropy": ("Entropy", 1, 4), "ece": ("ECE", 1, 4), "nmae": ("NMAE %", 100, 2),
          "sink_papers": ("Sink rate % (papers' definition)", 100, 1)}
"""Published metric -> (label, scale, digits)."""


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
    row("CE per-token 2.5th / 97.5th / 99.95th percentile",
        [" / ".join(_f(m["ce"]["percentiles"].get(k)) for k in ("2.5", "97.5", "99.95")) for m in models])
    row("Entropy (nats)", [_ci(m["entropy"]) for m in models])
    row("Calibration error (ECE)", [_ci({"mean": m["ece"]["value"], "ci95": m["ece"]["ci95"]}) if m["ece"] else ""
                                    for m in models])
    if any(m["nmae"] for m in models):
        row(f"DLA vs direct effect, NMAE % ({doc['settings']['nmae_target']})",
            [_ci(m["nmae"], 2, 100) for m in models])
    row("Sink rate % (papers' definition)", [_ci((m["sink_rate"] or {}).get("papers"), 1, 100) for m in models])
    row("Sink rate % (Gu et al. 2024)", [_ci((m["sink_rate"] or {}).get("gu2024"), 1, 100) for m in models])
    row("First-token residual norm: largest mean over hooks", [_f(max(m["first_token_norm"]["mean"]), 1)
                                                               if m["first_token_norm"] else "" for m in models])
    row("First-token residual norm: largest over sequences", [_f(max(m["first_token_norm"]["max"]), 1)
                                                              if m["first_token_norm"] else "" for m in models])
    row("Exploding positions", [str(m["exploding_positions"]) for m in models])
    notes = _published(doc, row)
    if notes:
        lines += [""] + [f"* {n}" for n in notes]
    for p in doc["pairs"]:
        lines += ["", f"**{p['a']} vs {p['b']}**: KL(A||B) {_ci(p['kl_ab'])}, KL(B||A) {_ci(p['kl_ba'])}, "
                  f"JS {_ci(p['js'])}, top-1 agreement {_ci(p['top1_agreement'])}"]
    return "\n".join(lines) + "\n"


def _published(doc: dict, row) -> list[str]:
    """Add the papers' numbers for this study's settings as rows; return notes on those left out, and why."""
    notes, shown = [], set()
    for match in matches(doc):
        figure = match.figure
        if not match.same_settings:
            notes.append(f"Published numbers for these models ({figure.name}: {figure.title}) are not shown: this "
                         f"study differs in {'; '.join(match.differences)}. `study --reproduce {figure.name}` "
                         "measures them as the papers did.")
            continue
        shown.add(figure.name)
        for metric, values in figure.published.items():
            label, scale, digits = LABELS[metric]
            cells = [f"*{_f(values[c] * scale, digits)}*" if c is not None and values[c] is not None else ""
                     for c in match.columns]
            if any(cells):
                row(f"*published: {label} ({figure.cite}, {figure.name})*", cells)
        for metric, by_pair in figure.published_pairs.items():
            index = {m["name"]: i for i, m in reversed(list(enumerate(doc["models"])))}
            for p in doc["pairs"]:
                ca, cb = match.columns[index[p["a"]]], match.columns[index[p["b"]]]
                key = tuple(sorted((ca, cb))) if None not in (ca, cb) else None
                if key in by_pair:
                    notes.append(f"Published {metric.upper()} of {p['a']} vs {p['b']} ({figure.name}): "
                                 f"{by_pair[key]:.4f}; this study: {_ci(p[metric])}.")
        notes.append(f"{figure.name}: {figure.source}." + (f" {figure.note}" if figure.note else ""))
    others = [name for name in other_corpora(doc) if name not in shown]
    if others:
        notes.append("The papers also published numbers for these models on other corpora (" + ", ".join(others) +
                     "): `study --reproduce NAME` measures each as they did.")
    if cites_heimersheim(doc):
        notes.append(HEIMERSHEIM_NOTE)
    return notes


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
