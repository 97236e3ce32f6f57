"""Guided tours: a teaching walk through the app, as data (a TOML file a teacher can copy and edit).

A tour is a title, an introduction and steps.  Each step sets the text (and the
answer, counterfactual and position), names the one figure that matters
(:data:`FIGURES`), and says what to notice and what to try, in Markdown with
``{placeholders}``.  The placeholders are **facts** computed from the live run
(:func:`step_facts`): nothing in a step's text is a hard-coded number.  A step's
``[[steps.weak]]`` entries add a sentence when a fact is below (or above) a
threshold, so that a tour stays true on small demo models where a phenomenon is
weak.  Models stay the app's (the demo trio offline, gpt2 and gpt2_noLN online)
unless the tour names its own.

Facts use the suffixes ``_a``, ``_b`` (and ``_c`` with a third model) for the
models in order; the names each figure provides are in :data:`FIGURES`.
"""

from __future__ import annotations

import math
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..analyses import attention, direct_logit_attribution, head_direct_effects, next_token, residual_norms
from ..errors import InputError
from ..paths import DATA_DIR

TOURS_DIR = DATA_DIR / "tours"
"""The shipped tours, one ``NAME.toml`` each."""

FIGURES: dict[str, tuple[str, ...]] = {
    "predictions": ("loss", "top", "agreement", "kl", "loss_gap"),
    "first-token-norm": ("first_norm", "other_norm", "first_ratio"),
    "dla": ("logit_diff", "dla_sum", "constant", "dla_error"),
    "dla-vs-direct-effect": ("nmae",),
    "attention-sinks": ("sink_rate", "sink_rate_papers"),
    "parting": ("max_loss_gap", "max_gap_token", "max_gap_position", "mean_kl"),
}
"""Each figure a step can show, and the facts (without model suffix) it provides."""

NEEDS_TARGET = {"dla", "dla-vs-direct-effect"}
"""Figures that need an answer and a counterfactual token."""

PAIR_FACTS = {"agreement", "kl", "loss_gap", "max_loss_gap", "max_gap_token", "max_gap_position", "mean_kl"}
"""Facts about models A and B together (no suffix)."""


class TourError(InputError):
    """A tour file that cannot be used; the message names the file, the step and what is wrong, in one line."""


@dataclass(frozen=True)
class Weak:
    """A sentence added when ``fact`` is below ``below`` (or above ``above``) on the live run."""

    fact: str
    text: str
    below: float | None = None
    above: float | None = None

    def holds(self, facts: dict) -> bool:
        value = facts.get(self.fact)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (self.below is not None and value < self.below) or (self.above is not None and value > self.above)


@dataclass(frozen=True)
class TourStep:
    title: str
    figure: str
    text: str
    notice: str
    """What to notice, Markdown with ``{fact}`` placeholders."""
    question: str
    """A question or a small exercise for the student (placeholders allowed)."""
    answer: str | None = None
    counterfactual: str | None = None
    position: int = -1
    weak: tuple[Weak, ...] = ()
    link_page: str | None = None
    """A page of the app to go further (e.g. ``study``)."""


@dataclass(frozen=True)
class Tour:
    name: str
    title: str
    introduction: str
    steps: tuple[TourStep, ...]
    models: tuple[str, ...] | None = None


def shipped_tours() -> dict[str, Path]:
    """``{name: path}`` of the tours shipped with the app."""
    return {p.stem: p for p in sorted(TOURS_DIR.glob("*.toml"))}


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _allowed(figure: str) -> set[str]:
    names = set()
    for fact in FIGURES[figure]:
        names |= {fact} if fact in PAIR_FACTS else {f"{fact}_{m}" for m in "abc"}
    return names


def parse_tour(text: str, name: str) -> Tour:
    """A :class:`Tour` from TOML text; any problem is a :class:`TourError` naming the place."""
    where = f"tour {name!r}"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TourError(f"{where} is not valid TOML: {err}") from None
    for key in ("title", "steps"):
        if key not in doc:
            raise TourError(f"{where} has no {key!r}")
    if not isinstance(doc["steps"], list) or not doc["steps"]:
        raise TourError(f"{where}: 'steps' must be a list of [[steps]] tables")
    models = doc.get("models")
    if models is not None and (not isinstance(models, list) or not 2 <= len(models) <= 3
                               or not all(isinstance(m, str) and m for m in models)):
        raise TourError(f"{where}: 'models' must list 2 or 3 model specs")
    steps = []
    for i, raw in enumerate(doc["steps"], 1):
        at = f"{where}, step {i}"
        if not isinstance(raw, dict):
            raise TourError(f"{at} is not a table")
        unknown = set(raw) - {"title", "figure", "text", "notice", "question", "answer", "counterfactual", "position",
                              "weak", "link_page"}
        if unknown:
            raise TourError(f"{at}: unknown key {sorted(unknown)[0]!r}")
        for key in ("title", "figure", "text", "notice", "question"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise TourError(f"{at}: {key!r} must be a non-empty string")
        if raw["figure"] not in FIGURES:
            raise TourError(f"{at}: unknown figure {raw['figure']!r} (one of {', '.join(FIGURES)})")
        if raw["figure"] in NEEDS_TARGET and not (raw.get("answer") and raw.get("counterfactual")):
            raise TourError(f"{at}: the {raw['figure']} figure needs an 'answer' and a 'counterfactual' token")
        position = raw.get("position", -1)
        if not isinstance(position, int) or isinstance(position, bool):
            raise TourError(f"{at}: 'position' must be an integer")
        allowed = _allowed(raw["figure"])
        weak = []
        for w in raw.get("weak", []):
            if not isinstance(w, dict) or not isinstance(w.get("fact"), str) or not isinstance(w.get("text"), str) \
                    or ("below" not in w and "above" not in w):
                raise TourError(f"{at}: each [[steps.weak]] needs 'fact', 'text' and 'below' or 'above'")
            if w["fact"] not in allowed:
                raise TourError(f"{at}: weak fact {w['fact']!r} is not one of this figure's facts")
            weak.append(Weak(w["fact"], w["text"], w.get("below"), w.get("above")))
        for key in ("notice", "question"):
            try:
                unknown_facts = _fields(raw[key]) - allowed
            except ValueError as err:
                raise TourError(f"{at}: {key!r} has a malformed placeholder ({err})") from None
            if unknown_facts:
                raise TourError(f"{at}: {key!r} uses {{{sorted(unknown_facts)[0]}}}, which the {raw['figure']} figure "
                                f"does not provide (it has: {', '.join(sorted(allowed))})")
        steps.append(TourStep(raw["title"], raw["figure"], raw["text"], raw["notice"], raw["question"],
                              raw.get("answer"), raw.get("counterfactual"), position, tuple(weak), raw.get("link_page")))
    return Tour(name, doc["title"], doc.get("introduction", ""), tuple(steps), tuple(models) if models else None)


def load_tour(name_or_path: str | Path) -> Tour:
    """A shipped tour by name, or a tour file by path."""
    shipped = shipped_tours()
    if isinstance(name_or_path, str) and name_or_path in shipped:
        path = shipped[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise TourError(f"no tour {str(name_or_path)!r}: the shipped ones are {', '.join(shipped) or 'none'}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise TourError(f"tour {path.name!r} is not UTF-8 text") from None
    return parse_tour(text, path.stem)


def step_facts(step: TourStep, result, analyse=None) -> dict[str, float | str]:
    """The facts of ``step``'s figure on a live run (see :data:`FIGURES`).

    ``analyse(fn)`` runs an analysis of ``result`` (default ``fn(result)``); the app passes its cached one, so the
    figure and the text share each analysis.
    """
    analyse = analyse or (lambda fn: fn(result))
    facts: dict[str, float | str] = {}
    letters = "abc"
    if step.figure in ("predictions", "parting"):
        nt = analyse(next_token)
        for letter, m in zip(letters, nt.models):
            facts[f"loss_{letter}"] = m.mean_loss
            facts[f"top_{letter}"] = m.top_tokens[0] if m.top_tokens else ""
        if nt.pairs:
            pair = nt.pairs[0]
            facts.update(agreement=100 * pair.agreement, kl=float(np.mean(pair.kl_ab)),
                         loss_gap=facts["loss_b"] - facts["loss_a"], mean_kl=float(np.mean(pair.kl_ab)))
            if len(pair.loss_diff):  # where B does worst against A
                i = int(np.argmax(pair.loss_diff))
                facts.update(max_loss_gap=float(pair.loss_diff[i]), max_gap_token=result.tokens[i + 1],
                             max_gap_position=i + 1)
    elif step.figure == "first-token-norm":
        for letter, m in zip(letters, analyse(residual_norms)):
            first = m.first_token_max
            other = float(np.median(m.hidden[:, 1:].max(axis=0))) if m.hidden.shape[1] > 1 else float("nan")
            facts.update({f"first_norm_{letter}": first, f"other_norm_{letter}": other,
                          f"first_ratio_{letter}": first / other if other else float("nan")})
    elif step.figure == "dla":
        for letter, d in zip(letters, analyse(direct_logit_attribution) or ()):
            facts.update({f"logit_diff_{letter}": d.logit_diff, f"dla_sum_{letter}": float(d.values.sum()),
                          f"constant_{letter}": d.constant, f"dla_error_{letter}": d.error})
    elif step.figure == "dla-vs-direct-effect":
        for letter, e in zip(letters, analyse(head_direct_effects) or ()):
            facts[f"nmae_{letter}"] = 100 * e.nmae
    elif step.figure == "attention-sinks":
        for letter, s in zip(letters, analyse(attention)):
            facts.update({f"sink_rate_{letter}": 100 * s.sink_rate, f"sink_rate_papers_{letter}": 100 * s.sink_rate_papers})
    return facts


class _Missing:
    """A fact this run cannot give (a third model's, an empty pair): shown as a dash, whatever the format."""

    def __format__(self, spec: str) -> str:
        return "—"


class _Facts(dict):
    def __missing__(self, key):
        return _Missing()


def render(template: str, facts: dict) -> str:
    """``template`` with its placeholders filled from ``facts`` (numbers keep their format spec)."""
    safe = {k: (_Missing() if isinstance(v, float) and not math.isfinite(v) else v) for k, v in facts.items()}
    try:
        return string.Formatter().vformat(template, (), _Facts(safe))
    except (ValueError, TypeError) as err:
        raise TourError(f"a placeholder of the step cannot be filled: {err}") from None


def step_text(step: TourStep, facts: dict) -> tuple[str, list[str], str]:
    """``(notice, weak sentences that hold, question)`` rendered for the live run."""
    return (render(step.notice, facts), [render(w.text, facts) for w in step.weak if w.holds(facts)],
            render(step.question, facts))
