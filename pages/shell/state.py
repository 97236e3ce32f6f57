"""The session's :class:`~pages.shell.links.AppState`: in ``st.session_state``, mirrored in the URL.

Every widget whose value a link should restore is bound to a field of the
state with :func:`bound`: its value starts from the state and writes back to
it in an ``on_change`` callback, so the state (and the URL) are up to date
before the script reruns.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import streamlit as st

from pages.shell import limits
from pages.shell.links import AppState, parse_query, to_query

_STATE = "app_state"
_LINK_PAGE = "_link_page"
_NOTES_SHOWN = "_link_notes_shown"


def state() -> AppState:
    return st.session_state[_STATE]


def set_state(**changes: Any) -> None:
    st.session_state[_STATE] = replace(state(), **changes)


def init_state() -> None:
    """Once per session: the state from the link's query parameters (validated like widgets)."""
    if _STATE not in st.session_state:
        params = st.query_params.to_dict()
        st.session_state[_STATE] = parse_query(params, allow_local=not limits.LIMITS.hosted, registry_only=limits.LIMITS.hosted,
                                               max_text_chars=limits.LIMITS.max_text_chars)
        st.session_state[_NOTES_SHOWN] = False
        st.session_state[_LINK_PAGE] = state().page if "page" in params else None


_PENDING = "_pending_state"
_WIDGETS = ("w_text", "w_position", "w_answer", "w_counterfactual", "w_answer_custom", "w_counterfactual_custom",
            "w_model_a", "w_model_b", "w_model_c", "w_add_c", "w_preset")


def queue_state(**changes: Any) -> None:
    """A state change applied at the start of the next run, before the widgets it touches are drawn."""
    st.session_state[_PENDING] = changes


def request_state(**changes: Any) -> None:
    """Change the state from a page, after the sidebar's widgets were drawn: queued, then rerun."""
    queue_state(**changes)
    st.rerun()


def apply_pending() -> None:
    """At the start of a run: a page's requested change, with the widgets it touches reset to follow the state."""
    changes = st.session_state.pop(_PENDING, None)
    if changes:
        set_state(**changes)
        for key in _WIDGETS:
            st.session_state.pop(key, None)


def linked_page() -> str | None:
    """The page a link asked for, once per session (then None)."""
    return st.session_state.pop(_LINK_PAGE, None)


def unshown_link_notes() -> tuple[str, ...]:
    """Why parts of the link were ignored: returned once per session."""
    if st.session_state.get(_NOTES_SHOWN, True):
        return ()
    st.session_state[_NOTES_SHOWN] = True
    return state().notes


def sync_url() -> None:
    """Mirror the state into the URL's query parameters."""
    wanted = to_query(state())
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


def source_layer(value: int | None, n_layers: int) -> int:
    """The Attribution page's source-token layer: a stored value clamped into the model, the last layer if none.

    The page's slider and the exports both read it, so the first download shows the layer on screen."""
    return n_layers - 1 if value is None else min(max(int(value), 0), n_layers - 1)


def bound(field: str, draw: Callable[..., Any], *args: Any, clamp: Callable[[Any], Any] | None = None,
          **kwargs: Any) -> Any:
    """Draw a widget whose value is the state's ``field``; a change writes back before the rerun.

    ``clamp`` maps a stored value into the widget's current range (a link's
    layer number on a smaller model, say).
    """
    key = f"w_{field}"
    value = getattr(state(), field)
    if clamp is not None:
        value = clamp(value)
    if st.session_state.get(key) != value:
        st.session_state[key] = value

    def write_back() -> None:
        set_state(**{field: st.session_state[key]})

    result = draw(*args, key=key, on_change=write_back, **kwargs)
    if result != getattr(state(), field):
        set_state(**{field: result})
    return result
