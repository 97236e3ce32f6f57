"""The Tour page's shell: which tour, which step, applying a step to the state, and its one figure."""

from __future__ import annotations

import streamlit as st

from noln_core.analyses import attention, direct_logit_attribution, head_direct_effects, next_token, residual_norms
from noln_core.errors import InputError
from noln_core.tokenizer import decode_utf8
from noln_core.teaching.tour import MAX_TOUR_BYTES, Tour, TourError, TourStep, load_tour, parse_tour, shipped_tours
from noln_core.findings.patching import swapped_prompt
from noln_core.viz import figures, findings, tables
from pages.shell import cache, limits
from pages.shell.display import figure, md
from pages.shell.links import valid_model_spec
from pages.shell.runs import analysis, neuron_ablations, patchings, run_specs
from pages.shell.state import queue_state, request_state, set_state, state

_CUSTOM = "_custom_tour"
_APPLIED = "_tour_applied"
_ERROR = "_tour_error"
_AUTO = "_tour_auto"
_BEFORE = "_tour_before"
_LINKED = "_tour_linked"


def remember_link() -> None:
    """Once per session: whether the opening link named a tour."""
    if _LINKED not in st.session_state:
        st.session_state[_LINKED] = "tour" in st.query_params


class Inert(str):
    """A fact that is text (a token): Markdown-inert however the tour formats it, ``{x}`` or ``{x!r}``."""

    def __format__(self, spec: str) -> str:
        return md(format(str(self), spec))

    def __repr__(self) -> str:
        return md(repr(str(self)))


def chosen_tour() -> Tour | None:
    """The tour in use: an uploaded one (this session), else the state's shipped one; errors go to the sidebar."""
    custom = st.session_state.get(_CUSTOM)
    names = list(shipped_tours())
    with st.sidebar:
        st.subheader("Tour")
        options = names + ([f"{custom.name} (uploaded)"] if custom else [])
        current = f"{custom.name} (uploaded)" if custom and state().tour is None else (state().tour or names[0])
        picked = st.selectbox("Tour", options, index=options.index(current) if current in options else 0,
                              key="w_tour")
        st.file_uploader("Load a tour file (.toml)", type=["toml"], key="w_tour_upload", on_change=_uploaded,
                         help="Copy noln_core/data/tours/ln-free-story.toml, edit it, and load it here.")
        if _ERROR in st.session_state:
            st.error(md(st.session_state[_ERROR]), icon=":material/error:")
    if picked.endswith(" (uploaded)") and custom:
        if state().tour is not None:
            set_state(tour=None, step=1)
        return custom
    if picked != state().tour:
        set_state(tour=picked, step=1 if state().tour not in (None, picked) else state().step)
    try:
        return load_tour(picked, **tour_checks())
    except TourError as err:
        st.error(md(str(err)), icon=":material/error:")
        return None


def tour_checks() -> dict:
    """What this server requires of a tour's values: its text limit, and (hosted) registry models only."""
    hosted = limits.LIMITS.hosted
    return {"max_text_chars": limits.LIMITS.max_text_chars,
            "check_model": lambda spec: valid_model_spec(spec, allow_local=not hosted, registry_only=hosted)}


def _uploaded() -> None:
    file = st.session_state.get("w_tour_upload")
    if file is None:
        return
    name = file.name.removesuffix(".toml")[:60]
    try:
        data = file.getvalue()
        if len(data) > MAX_TOUR_BYTES:
            raise TourError(f"tour {name!r} is larger than {MAX_TOUR_BYTES // 1000} kB")
        tour = parse_tour(decode_utf8(data, f"the tour file {name!r}"), name, **tour_checks())
    except (TourError, InputError) as err:
        st.session_state[_ERROR] = str(err)
        return
    st.session_state.pop(_ERROR, None)
    st.session_state[_CUSTOM] = tour
    st.session_state.pop("w_tour", None)
    set_state(tour=None, step=1)


def _step_index(tour: Tour) -> int:
    """The state's step, within the tour (from 1)."""
    return min(max(state().step, 1), len(tour.steps))


def current_figure() -> str | None:
    """The figure of the step the state points at (for the sidebar's notebook), without drawing anything."""
    custom = st.session_state.get(_CUSTOM)
    try:
        tour = custom if custom is not None and state().tour is None else load_tour(
            state().tour or next(iter(shipped_tours())))
    except (TourError, StopIteration):
        return None
    return tour.steps[_step_index(tour) - 1].figure


def current_step(tour: Tour) -> tuple[int, TourStep]:
    index = _step_index(tour)
    if index != state().step:
        set_state(step=index)
    return index, tour.steps[index - 1]


def apply_step(tour: Tour, index: int, step: TourStep) -> None:
    """Set the step's text (answer, counterfactual, position, models) when the step is entered.

    Entered means: opened by a tour link, or by Back, Next or Start.  Opening the Tour page from the menu changes
    nothing until Start is pressed, and the text the student had is kept for *Restore my text*.  Once a step is set,
    the student may change anything; the step does not take it back.
    """
    mark = (tour.name, index)
    if st.session_state.get(_APPLIED) == mark:
        return
    wanted = {"text": step.text, "answer": step.answer, "counterfactual": step.counterfactual,
              "position": step.position}
    if tour.models:
        wanted.update(model_a=tour.models[0], model_b=tour.models[1],
                      model_c=tour.models[2] if len(tour.models) > 2 else None)
    s = state()
    if all(getattr(s, k) == v for k, v in wanted.items()):
        st.session_state[_APPLIED] = mark
        return
    if not (st.session_state.get(_AUTO) or linked_tour()):
        st.button(f"Start the tour at step {index}", key="tour_start", type="primary", on_click=_start,
                  help="Sets the text, answer and position of the step; 'Restore my text' brings yours back.")
        return
    st.session_state.setdefault(_BEFORE, {k: getattr(s, k) for k in wanted})
    st.session_state[_APPLIED] = mark
    request_state(**wanted)


def _start() -> None:
    st.session_state[_AUTO] = True


def restore_button() -> None:
    """In the sidebar: put back the text (and models) the student had before the tour."""
    before = st.session_state.get(_BEFORE)
    if before is None:
        return

    def restore() -> None:
        st.session_state.pop(_BEFORE, None)
        st.session_state[_AUTO] = False
        st.session_state.pop(_APPLIED, None)
        queue_state(**before)  # applied with the widgets reset, at the start of the rerun this click makes

    st.sidebar.button("Restore my text", key="tour_restore", on_click=restore,
                      help="Leave the tour's text and go back to what you had typed.")


def linked_tour() -> bool:
    """True when this session began with a link that names a tour (a shared step opens as it was shared)."""
    return bool(st.session_state.get(_LINKED))


def go(delta: int) -> None:
    st.session_state[_AUTO] = True
    set_state(step=state().step + delta)


def step_figure(step: TourStep, result) -> None:
    """The one figure the step is about (the same builders as the analysis pages)."""
    if step.figure == "predictions":
        nt = analysis(next_token)
        figure(figures.loss_strip(nt, result.tokens), "tour_loss", tables.per_token_frame(result, nt))
    elif step.figure == "parting":
        nt = analysis(next_token)
        if nt.pairs:
            figure(figures.divergence_chart(nt, result.tokens), "tour_divergence", tables.per_token_frame(result, nt))
    elif step.figure == "first-token-norm":
        norms = analysis(residual_norms)
        figure(figures.norm_heatmaps(norms, result.tokens, True), "tour_norms",
               tables.norms_frame(norms, result.tokens))
    elif step.figure == "dla":
        dlas = analysis(direct_logit_attribution)
        if dlas:
            figure(figures.dla_components_chart(dlas), "tour_dla", tables.dla_frame(dlas))
    elif step.figure == "dla-vs-direct-effect":
        effects = analysis(head_direct_effects)
        if effects:
            figure(figures.dla_vs_direct_effect(effects), "tour_dla_de")
    elif step.figure == "attention-sinks":
        summaries = analysis(attention)
        figure(figures.sink_heatmaps(summaries), "tour_sinks", tables.attention_frame(summaries))
    elif step.figure == "entropy-neurons":
        ablations = step_findings(result)("neurons")
        figure(findings.ablation_parts(ablations, result.tokens), "tour_neurons", findings.ablation_frame(ablations))
    elif step.figure == "patching" and result.target is not None:
        results = step_findings(result)("patching")
        figure(findings.patching_heatmaps(results, result.tokens), "tour_patching",
               findings.patching_frame(results, result.tokens))


def step_findings(result):
    """``findings(kind)`` for :func:`noln_core.teaching.tour.step_facts`: each model's ablation of its marked
    neurons, or patching of the text into its answer-swapped copy, through the app's caches (shared with the
    Entropy neurons and Patching pages)."""
    def compute(kind: str) -> list:
        if kind == "neurons":
            marked = tuple(cache.neuron_signature(*spec).marked for spec in run_specs())
            return neuron_ablations(marked, min(250, limits.LIMITS.means_max_sequences))
        answer, counterfactual = result.target.answer, result.target.counterfactual
        return patchings(swapped_prompt(result.text, answer, counterfactual), answer, counterfactual)

    return compute


def inert_facts(facts: dict) -> dict:
    return {k: Inert(v) if isinstance(v, str) else v for k, v in facts.items()}
