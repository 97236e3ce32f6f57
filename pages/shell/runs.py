"""Load the models and run them once for the current inputs; hand the run to the page.

``prepare`` is called by ``app.py`` on every rerun, before the page: it draws
the sidebar's inputs, loads the models (each failure an error box, the inputs
kept as typed), runs them once through the run cache, then draws the token
pickers from that run.  A page calls :func:`current_run` and :func:`analysis`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import streamlit as st
import torch

from noln_core import LoadedModel, NolnError, RunResult
from pages.shell import cache, sidebar
from pages.shell.display import error, md
from pages.shell.state import state, unshown_link_notes

_RUN = "_run"
_SPECS = "_model_specs"
"""The current run's models as (spec, device, dtype): a session keeps no model itself, so the model store's budget
counts every model alive (:class:`noln_core.store.ModelStore`)."""


def _load_models() -> tuple[LoadedModel, ...] | None:
    s = state()
    models = []
    specs = [x for x in (s.model_a, s.model_b, s.model_c) if x]
    try:
        cache.check_together(specs, s.device, s.dtype)
    except NolnError as err:
        error(str(err))
        return None
    for spec in specs:
        try:
            models.append(cache.load(spec, s.device, s.dtype))
        except NolnError as err:
            error(str(err), prefix=f"Could not load **{md(spec)}**: ")
            return None
        except (torch.OutOfMemoryError, MemoryError):
            st.error(f"Out of memory loading {md(spec)}: pick a smaller model, bfloat16, or the CPU.",
                     icon=":material/error:")
            return None
        except Exception as err:  # a disk or network failure we did not foresee: say so, keep the session usable
            first = str(err).splitlines()[0] if str(err) else ""
            error(f"unexpected {type(err).__name__}: {first}", prefix=f"Could not load **{md(spec)}**: ")
            return None
    return tuple(models)


def prepare() -> RunResult | None:
    """Sidebar, models and the one run for the current state; None (after an error box) when that failed."""
    st.session_state.pop(_RUN, None)
    sidebar.inputs()
    models = _load_models()
    if models is None:
        return None
    if not state().text:
        st.error("The text is empty: type something in the sidebar, or pick a preset.", icon=":material/edit:")
        return None
    sidebar.position_picker(models)
    s = state()
    try:
        key, result = cache.run(models, s.text, s.answer, s.counterfactual, s.position, s.bos)
    except NolnError as err:
        error(str(err), icon=":material/warning:")
        return None
    except (torch.OutOfMemoryError, MemoryError):
        st.error("Out of memory running the models: use shorter text, fewer models, bfloat16 or the CPU.",
                 icon=":material/error:")
        return None
    sidebar.token_pickers(result)
    sidebar.tokenisation_inspector(models)
    st.session_state[_RUN] = (key, result)
    st.session_state[_SPECS] = tuple((spec, s.device, s.dtype) for spec in (s.model_a, s.model_b, s.model_c) if spec)
    return result


def current_run() -> RunResult | None:
    """The current run for a page, showing its warnings; None (with a message) when there is none."""
    if _RUN not in st.session_state:
        st.info("Choose models and a text in the sidebar to see this page.")
        return None
    result = st.session_state[_RUN][1]
    for warning in result.warnings:
        st.warning(md(warning), icon=":material/warning:")
    for note in unshown_link_notes():
        st.warning(f"Link: {md(note)}", icon=":material/link:")
    return result


def head_patterns(layer: int, head: int) -> list[np.ndarray]:
    """One head's attention pattern in every model of the current run (computed once, then cached with it); the
    models come from the store, as the run's did."""
    key, result = st.session_state[_RUN]
    return cache.head_patterns(lambda: tuple(cache.load(*spec) for spec in st.session_state[_SPECS]), key, result,
                               layer, head)


def analysis(fn: Callable[..., Any], **options: Any) -> Any:
    """A cached analysis of the current run: pass the function, e.g. ``analysis(next_token)``, and its options."""
    key, result = st.session_state[_RUN]
    return cache.analysis(fn, key, result, **options)


def run_specs() -> tuple[tuple[str, str, str], ...]:
    """The current run's models as (spec, device, dtype), in the run's order."""
    return st.session_state[_SPECS]


def neuron_ablations(neurons: tuple[tuple[int, ...], ...], sequences: int) -> list:
    """Each model's mean ablation of its neurons on the current run's text (cached with the run)."""
    key, result = st.session_state[_RUN]
    return cache.neuron_ablations(run_specs(), key, result, neurons, sequences)


def patchings(corrupted: str, answer: str, counterfactual: str) -> list:
    """Each model's patching of the current text into ``corrupted`` (cached with the run)."""
    key, result = st.session_state[_RUN]
    return cache.patchings(run_specs(), key, result, corrupted, answer, counterfactual)
