"""The Study page's shell: its inputs, the run with progress and Cancel, and the shared cache of results.

A study runs in the session that asked for it.  Its progress bar updates
between batches; Cancel (or leaving the page) makes Streamlit stop the script
at its next update, and the engine saves what was done (see
:func:`noln_core.study.run_study`), so running the same study again resumes.
Finished studies are kept for every session (a second visitor asking for the
same study, or a page switch, gets the result at once), and one lock per study
keeps two sessions from running the same one side by side.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from noln_core import InputError, LoadedModel, NolnError
from noln_core.registry import REGISTRY
from noln_core.study import METRICS, NMAE_TARGETS, Corpus, Settings, parse_corpus, run_study, text_corpus
from noln_core.corpus import DEMO_CORPUS
from noln_core.loading import context_length
from noln_core.study.engine import cache_root, default_seq_len, estimate_run, prune_cache, study_key
from noln_core.tokenizer import decode_utf8
from pages.shell import cache, limits
from pages.shell.display import error, md
from pages.shell.links import valid_model_spec
from pages.shell.state import state

PAPERS_DATASETS = ("apollo-research/monology-pile-uncopyrighted-tokenizer-gpt2", "lucabaroni/apollo-pile-filtered-10k")
"""The papers' evaluation sets: the only datasets a hosted deployment reads."""
SOURCES = {"demo": "Bundled held-out sample (offline)", "text": "Pasted text", "upload": "Upload a .txt or .jsonl file",
           "dataset": "Hugging Face dataset", "path": "Local file or folder"}
MAX_MODELS = 12
_RESULT = "_study_result"
_REQUEST = "_study_request"
_CANCELLED = "_study_cancelled"


@dataclass(frozen=True)
class Request:
    """What the user asked for: enough to run, resume or find a study."""

    specs: tuple[str, ...]
    corpus: Corpus
    seq_len: int
    max_tokens: int
    batch: int
    bos: bool
    settings: Settings


class _Finished:
    """Finished studies by key, shared by every session (the few most recent)."""

    def __init__(self, size: int = 16) -> None:
        self.size, self.items, self.guard = size, OrderedDict(), threading.Lock()
        self.locks: dict[str, threading.Lock] = {}

    def get(self, key: str):
        with self.guard:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            return None

    def put(self, key: str, result) -> None:
        with self.guard:
            self.items[key] = result
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def lock(self, key: str) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(key, threading.Lock())


@st.cache_resource(show_spinner=False)
def finished() -> _Finished:
    return _Finished()


def _defaults() -> dict:
    s = state()
    cap = limits.LIMITS.study_max_tokens
    return {
        "w_study_models": [m for m in (s.model_a, s.model_b, s.model_c) if m and m in REGISTRY],
        "w_study_more": "", "w_study_source": "demo", "w_study_text": "", "w_study_field": "text",
        "w_study_dataset": PAPERS_DATASETS[1], "w_study_dataset_h": PAPERS_DATASETS[1], "w_study_split": "train",
        "w_study_column": "", "w_study_path": "", "w_study_path_field": "text", "w_study_seq": 1024,
        "w_study_budget": min(32_768, cap or 32_768), "w_study_batch": 8, "w_study_target": NMAE_TARGETS[0],
        "w_study_metrics": [m for m in METRICS if m != "ce"], "w_study_bos": False,
    }


_KEPT = "_study_inputs"


def _restore_inputs() -> None:
    """Streamlit drops a widget's value when its page is left; put back what the user had (or the defaults)."""
    kept = st.session_state.get(_KEPT, {})
    for key, default in _defaults().items():
        if key not in st.session_state:
            st.session_state[key] = kept.get(key, default)


def _keep_inputs() -> None:
    st.session_state[_KEPT] = {k: st.session_state[k] for k in _defaults() if k in st.session_state}


def _models_input() -> list[str]:
    hosted = limits.LIMITS.hosted
    most = min(MAX_MODELS, limits.LIMITS.max_models) if hosted else MAX_MODELS
    chosen = st.multiselect(f"Models (1 to {most}; A is the reference of the pairs)", list(REGISTRY),
                            max_selections=most, key="w_study_models")
    extra: list[str] = []
    if not hosted:
        typed = st.text_input("More models: hub ids[@revision] or local directories, comma-separated",
                              key="w_study_more", max_chars=2000)
        for spec in (x.strip() for x in typed.split(",") if x.strip()):
            problem = valid_model_spec(spec)
            if problem:
                st.error(md(problem), icon=":material/error:")
            else:
                extra.append(spec)
    return (chosen + extra)[:most]


def _corpus_input() -> Corpus | None:
    hosted = limits.LIMITS.hosted
    options = [k for k in SOURCES if not (hosted and k == "path")]
    if st.session_state.get("w_study_source") not in options:
        st.session_state["w_study_source"] = "demo"
    source = st.radio("Corpus", options, format_func=SOURCES.get, key="w_study_source", horizontal=True)
    if source == "demo":
        st.caption("Chapters of the King James Bible the demo models never saw (noln_core/data/demo/heldout.jsonl, one chapter a line).")
        return Corpus("demo", DEMO_CORPUS)
    if source == "text":
        text = st.text_area("Text (one document)", key="w_study_text", height=150, max_chars=200_000)
        return text_corpus(text) if text.strip() else None
    if source == "upload":
        file = st.file_uploader("A UTF-8 .txt file (one document) or .jsonl (one document per line)",
                                type=["txt", "jsonl"], key="w_study_upload")
        field = st.text_input("JSONL field", key="w_study_field", max_chars=100)
        if file is None:
            return None
        data = file.getvalue()
        if len(data) > limits.LIMITS.study_max_upload_mb * 1_000_000:
            raise InputError(f"the file is larger than {limits.LIMITS.study_max_upload_mb} MB")
        name = Path(file.name).name[:100]
        text = decode_utf8(data, f"the file {name!r}")
        if name.endswith(".jsonl"):  # kept in memory: an upload never touches the server's disk
            return Corpus("jsonl", name, field=field or "text", text=text)
        return text_corpus(text)
    if source == "dataset":
        c1, c2, c3 = st.columns([3, 1, 1])
        if hosted:
            name = c1.selectbox("Dataset (the papers' evaluation sets)", PAPERS_DATASETS, key="w_study_dataset_h")
        else:
            name = c1.text_input("Dataset name[:config]", key="w_study_dataset", max_chars=200)
        split = c2.text_input("Split", key="w_study_split", max_chars=50)
        column = c3.text_input("Column (blank: text or input_ids)", key="w_study_column", max_chars=100)
        return parse_corpus(name, column or None, split) if name.strip() else None
    path = st.text_input("Path of a .txt file, a folder of documents or a .jsonl file", key="w_study_path",
                         max_chars=1000)
    field = st.text_input("JSONL field", key="w_study_path_field", max_chars=100)
    return parse_corpus(path, field or None) if path.strip() else None


def request_input() -> Request | None:
    """The study form; the request once the user asks to run (kept in the session, so reruns keep it)."""
    _restore_inputs()
    specs = _models_input()
    try:
        corpus = _corpus_input()
    except InputError as err:
        error(str(err))
        corpus = None
    cap = limits.LIMITS.study_max_tokens
    context = _shortest_context(specs)
    longest = min(1024, context or 1024)
    c1, c2, c3 = st.columns(3)
    cut = st.session_state["w_study_seq"] > longest
    if cut:
        st.session_state["w_study_seq"] = longest
    if cap and st.session_state["w_study_budget"] > cap:
        st.session_state["w_study_budget"] = cap
    seq_len = c1.number_input(f"Tokens per sequence (at most {longest:,})", 8, longest, step=64, key="w_study_seq",
                              help="The papers use 1024 (CE) and 512 (NMAE); at most the shortest context of the "
                                   "models.")
    if cut or (context is not None and context < 1024):
        c1.caption(f"Cut to {longest:,}: the shortest context of these models is {context:,} tokens.")
    budget = c2.number_input(f"Budget (tokens), at least {int(seq_len):,}" + (f", at most {cap:,}" if cap else ""), 8,
                             cap or 10**9, step=1024, key="w_study_budget",
                             help="The tokens analysed, in whole sequences: at least one sequence.")
    batch = c3.number_input("Batch", 1, 64, key="w_study_batch")
    c4, c5 = st.columns(2)
    target = c4.selectbox("NMAE target", NMAE_TARGETS, key="w_study_target",
                          format_func={"last-token": "last-token (the papers')", "logit-diff": "logit-diff (this app's)"}.get)
    metrics = c5.multiselect("Metrics (CE is always measured)", [m for m in METRICS if m != "ce"],
                             key="w_study_metrics")
    bos = st.checkbox("Prepend <|endoftext|> to each sequence (the papers do not)", key="w_study_bos")
    _keep_inputs()
    settings = Settings(metrics=("ce", *metrics), nmae_target=target)
    _estimate(specs, int(seq_len), int(batch), int(min(budget, cap or budget)), settings)
    if st.button("Run study", type="primary", key="w_study_run", disabled=not specs or corpus is None):
        st.session_state[_REQUEST] = Request(tuple(specs), corpus, int(seq_len), int(min(budget, cap or budget)),
                                             int(batch), bool(bos), settings)
        st.session_state.pop(_RESULT, None)
        st.session_state.pop(_CANCELLED, None)
    if not specs:
        st.info("Pick at least one model.", icon=":material/info:")
    elif corpus is None:
        st.info("Choose a corpus.", icon=":material/info:")
    return st.session_state.get(_REQUEST)


def _shortest_context(specs: list[str]) -> int | None:
    """The shortest context of the chosen models, from their configs (None when one cannot be read: its load
    will say why)."""
    try:
        return min((_context(s, not limits.LIMITS.hosted) for s in specs), default=None)
    except NolnError:
        return None


@functools.lru_cache(maxsize=256)
def _context(spec: str, allow_local: bool) -> int:
    """Read once per spec, not on every rerun of the form (a hub model's config is a lookup)."""
    return context_length(spec, allow_local=allow_local)


_ESTIMATE = "_study_estimate"


def _estimate(specs: list[str], seq_len: int, batch: int, budget: int, settings: Settings) -> None:
    """Before Run: a button that times one batch on these models and says how long the study will take."""
    if not specs:
        return
    asked = (tuple(specs), seq_len, batch, budget, settings, state().device, state().dtype)
    kept = st.session_state.get(_ESTIMATE)
    if st.button("Estimate the run time", key="w_study_estimate",
                 help="Times one batch of these models with these metrics on this machine, then scales it to the "
                      "budget (corpus reading not included)."):
        models = _load(tuple(specs))
        if models is None:
            return
        try:
            with st.spinner("Timing one batch…"):
                kept = (asked, estimate_run(models, min(seq_len, default_seq_len(models)), batch, budget, settings))
        except NolnError as err:
            error(str(err))
            return
        st.session_state[_ESTIMATE] = kept
    if kept is not None and kept[0] == asked:
        e = kept[1]
        st.caption(f"About {_duration(e.seconds)} on this machine: {e.batches:,} batch(es) of "
                   f"{_duration(e.batch_seconds)} each (timed just now; the run's progress bar refines it).")
    elif kept is not None:
        st.caption("The settings changed since the last estimate: estimate again.")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _load(specs: tuple[str, ...]) -> list[LoadedModel] | None:
    s = state()
    models = []
    try:
        cache.check_together(list(specs), s.device, s.dtype)
    except NolnError as err:
        error(str(err))
        return None
    for spec in specs:
        try:
            models.append(cache.load(spec, s.device, s.dtype))
        except NolnError as err:
            error(str(err), prefix=f"Could not load **{md(spec)}**: ")
            return None
    return models


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "estimating…"
    return f"about {seconds:.0f} s left" if seconds < 120 else f"about {seconds / 60:.0f} min left"


def _cancel() -> None:
    st.session_state[_CANCELLED] = st.session_state.get(_REQUEST)


def _prune(shared: "_Finished") -> None:
    """Keep the saved studies within the disk cap, the least recently used first, never one running now."""
    cap = limits.LIMITS.study_cache_mb
    if cap:
        running = {Path(key).name for key, lock in list(shared.locks.items()) if lock.locked()}
        prune_cache(cache_root(), cap * 1_000_000, keep=running)


def run(request: Request):
    """The study for ``request``: from the shared results, else run (or resume) here with progress and Cancel.

    After Cancel the request's saved part is shown (``complete`` False), without running further.
    """
    kept = st.session_state.get(_RESULT)
    if kept is not None and kept[0] == request:
        return kept[1]
    stopped = st.session_state.get(_CANCELLED) == request
    models = _load(request.specs)
    if models is None:
        return None
    seq_len = min(request.seq_len, default_seq_len(models))
    if seq_len < request.seq_len:
        st.info(f"Tokens per sequence cut from {request.seq_len:,} to {seq_len:,}: the shortest context of these "
                "models.", icon=":material/content_cut:")
    try:
        key = study_key(models, request.corpus, seq_len, request.bos, request.max_tokens, request.batch,
                        request.settings)
    except (OSError, InputError) as err:
        error(str(err))
        return None
    shared = finished()
    key = f"{cache_root()}/{key}"  # studies are shared where their saved state is
    result = shared.get(key)
    if result is None and stopped:  # after Cancel: what was saved, once the run that saved it has let go
        with shared.lock(key):
            try:
                result = run_study(models, request.corpus, seq_len=seq_len, batch=request.batch,
                                   max_tokens=request.max_tokens, bos=request.bos, settings=request.settings,
                                   cancel=lambda: True)
            except NolnError as err:
                error(str(err))
                return None
    elif result is None:
        cancel = st.empty()
        cancel.button("Cancel", key="w_study_cancel", on_click=_cancel,
                      help="Stops after the current batch; what was done is saved, and running the same study resumes.")
        bar = st.progress(0.0, text="Preparing the corpus…")
        start = time.monotonic()

        def progress(p) -> None:
            bar.progress(min(p.done / max(p.total, 1), 1.0),
                         text=f"{p.done} of {p.total} sequences · {_eta(p.eta_s)} · {time.monotonic() - start:.0f} s")

        lock = shared.lock(key)
        if not lock.acquire(blocking=False):
            bar.progress(0.0, text="Another session is running this study; waiting for it…")
            lock.acquire()
        try:
            _prune(shared)  # room for this study first
            result = shared.get(key) or run_study(models, request.corpus, seq_len=seq_len, batch=request.batch,
                                                  max_tokens=request.max_tokens, bos=request.bos,
                                                  settings=request.settings, progress=progress)
        except NolnError as err:
            bar.empty()
            cancel.empty()
            error(str(err))
            return None
        finally:
            lock.release()
        bar.empty()
        cancel.empty()
        if result.complete:
            shared.put(key, result)
        _prune(shared)
    st.session_state[_RESULT] = (request, result)
    return result
