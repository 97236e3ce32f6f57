"""The app's single point of access to noln_core: caching, session state, the shared sidebar, page helpers.

All ``st.cache_*`` decorators and session-state keys live here, so pages stay
thin: a page calls :func:`current_run`, an analysis accessor and the figure
helpers, and explains what it shows.

Caching:
- models: one :class:`~noln_core.store.ModelStore` per process (``st.cache_resource``),
  keyed on (spec, device, dtype), holding ``LIMITS.max_models`` at once (least
  recently used evicted), loading one at a time; a failed load is not kept,
  so a retry works;
- runs: ``st.cache_resource`` keyed on every input of ``compare``.  A
  :class:`~noln_core.compare.RunResult` is frozen and its arrays read-only, so
  sessions can share one object without copying it;
- analyses: ``st.cache_data``, bounded, keyed on the run's key.
Switching pages or flipping a display toggle therefore never reruns a model.
"""

from __future__ import annotations

import json
import platform
from dataclasses import replace
from typing import Any

import pandas as pd
import streamlit as st
import torch

import noln_core
from noln_core import (
    LoadedModel, NolnError, RunResult, attention, compare, direct_logit_attribution, head_direct_effects,
    logit_difference, next_token, residual_norms,
)
from noln_core.compare import token_pieces, tokenize
from noln_core.registry import DEMO_PREFIX, REGISTRY, lookup, parse_spec
from noln_core.store import ModelStore
from pages._links import (
    DEVICES, DTYPES, PRESETS, AppState, display_name, load_limits, parse_query, share_link, to_query, valid_model_spec,
)

LIMITS = load_limits()
MAX_RUNS = 16
CUSTOM = "Other (repo id or local directory)…"
PLOT_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}
ALLOW_LOCAL = not LIMITS.hosted
REGISTRY_ONLY = LIMITS.hosted


# --------------------------------------------------------------------------- caching

def _load_model(spec: str, device: str, dtype: str) -> LoadedModel:
    if REGISTRY_ONLY and spec not in REGISTRY:
        raise noln_core.ModelLoadError(f"{spec} is not in the registry; only registry models are allowed here")
    return noln_core.load_model(spec, device=device, dtype=dtype, allow_local=ALLOW_LOCAL, name=display_name(spec))


@st.cache_resource(show_spinner=False)
def model_store() -> ModelStore:
    """The process's models, shared by every session."""
    return ModelStore(LIMITS.max_models, _load_model)


def load(spec: str, device: str, dtype: str) -> LoadedModel:
    """A ready model from the store, loading it (with a spinner) the first time."""
    with st.spinner(f"Loading {spec} (downloading if needed; loads are queued one at a time)…"):
        return model_store().get(spec, device, dtype)


RunKey = tuple


@st.cache_resource(max_entries=MAX_RUNS, show_spinner=False)
def _run(key: RunKey, _models: tuple[LoadedModel, ...]) -> RunResult:
    _, text, answer, counterfactual, position, bos = key
    return compare(list(_models), text, answer, counterfactual, position, bos, max_tokens=LIMITS.max_tokens)


def run(models: tuple[LoadedModel, ...], text: str, answer, counterfactual, position: int, bos: bool) -> tuple[RunKey, RunResult]:
    # Keyed on what the models are (source, revision, commit), not their display names, which need not be unique.
    identity = tuple((m.info.source, m.info.revision, m.info.commit, m.info.device, m.info.dtype) for m in models)
    key = (identity, text, answer, counterfactual, position, bos)
    with st.spinner("Running the models…"):
        return key, _run(key, models)


@st.cache_data(max_entries=64, show_spinner=False)
def _analysis(kind: str, key: RunKey, _result: RunResult) -> Any:
    functions = {
        "next_token": next_token, "logit_diff": logit_difference, "norms": residual_norms,
        "dla": direct_logit_attribution, "direct_effect": head_direct_effects, "attention": attention,
    }
    return functions[kind](_result)


def analysis(kind: str) -> Any:
    """A cached analysis of the current run: next_token, logit_diff, norms, dla, direct_effect or attention."""
    key, result = st.session_state["_run"]
    return _analysis(kind, key, result)


# --------------------------------------------------------------------------- state

def state() -> AppState:
    return st.session_state["app_state"]


def _set_state(**changes) -> None:
    st.session_state["app_state"] = replace(state(), **changes)


def init_state() -> None:
    """Once per session: the state from the link's query parameters (validated like widgets)."""
    if "app_state" not in st.session_state:
        params = st.query_params.to_dict()
        st.session_state["app_state"] = parse_query(params, allow_local=ALLOW_LOCAL, registry_only=REGISTRY_ONLY,
                                                    max_text_chars=LIMITS.max_text_chars)
        st.session_state["_link_notes_shown"] = False
        st.session_state["_link_page"] = state().page if "page" in params else None


def linked_page() -> str | None:
    """The page a link asked for, once per session (then None)."""
    return st.session_state.pop("_link_page", None)


def entered_through_app() -> None:
    """app.py marks each run, so that a page can tell it was not started by Streamlit's legacy ``pages/`` runner."""
    st.session_state["_via_app"] = True


def page(name: str) -> None:
    """Called first by every page: record it, mirror the state into the URL, offer the link and the manifest.

    Streamlit runs a ``pages/`` script on its own (its pre-``st.navigation``
    mode) for the first request of a fresh process, and in ``AppTest``.  Such
    a run is sent through app.py, which then opens this page.
    """
    if not st.session_state.pop("_via_app", False):
        st.session_state["_link_page"] = name
        st.switch_page("app.py")
    _set_state(page=name)
    wanted = to_query(state())
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)
    share_and_export()


def share_url() -> str:
    base = ""
    try:
        url = st.context.url or ""
        base = url.split("?", 1)[0].rsplit("/", 1)[0] if url.count("/") > 2 else url
    except Exception:  # older Streamlit, or AppTest: a relative link still works
        base = ""
    return share_link(state(), base)


# --------------------------------------------------------------------------- sidebar

def _model_picker(label: str, slot: str) -> str | None:
    current = getattr(state(), slot)
    options = list(REGISTRY) + ([] if REGISTRY_ONLY else [CUSTOM])
    if current is None:
        index = 0
    elif current in REGISTRY:
        index = options.index(current)
    else:
        index = options.index(CUSTOM) if CUSTOM in options else 0

    def describe(spec: str) -> str:
        entry = REGISTRY.get(spec)
        if entry is not None and spec.startswith(DEMO_PREFIX):
            return f"demo (offline) · {spec.removeprefix(DEMO_PREFIX)}"
        return f"{spec}  ·  {entry.kind.replace('_', ' ')}" if entry else spec

    choice = st.selectbox(label, options, index=index, format_func=describe, key=f"w_{slot}")
    if choice == CUSTOM:
        typed = st.text_input(f"{label}: repo id[@revision]" + (" or local directory" if ALLOW_LOCAL else ""),
                              value=current if current and current not in REGISTRY else "", key=f"w_{slot}_custom",
                              max_chars=512, placeholder="owner/name@revision")
        if not typed.strip():
            return current if current not in REGISTRY else None
        problem = valid_model_spec(typed, ALLOW_LOCAL, REGISTRY_ONLY)
        if problem:
            st.error(f"{label}: {md(problem)}")
            return current if current and current not in REGISTRY else None
        return typed.strip()
    entry = REGISTRY[choice]
    st.caption(f"{entry.description}. Cite: {entry.citation}.")
    return choice


def _device_options() -> list[str]:
    options = ["auto", "cpu"]
    if torch.cuda.is_available():
        options.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        options.append("mps")
    return [d for d in DEVICES if d in options]


def sidebar() -> tuple[LoadedModel, ...] | None:
    """The shared sidebar: models, device, prompt, tokens.  Returns the loaded models, or None after an error box."""
    s = state()
    with st.sidebar:
        st.subheader("Models")
        model_a = _model_picker("Model A", "model_a")
        model_b = _model_picker("Model B", "model_b")
        add_control = st.checkbox("Add a third model (the fine-tuned-with-LN control)", value=s.model_c is not None,
                                  key="w_add_c", help="Separates the effect of removing LN from ordinary fine-tuning drift.")
        model_c = None
        if add_control:
            if s.model_c is None:
                entry = lookup(*parse_spec(model_b)) if model_b else None
                if entry and entry.control:
                    _set_state(model_c=entry.control)
            model_c = _model_picker("Model C", "model_c")
        devices = _device_options()
        col1, col2 = st.columns(2)
        device = col1.selectbox("Device", devices, index=devices.index(s.device) if s.device in devices else 0, key="w_device")
        dtype = col2.selectbox("Dtype", DTYPES, index=DTYPES.index(s.dtype), key="w_dtype",
                               help="float32 is the default: small logit differences need it.")
        _set_state(model_a=model_a or s.model_a, model_b=model_b or s.model_b, model_c=model_c, device=device, dtype=dtype)

        st.subheader("Prompt")
        preset_names = ["(custom)"] + [p.name for p in PRESETS]
        preset = st.selectbox("Preset", preset_names, key="w_preset")
        if preset != "(custom)" and st.session_state.get("_applied_preset") != preset:
            chosen = next(p for p in PRESETS if p.name == preset)
            st.session_state["_applied_preset"] = preset
            _set_state(text=chosen.text, answer=chosen.answer, counterfactual=chosen.counterfactual, position=-1)
            st.session_state["w_text"] = chosen.text
        if preset == "(custom)":
            st.session_state["_applied_preset"] = None
        st.session_state.setdefault("w_text", state().text)
        text = st.text_area("Text", key="w_text", height=120, max_chars=LIMITS.max_text_chars)
        if text != state().text:
            _set_state(text=text, answer=None, counterfactual=None, position=-1)
        bos = st.checkbox("Prepend <|endoftext|> (BOS)", value=state().bos, key="w_bos")
        _set_state(bos=bos)

    specs = [x for x in (state().model_a, state().model_b, state().model_c) if x]
    models = []
    for spec in specs:
        try:
            models.append(load(spec, state().device, state().dtype))
        except NolnError as err:
            st.error(f"Could not load **{md(spec)}**: {md(str(err))}", icon=":material/error:")
            return None
        except (torch.OutOfMemoryError, MemoryError):
            st.error(f"Out of memory loading {md(spec)}: pick a smaller model, bfloat16, or the CPU.", icon=":material/error:")
            return None
        except Exception as err:  # a disk or network failure we did not foresee: say so, keep the session usable
            st.error(f"Could not load **{md(spec)}**: unexpected {type(err).__name__}: {md(str(err).splitlines()[0] if str(err) else '')}",
                     icon=":material/error:")
            return None
    if not state().text:
        st.error("The text is empty: type something in the sidebar, or pick a preset.", icon=":material/edit:")
        return None
    return tuple(models)


_MARKDOWN_ACTIVE = set("\\`*_[]<>$~|:&#")


def md(text: str) -> str:
    """User text made literal for Streamlit's Markdown: no emphasis, links, HTML, LaTeX, emoji or colour codes."""
    return "".join("\\" + ch if ch in _MARKDOWN_ACTIVE else (" " if ch in "\r\n" else ch) for ch in str(text))


def token_controls(models: tuple[LoadedModel, ...]) -> None:
    """Position, answer and counterfactual pickers (filled from every model's top-k) and the tokenisation inspector."""
    s = state()
    ids = tokenize(models[0], s.text, s.bos)
    n = min(len(ids), min(m.info.n_ctx for m in models), LIMITS.max_tokens or len(ids))
    with st.sidebar:
        st.subheader("Tokens")
        if n == 0:
            return
        decoded, pieces = token_pieces(models[0], ids[:n])
        labels = [f"{i}: {decoded[i]!r}" for i in range(n)]
        pos = s.position % n if -n <= s.position < n else n - 1
        chosen = st.selectbox("Position analysed", list(range(n)), index=pos, format_func=lambda i: labels[i], key="w_position",
                              help="The token whose next-token prediction is analysed.")
        _set_state(position=-1 if chosen == n - 1 else chosen)  # -1 keeps meaning "the last" when the text changes
        # With both tokens known (a preset, a link) the run with them serves the pickers too: one run, not two.
        tokens = (state().answer, state().counterfactual)
        attempts = [tokens, (None, None)] if None not in tokens else [(None, None)]
        base = None
        for answer, counterfactual in attempts:
            try:
                _, base = run(models, s.text, answer, counterfactual, state().position, s.bos)
                break
            except NolnError as err:
                if answer is None:  # the text itself is the problem
                    st.error(md(str(err)))
                    return
        p = base.position
        candidates: list[str] = []
        for r in base.runs:
            for tok in r.top_tokens[p]:
                if tok not in candidates:
                    candidates.append(tok)
        answer = _token_picker("Answer", "answer", candidates, default=base.runs[0].top_tokens[p][0])
        fallback = next((t for t in candidates if t != answer), answer)
        counterfactual = _token_picker("Counterfactual", "counterfactual", candidates, default=fallback)
        _set_state(answer=answer, counterfactual=counterfactual)
        with st.expander("Tokenisation inspector"):
            st.dataframe(pd.DataFrame({"id": ids[:n], "piece": pieces, "text": [repr(t) for t in decoded]}),
                         height=min(400, 36 * n + 40))
            if len(ids) > n:
                st.caption(f"{len(ids) - n} more tokens are beyond the context window and will be cut.")


def _token_picker(label: str, slot: str, candidates: list[str], default: str) -> str:
    current = getattr(state(), slot) or default
    options = list(candidates)
    if current not in options:
        options.append(current)
    options.append(CUSTOM)
    choice = st.selectbox(label, options, index=options.index(current), format_func=lambda t: t if t == CUSTOM else repr(t),
                          key=f"w_{slot}")
    if choice == CUSTOM:
        typed = st.text_input(f"{label} (text; mind the leading space)", value=current, key=f"w_{slot}_custom", max_chars=200)
        return typed or current
    return choice


# --------------------------------------------------------------------------- the current run

def prepare() -> bool:
    """Load the models and run them on the current state; False (with an error box shown) when that failed."""
    models = sidebar()
    if models is None:
        st.session_state.pop("_run", None)
        return False
    token_controls(models)
    s = state()
    try:
        st.session_state["_run"] = run(models, s.text, s.answer, s.counterfactual, s.position, s.bos)
    except NolnError as err:
        st.error(md(str(err)), icon=":material/warning:")
    except (torch.OutOfMemoryError, MemoryError):
        st.error("Out of memory running the models: use shorter text, fewer models, bfloat16 or the CPU.",
                 icon=":material/error:")
    else:
        return True
    st.session_state.pop("_run", None)
    return False


def current_run() -> RunResult | None:
    """The current run for a page, showing its warnings; None (with a message) when there is none."""
    if "_run" not in st.session_state:
        st.info("Choose models and a text in the sidebar to see this page.")
        return None
    result = st.session_state["_run"][1]
    for warning in result.warnings:
        st.warning(md(warning), icon=":material/warning:")
    if not st.session_state.get("_link_notes_shown"):
        for note in state().notes:
            st.warning(f"Link: {md(note)}", icon=":material/link:")
        st.session_state["_link_notes_shown"] = True
    return result


# --------------------------------------------------------------------------- page helpers

def figure(fig, name: str, frame: pd.DataFrame | None = None) -> None:
    """Show a Plotly figure (its toolbar saves a PNG) and offer its data as CSV."""
    config = {**PLOT_CONFIG, "toImageButtonOptions": {**PLOT_CONFIG["toImageButtonOptions"], "filename": name}}
    st.plotly_chart(fig, config=config, key=f"fig_{name}")
    if frame is not None:
        st.download_button(f"CSV: {name}", frame.to_csv(index=False).encode(), file_name=f"{name}.csv", mime="text/csv",
                           key=f"csv_{name}")


def manifest(result: RunResult, link: str = "") -> dict[str, Any]:
    """The run manifest: versions, models (sources, revisions, commits), dtype, device, token ids."""
    return {
        "app": "noLN Explorer", "noln_core_version": noln_core.__version__, "streamlit_version": st.__version__,
        "torch_version": torch.__version__, "python": platform.python_version(),
        "models": [{"name": r.info.name, "source": r.info.source, "revision": r.info.revision, "commit": r.info.commit,
                    "ln_free": r.info.ln_free, "dtype": r.info.dtype, "device": r.info.device} for r in result.runs],
        "text": result.text, "token_ids": [int(i) for i in result.token_ids], "prepend_bos": result.prepend_bos,
        "position": result.position,
        "answer": result.target.answer if result.target else None,
        "counterfactual": result.target.counterfactual if result.target else None,
        "link": link,
    }


def share_and_export() -> None:
    """Sidebar footer: the link that reproduces this view, and the run manifest."""
    with st.sidebar:
        st.subheader("Share")
        st.caption("Copy this link (button at its right) to reopen exactly this view.")
        st.code(share_url(), language=None, wrap_lines=True)
        if "_run" in st.session_state:
            st.download_button("Run manifest (JSON)", json.dumps(manifest(st.session_state["_run"][1], share_url()), indent=2),
                               file_name="noln-run-manifest.json", mime="application/json", key="manifest")
