"""Every cache of the app, shared by all sessions of the process (the only ``st.cache_*`` calls live here).

* models: one :class:`~noln_core.store.ModelStore`, keyed on (spec, device,
  dtype), ``limits.LIMITS.max_models`` at once, loads queued one at a time (a waiting
  session sees its place in the queue);
* runs: a :class:`RunCache` bounded in *bytes* (``limits.LIMITS.run_cache_mb``),
  least recently used evicted.  A :class:`~noln_core.compare.RunResult` is
  frozen and its arrays read-only, so sessions share one object without
  copying it.  Each entry also holds the analyses computed from its run, and
  they count towards the budget;
* one head's attention pattern per model, computed when the Attention page
  first shows it and kept with its run: runs keep no full patterns;
* the papers' other findings: each model's neuron signature and corpus means (per model, in memory, and the means
  on disk under ``noln_core.paths.CACHE_DIR``), a run's neuron ablation and patching maps (kept with the run);
* a run that chose its own target (new text, no answer yet) is filed under
  the chosen target's key too, so the rerun that follows finds it: editing the
  text runs each model once.

Switching pages or flipping a display toggle therefore never reruns a model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import streamlit as st

import noln_core
from noln_core import LoadedModel, RunResult, compare
from noln_core.compare import head_pattern, nbytes
from noln_core.loading import estimate_bytes
from noln_core.registry import REGISTRY
from noln_core.store import ModelStore
from pages.shell import limits
from pages.shell.links import display_name

RunKey = tuple
"""(model identities, text, answer, counterfactual, position, bos)."""


def _load_model(spec: str, device: str, dtype: str) -> LoadedModel:
    if limits.LIMITS.hosted and spec not in REGISTRY:
        raise noln_core.ModelLoadError(f"{spec} is not in the registry; only registry models are allowed here")
    return noln_core.load_model(spec, device=device, dtype=dtype, allow_local=not limits.LIMITS.hosted,
                                name=display_name(spec))


def _estimate(spec: str, device: str, dtype: str) -> int:
    if limits.LIMITS.hosted and spec not in REGISTRY:
        raise noln_core.ModelLoadError(f"{spec} is not in the registry; only registry models are allowed here")
    return estimate_bytes(spec, device=device, dtype=dtype, allow_local=not limits.LIMITS.hosted)


@st.cache_resource(show_spinner=False)
def model_store() -> ModelStore:
    """The process's models, shared by every session (bounded in bytes when ``model_memory_mb`` is set)."""
    budget = limits.LIMITS.model_memory_mb
    return ModelStore(limits.LIMITS.max_models, _load_model, max_bytes=budget * 1_000_000 if budget else None,
                      estimate=_estimate if budget else None)


def load(spec: str, device: str, dtype: str) -> LoadedModel:
    """A ready model from the store, loading it (with a spinner and the place in the queue) the first time."""
    store = model_store()
    with st.spinner(f"Loading {spec} (downloading if needed)…"):
        note = st.empty()

        def waiting(ahead: int) -> None:
            note.caption(f"Loads are queued one at a time: {ahead} ahead of yours.")

        try:
            return store.get(spec, device, dtype, on_wait=waiting, max_wait=limits.LIMITS.load_wait_s)
        finally:
            note.empty()


def check_together(specs: list[str], device: str, dtype: str) -> None:
    """Refuse, in one line, models that one run needs alive together and that do not fit the model budget together
    (each alone might: the store would then wait for the run's own models to be released)."""
    budget = limits.LIMITS.model_memory_mb
    if not budget or len(specs) < 2:
        return
    try:
        need = sum(_estimate(spec, device, dtype) for spec in specs)
    except noln_core.NolnError:  # a model that cannot load at all: its own load says why, in order
        return
    if need > budget * 1_000_000:
        raise noln_core.ModelLoadError(
            f"these {len(specs)} models need about {need / 1e6:,.0f} MB together as {dtype}, more than the "
            f"{budget:,} MB this server keeps for models: pick fewer or smaller models, or bfloat16")


@dataclass
class _Entry:
    result: RunResult
    analyses: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


class RunCache:
    """Runs and their analyses, least recently used evicted past ``budget`` bytes (thread-safe).

    One run larger than the whole budget is still returned to its caller, just
    not kept.  ``nbytes`` is the cache's own accounting: the arrays of every
    kept run and analysis.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict[RunKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.runs = 0

    def _total(self) -> int:
        """Bytes kept; an entry filed under two keys counts once."""
        return sum(e.nbytes for e in {id(e): e for e in self._entries.values()}.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._total()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _evict(self) -> None:
        while self._entries and self._total() > self.budget:
            self._entries.popitem(last=False)

    def get(self, key: RunKey) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, keys: list[RunKey], result: RunResult) -> _Entry:
        entry = _Entry(result, nbytes=result.nbytes)
        with self._lock:
            self.runs += 1
            for key in keys:
                self._entries[key] = entry
                self._entries.move_to_end(key)
            self._evict()
        return entry

    def add_analysis(self, entry: _Entry, name: str, value: Any) -> None:
        with self._lock:
            if name not in entry.analyses:
                entry.analyses[name] = value
                entry.nbytes += nbytes(value)
                self._evict()


@st.cache_resource(show_spinner=False)
def run_cache() -> RunCache:
    return RunCache(limits.LIMITS.run_cache_mb * 1_000_000)


def run_key(models: tuple[LoadedModel, ...], text: str, answer: str | None, counterfactual: str | None,
            position: int, bos: bool) -> RunKey:
    # What the models are (source, revision, commit, device, dtype), not their display names, which need not be unique.
    identity = tuple((m.info.source, m.info.revision, m.info.commit, m.info.device, m.info.dtype) for m in models)
    return (identity, text, answer, counterfactual, position, bos)


def run(models: tuple[LoadedModel, ...], text: str, answer: str | None, counterfactual: str | None, position: int,
        bos: bool) -> tuple[RunKey, RunResult]:
    """The run for these inputs, from the cache or computed once.

    Without an answer and a counterfactual the run chooses them (model A's top
    prediction against the next distinct one) and is filed under both keys.
    """
    cache = run_cache()
    if answer is None or counterfactual is None:  # a half-given target is completed by the run's choice
        answer = counterfactual = None
    key = run_key(models, text, answer, counterfactual, position, bos)
    entry = cache.get(key)
    if entry is None:
        with st.spinner("Running the models…"):
            result = compare(list(models), text, answer, counterfactual, position, bos, max_tokens=limits.LIMITS.max_tokens,
                             auto_target=answer is None and counterfactual is None, keep_patterns=False)
        keys = [key]
        if result.target is not None and result.target.chosen_by_run:
            keys.append(run_key(models, text, result.target.answer, result.target.counterfactual, position, bos))
            key = keys[-1]
        entry = cache.put(keys, result)
    elif entry.result.target is not None and entry.result.target.chosen_by_run:
        key = run_key(models, text, entry.result.target.answer, entry.result.target.counterfactual, position, bos)
    return key, entry.result


def _kept_with_run(key: RunKey, result: RunResult, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per run: kept in the run's cache entry (and counted in its bytes) while the run is."""
    cache = run_cache()
    entry = cache.get(key)
    if entry is not None and name in entry.analyses:
        return entry.analyses[name]
    value = compute()
    if entry is not None and entry.result is result:
        cache.add_analysis(entry, name, value)
    return value


def head_patterns(models: Callable[[], tuple[LoadedModel, ...]], key: RunKey, result: RunResult, layer: int,
                  head: int) -> list[np.ndarray]:
    """One head's pattern in every model, computed when first shown and kept with the run (runs keep no patterns:
    every head of every layer is ``L x H x n x n`` floats, of which a page shows one head).  ``models()`` gives the
    run's models, asked only when the pattern is not kept yet."""
    def compute() -> list[np.ndarray]:
        with st.spinner(f"Attention pattern of L{layer}H{head}…"):
            return [head_pattern(m, result.token_ids, layer, head) for m in models()]

    return _kept_with_run(key, result, f"pattern:{layer}:{head}", compute)


def analysis(fn: Callable[..., Any], key: RunKey, result: RunResult, **options: Any) -> Any:
    """``fn(result, **options)`` (an analysis of :mod:`noln_core.analyses`), computed once per run and options,
    and kept with the run."""
    name = f"{fn.__module__}.{fn.__qualname__}" + "".join(f":{k}={v}" for k, v in sorted(options.items()))
    return _kept_with_run(key, result, name, lambda: fn(result, **options))


@st.cache_data(max_entries=16, show_spinner=False)
def neuron_signature(spec: str, device: str, dtype: str):
    """A model's last-layer neuron signature (:func:`noln_core.findings.neurons.neuron_signature`), once per model."""
    from noln_core.findings.neurons import neuron_signature as compute

    with st.spinner(f"Neuron signature of {spec}…"):
        return compute(load(spec, device, dtype))


@st.cache_data(max_entries=32, show_spinner=False)
def neuron_means(spec: str, device: str, dtype: str, sequences: int):
    """A model's last-layer means over the bundled held-out sample, once per model (and on disk)."""
    from noln_core.corpus import parse_corpus
    from noln_core.findings.neurons import corpus_means
    from noln_core.paths import CACHE_DIR

    with st.spinner(f"Mean activations of {spec} over the bundled sample ({sequences} sequences)…"):
        return corpus_means(load(spec, device, dtype), parse_corpus("demo"), sequences=sequences,
                            cache_dir=CACHE_DIR / "neuron-means")


def neuron_ablations(specs: tuple, key: RunKey, result: RunResult, neurons: tuple[tuple[int, ...], ...],
                     sequences: int) -> list:
    """Each model's mean ablation of its ``neurons`` on the run's tokens, kept with the run."""
    from noln_core.findings.neurons import neuron_ablation

    def compute() -> list:
        return [neuron_ablation(load(*spec), result.token_ids, chosen, neuron_means(*spec, sequences))
                for spec, chosen in zip(specs, neurons)]

    return _kept_with_run(key, result, f"neurons:{neurons}:{sequences}", compute)


def patchings(specs: tuple, key: RunKey, result: RunResult, corrupted: str, answer: str, counterfactual: str) -> list:
    """Each model's activation and attribution patching of the run's text into ``corrupted``, kept with the run."""
    from noln_core.findings.patching import patching

    def compute() -> list:
        with st.spinner("Patching: activation (one run per cell, batched) and attribution (one backward pass)…"):
            return [patching(load(*spec), result.text, corrupted, answer, counterfactual, result.prepend_bos)
                    for spec in specs]

    return _kept_with_run(key, result, f"patching:{corrupted}:{answer}:{counterfactual}", compute)
