"""The shared sidebar: models, device and dtype, the prompt, the analysed position and tokens.

Each widget reads the session's state and writes it back; nothing here runs a
model (:mod:`pages.shell.runs` does, once, between :func:`inputs` and
:func:`token_pickers`).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st
import torch

from noln_core import InputError, LoadedModel, RunResult
from noln_core.registry import DEMO_PREFIX, REGISTRY, lookup, parse_spec
from noln_core.tokenizer import decode_utf8, token_pieces, tokenize
from pages.shell.display import error, md
from pages.shell import limits
from pages.shell.links import DEVICES, DTYPES, PRESETS, valid_model_spec
from pages.shell.state import set_state, state

OTHER_MODEL = "Other (repo id or local directory)…"
OTHER_TOKEN = "Other (type a token)…"


def _model_picker(label: str, slot: str) -> str | None:
    current = getattr(state(), slot)
    options = list(REGISTRY) + ([] if limits.LIMITS.hosted else [OTHER_MODEL])  # hosted: registry models only
    if current is None:
        index = 0
    elif current in REGISTRY:
        index = options.index(current)
    else:
        index = options.index(OTHER_MODEL) if OTHER_MODEL in options else 0

    def describe(spec: str) -> str:
        entry = REGISTRY.get(spec)
        if entry is not None and spec.startswith(DEMO_PREFIX):
            return f"demo (offline) · {spec.removeprefix(DEMO_PREFIX)}"
        return f"{spec}  ·  {entry.kind.replace('_', ' ')}" if entry else spec

    choice = st.selectbox(label, options, index=index, format_func=describe, key=f"w_{slot}")
    if choice == OTHER_MODEL:
        typed = st.text_input(f"{label}: repo id[@revision]" + ("" if limits.LIMITS.hosted else " or local directory"),
                              value=current if current and current not in REGISTRY else "", key=f"w_{slot}_custom",
                              max_chars=512, placeholder="owner/name@revision")
        if not typed.strip():
            return current if current not in REGISTRY else None
        problem = valid_model_spec(typed, not limits.LIMITS.hosted, limits.LIMITS.hosted)
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


def inputs() -> None:
    """Models, device, dtype, preset, text and BOS, written into the state."""
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
                    set_state(model_c=entry.control)
            model_c = _model_picker("Model C", "model_c")
        devices = _device_options()
        col1, col2 = st.columns(2)
        device = col1.selectbox("Device", devices, index=devices.index(s.device) if s.device in devices else 0,
                                key="w_device")
        dtype = col2.selectbox("Dtype", DTYPES, index=DTYPES.index(s.dtype), key="w_dtype",
                               help="float32 is the default: small logit differences need it.")
        set_state(model_a=model_a or s.model_a, model_b=model_b or s.model_b, model_c=model_c, device=device,
                  dtype=dtype)

        st.subheader("Prompt")
        preset_names = ["(custom)"] + [p.name for p in PRESETS]
        preset = st.selectbox("Preset", preset_names, key="w_preset")
        if preset != "(custom)" and st.session_state.get("_applied_preset") != preset:
            chosen = next(p for p in PRESETS if p.name == preset)
            st.session_state["_applied_preset"] = preset
            set_state(text=chosen.text, answer=chosen.answer, counterfactual=chosen.counterfactual, position=-1)
            st.session_state["w_text"] = chosen.text
        if preset == "(custom)":
            st.session_state["_applied_preset"] = None
        st.session_state.setdefault("w_text", state().text)
        _text_upload()
        text = st.text_area("Text", key="w_text", height=120, max_chars=limits.LIMITS.max_text_chars)
        if text != state().text:
            set_state(text=text, answer=None, counterfactual=None, position=-1)
        bos = st.checkbox("Prepend <|endoftext|> (BOS)", value=state().bos, key="w_bos")
        set_state(bos=bos)
        present = st.toggle("Presentation mode", value=state().present, key="w_present",
                            help="Larger text and figures for a lecture; a link with it opens with the sidebar "
                                 "collapsed.")
        set_state(present=present)


def _text_upload() -> None:
    """A UTF-8 text file as the prompt; anything else gets an error box and the typed text stays."""
    def uploaded() -> None:
        file = st.session_state.get("w_upload")
        if file is None:
            return
        try:
            text = decode_utf8(file.getvalue(), f"the file {file.name!r}")[: limits.LIMITS.max_text_chars]
        except InputError as err:
            st.session_state["_upload_error"] = str(err)
            return
        st.session_state.pop("_upload_error", None)
        st.session_state["w_text"] = text
        set_state(text=text, answer=None, counterfactual=None, position=-1)

    st.file_uploader("…or a text file (UTF-8)", type=["txt", "md"], key="w_upload", on_change=uploaded)
    if "_upload_error" in st.session_state:
        error(st.session_state["_upload_error"])


def position_picker(models: tuple[LoadedModel, ...]) -> None:
    """The analysed position, from the tokens alone (no model runs for it)."""
    s = state()
    ids = tokenize(models[0], s.text, s.bos)
    n = min(len(ids), min(m.info.n_ctx for m in models), limits.LIMITS.max_tokens or len(ids))
    with st.sidebar:
        st.subheader("Tokens")
        if n == 0:
            return
        decoded, _ = token_pieces(models[0].tokenizer, ids[:n])
        labels = [f"{i}: {decoded[i]!r}" for i in range(n)]
        pos = s.position % n if -n <= s.position < n else n - 1
        chosen = st.selectbox("Position analysed", list(range(n)), index=pos, format_func=lambda i: labels[i],
                              key="w_position", help="The token whose next-token prediction is analysed.")
        set_state(position=-1 if chosen == n - 1 else chosen)  # -1 keeps meaning "the last" when the text changes


def _token_picker(label: str, slot: str, candidates: list[str]) -> None:
    """A picker over the models' top predictions; a change writes the state before the rerun, so it runs once."""
    current = getattr(state(), slot)
    options = list(candidates)
    if current not in options:
        options.append(current)
    options.append(OTHER_TOKEN)
    key = f"w_{slot}"
    if st.session_state.get(key) not in options or (st.session_state.get(key) != OTHER_TOKEN
                                                    and st.session_state.get(key) != current):
        st.session_state[key] = current

    def picked() -> None:
        if st.session_state[key] != OTHER_TOKEN:
            set_state(**{slot: st.session_state[key]})

    choice = st.selectbox(label, options, format_func=lambda t: t if t == OTHER_TOKEN else repr(t), key=key,
                          on_change=picked)
    if choice == OTHER_TOKEN:
        typed_key = f"w_{slot}_custom"
        st.session_state.setdefault(typed_key, current)

        def typed() -> None:
            if st.session_state[typed_key]:
                set_state(**{slot: st.session_state[typed_key]})

        st.text_input(f"{label} (text; mind the leading space)", key=typed_key, max_chars=200, on_change=typed)


def token_pickers(result: RunResult) -> None:
    """Answer and counterfactual pickers, filled from every model's top predictions at the analysed position."""
    if result.target is None:
        return
    if state().answer is None or state().counterfactual is None:  # the run chose them: show its choice
        set_state(answer=result.target.answer, counterfactual=result.target.counterfactual)
    with st.sidebar:
        candidates = result.candidates()
        _token_picker("Answer", "answer", candidates)
        _token_picker("Counterfactual", "counterfactual", candidates)


def tokenisation_inspector(models: tuple[LoadedModel, ...]) -> None:
    """Every token of the text: id, BPE piece and text; a note for what the context window cuts."""
    s = state()
    ids = tokenize(models[0], s.text, s.bos)
    n = min(len(ids), min(m.info.n_ctx for m in models), limits.LIMITS.max_tokens or len(ids))
    with st.sidebar, st.expander("Tokenisation inspector"):
        decoded, pieces = token_pieces(models[0].tokenizer, ids[:n])
        st.dataframe(pd.DataFrame({"id": ids[:n], "piece": pieces, "text": [repr(t) for t in decoded]}),
                     height=min(400, 36 * n + 40))
        if len(ids) > n:
            st.caption(f"{len(ids) - n} more tokens are beyond the context window and will be cut.")
