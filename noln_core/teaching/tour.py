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

A tour file may come from anyone (the Tour page takes uploads on a public
server), so its texts are not ``str.format`` templates: ``str.format`` follows
``.attr`` and ``[key]`` and would read the server's memory.  :class:`Template`
is a renderer of its own: a placeholder is ``{name}``, ``{name!r}`` or
``{name:spec}`` with ``name`` one of the step's facts and ``spec`` a plain
number format (no braces, width and precision of at most 3 digits,
:data:`SPEC`); ``{{`` and ``}}`` are literal braces; anything else is an error
found when the file is parsed, naming the file, the step and the placeholder.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    "entropy-neurons": ("via_ln", "neuron_loss", "neurons"),
    "patching": ("patch_nmae", "final_gap"),
    "parting": ("max_loss_gap", "max_gap_token", "max_gap_position", "mean_kl"),
}
"""Each figure a step can show, and the facts (without model suffix) it provides."""

NEEDS_TARGET = {"dla", "dla-vs-direct-effect", "patching"}
"""Figures that need an answer and a counterfactual token."""

PAIR_FACTS = {"agreement", "kl", "loss_gap", "max_loss_gap", "max_gap_token", "max_gap_position", "mean_kl"}
"""Facts about models A and B together (no suffix)."""


class TourError(InputError):
    """A tour file that cannot be used; the message names the file, the step and what is wrong, in one line."""


MAX_TOUR_BYTES = 256_000
"""A tour file larger than this is refused before it is parsed."""
MAX_STEPS = 50
MAX_WEAK = 10
SPEC = re.compile(r"(?:[ .0*_-]?[<>^=])?[+ -]?#?0?[0-9]{0,3}[,_]?(?:\.[0-9]{1,3})?[deEfFgGs%]?")
"""The format specs a placeholder may use: fill and align, sign, width and precision of at most 3 digits, grouping
and a number type: enough for ``{loss_a:.2f}``, ``{first_norm_a:,.0f}`` or ``{x:+.1e}``, never a brace."""
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_PLACEHOLDER = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,60})(?:!([rs]))?(?::(.*))?", re.S)


@dataclass(frozen=True)
class Placeholder:
    name: str
    conversion: str | None
    spec: str


class Template:
    """A tour text with ``{fact}`` placeholders, parsed once and checked against the facts it may use."""

    def __init__(self, text: str, allowed: set[str], where: str):
        """``where`` names the text in errors (``tour 'x', step 3, notice``)."""
        self.text = text
        self.parts: list[str | Placeholder] = []
        pos = 0
        for m in _TOKEN.finditer(text):
            self.parts.append(text[pos:m.start()])
            pos = m.end()
            token = m.group(0)
            if token in ("{{", "}}"):
                self.parts.append(token[0])
                continue
            if m.group(1) is None:
                raise TourError(f"{where} has a lone {token!r}: write {token * 2} for a literal brace")
            inner = _PLACEHOLDER.fullmatch(m.group(1))
            if inner is None:
                raise TourError(f"{where} has a malformed placeholder {_short(token)}: use {{fact}} or "
                                "{fact:.2f}")
            name, conversion, spec = inner.group(1), inner.group(2), inner.group(3) or ""
            if not SPEC.fullmatch(spec):
                raise TourError(f"{where}: the placeholder {_short(token)} has a format spec this tool does not "
                                "allow (a number format such as .2f, +.1e or ,.0f; width and precision of at most "
                                "3 digits)")
            if name not in allowed:
                raise TourError(f"{where} uses {{{name}}}, which this figure does not provide (it has: "
                                f"{', '.join(sorted(allowed)) or 'no facts'})")
            self.parts.append(Placeholder(name, conversion, spec))
        self.parts.append(text[pos:])

    @property
    def fields(self) -> set[str]:
        return {p.name for p in self.parts if isinstance(p, Placeholder)}

    def render(self, facts: dict, where: str = "the step") -> str:
        """The text with each placeholder filled (a dash for a fact the run cannot give)."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = facts.get(part.name)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                out.append("—")
                continue
            if part.conversion == "r":
                value = repr(value)
            elif part.conversion == "s":
                value = str(value)
            try:
                out.append(format(value, part.spec))
            except (ValueError, TypeError) as err:
                raise TourError(f"{where}: the placeholder {{{part.name}:{part.spec}}} cannot format "
                                f"{type(value).__name__} {_short(str(value))} ({err})") from None
        return "".join(out)


def _short(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "…")


@dataclass(frozen=True)
class Weak:
    """A sentence added when ``fact`` is below ``below`` (or above ``above``) on the live run."""

    fact: str
    text: Template
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
    """The text the models read (not a template)."""
    notice: Template
    """What to notice, Markdown with ``{fact}`` placeholders."""
    question: Template
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


def _allowed(figure: str) -> set[str]:
    names = set()
    for fact in FIGURES[figure]:
        names |= {fact} if fact in PAIR_FACTS else {f"{fact}_{m}" for m in "abc"}
    return names


def _number(value, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TourError(f"{what} must be a number")
    return float(value)


def _plain(doc: dict, key: str, where: str, required: bool = True, empty_ok: bool = False) -> str:
    """A string field that holds no placeholder (literal braces doubled)."""
    value = doc.get(key, None if required else "")
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise TourError(f"{where}: {key!r} must be a{' non-empty' if not empty_ok else ''} string")
    return Template(value, set(), f"{where}, {key}").render({})


def parse_tour(text: str, name: str, *, max_text_chars: int = 20_000,
               check_model: Callable[[str], str | None] | None = None) -> Tour:
    """A :class:`Tour` from TOML text; any problem is a :class:`TourError` naming the place.

    Every text is checked here, once: the placeholders of ``notice``, ``question`` and the ``[[steps.weak]]``
    texts against the step's figure, the titles and introduction for having none; a step's ``text`` against
    ``max_text_chars``, its models against ``check_model`` (a one-line problem or None: a hosted server allows
    registry models only), its position and thresholds for being numbers.
    """
    where = f"tour {name!r}"
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TOUR_BYTES:
        raise TourError(f"{where} is larger than {MAX_TOUR_BYTES // 1000} kB")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TourError(f"{where} is not valid TOML: {err}") from None
    except RecursionError:
        raise TourError(f"{where} is nested too deeply to be a tour") from None
    for key in ("title", "steps"):
        if key not in doc:
            raise TourError(f"{where} has no {key!r}")
    unknown = set(doc) - {"title", "introduction", "steps", "models"}
    if unknown:
        raise TourError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    title = _plain(doc, "title", where)
    introduction = _plain(doc, "introduction", where, required=False, empty_ok=True)
    if not isinstance(doc["steps"], list) or not doc["steps"]:
        raise TourError(f"{where}: 'steps' must be a list of [[steps]] tables")
    if len(doc["steps"]) > MAX_STEPS:
        raise TourError(f"{where} has {len(doc['steps'])} steps, more than {MAX_STEPS}")
    models = doc.get("models")
    if models is not None:
        if not isinstance(models, list) or not 2 <= len(models) <= 3 or not all(isinstance(m, str) and m
                                                                                 for m in models):
            raise TourError(f"{where}: 'models' must list 2 or 3 model specs")
        for spec in models:
            problem = check_model(spec) if check_model else None
            if problem:
                raise TourError(f"{where}: model {_short(spec)} cannot be used here: {problem}")
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
            raise TourError(f"{at}: unknown figure {_short(raw['figure'])} (one of {', '.join(FIGURES)})")
        if len(raw["text"]) > max_text_chars:
            raise TourError(f"{at}: 'text' has {len(raw['text']):,} characters, more than the {max_text_chars:,} "
                            "this server takes")
        for key in ("answer", "counterfactual"):
            if key in raw and (not isinstance(raw[key], str) or not 0 < len(raw[key]) <= 200):
                raise TourError(f"{at}: {key!r} must be a token of 1 to 200 characters")
        if raw["figure"] in NEEDS_TARGET and not (raw.get("answer") and raw.get("counterfactual")):
            raise TourError(f"{at}: the {raw['figure']} figure needs an 'answer' and a 'counterfactual' token")
        position = raw.get("position", -1)
        if not isinstance(position, int) or isinstance(position, bool) or not -100_000 <= position < 100_000:
            raise TourError(f"{at}: 'position' must be an integer")
        link_page = raw.get("link_page")
        if link_page is not None and (not isinstance(link_page, str) or not re.fullmatch(r"[a-z-]{1,40}", link_page)):
            raise TourError(f"{at}: 'link_page' must be the name of a page, such as 'study'")
        allowed = _allowed(raw["figure"])
        weak_raw = raw.get("weak", [])
        if not isinstance(weak_raw, list) or len(weak_raw) > MAX_WEAK:
            raise TourError(f"{at}: 'weak' must be at most {MAX_WEAK} [[steps.weak]] tables")
        weak = []
        for j, w in enumerate(weak_raw, 1):
            if not isinstance(w, dict) or not isinstance(w.get("fact"), str) or not isinstance(w.get("text"), str) \
                    or ("below" not in w and "above" not in w) or set(w) - {"fact", "text", "below", "above"}:
                raise TourError(f"{at}: each [[steps.weak]] needs 'fact', 'text' and 'below' or 'above', and "
                                "nothing else")
            if w["fact"] not in allowed:
                raise TourError(f"{at}: weak fact {_short(w['fact'])} is not one of this figure's facts")
            weak.append(Weak(w["fact"], Template(w["text"], allowed, f"{at}, weak text {j}"),
                             _number(w.get("below"), f"{at}: weak {j}'s 'below'"),
                             _number(w.get("above"), f"{at}: weak {j}'s 'above'")))
        steps.append(TourStep(_plain(raw, "title", at), raw["figure"], raw["text"],
                              Template(raw["notice"], allowed, f"{at}, notice"),
                              Template(raw["question"], allowed, f"{at}, question"),
                              raw.get("answer"), raw.get("counterfactual"), position, tuple(weak), link_page))
    return Tour(name, title, introduction, tuple(steps), tuple(models) if models else None)


def load_tour(name_or_path: str | Path, **checks) -> Tour:
    """A shipped tour by name, or a tour file by path (``checks``: see :func:`parse_tour`)."""
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
    return parse_tour(text, path.stem, **checks)


def step_facts(step: TourStep, result, analyse=None, findings=None) -> dict[str, float | str]:
    """The facts of ``step``'s figure on a live run (see :data:`FIGURES`).

    ``analyse(fn)`` runs an analysis of ``result`` (default ``fn(result)``); the app passes its cached one, so the
    figure and the text share each analysis.  The papers' other findings need the models themselves:
    ``findings("neurons")`` gives each model's :class:`~noln_core.findings.neurons.NeuronAblation` of its marked
    neurons on the run's tokens, ``findings("patching")`` each model's
    :class:`~noln_core.findings.patching.Patching` of the text into its answer-swapped copy; without ``findings``
    those steps' facts are missing (shown as a dash).
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
    elif step.figure == "entropy-neurons" and findings is not None:
        from ..findings.neurons import ablation_summary

        for letter, a in zip(letters, findings("neurons")):
            joint = ablation_summary(a)[-1]
            facts.update({f"via_ln_{letter}": 100 * joint.via_ln_share, f"neuron_loss_{letter}": joint.loss_mean,
                          f"neurons_{letter}": ", ".join(str(n) for n in a.neurons)})
    elif step.figure == "patching" and findings is not None:
        for letter, p in zip(letters, findings("patching")):
            facts.update({f"patch_nmae_{letter}": 100 * p.resid_agreement.nmae,
                          f"final_gap_{letter}": float(abs(p.resid_attr[-1, -1] - p.resid_act[-1, -1]))})
    elif step.figure == "attention-sinks":
        for letter, s in zip(letters, analyse(attention)):
            facts.update({f"sink_rate_{letter}": 100 * s.sink_rate, f"sink_rate_papers_{letter}": 100 * s.sink_rate_papers})
    return facts


def render(template: Template | str, facts: dict, where: str = "the step") -> str:
    """``template`` with its placeholders filled from ``facts`` (a string is parsed first, any fact allowed)."""
    if isinstance(template, str):
        template = Template(template, {p.group(1) for p in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)", template)}, where)
    return template.render(facts, where)


def step_text(step: TourStep, facts: dict, where: str = "the step") -> tuple[str, list[str], str]:
    """``(notice, weak sentences that hold, question)`` rendered for the live run."""
    return (step.notice.render(facts, where), [w.text.render(facts, where) for w in step.weak if w.holds(facts)],
            step.question.render(facts, where))
