"""The app's shareable state: defaults, presets, and strict parsing of query parameters.

Pure Python (no Streamlit), so that the parser can be tested and fuzzed on
its own.  Query parameters get the same validation as widgets: anything
invalid is dropped with a one-line note, never an exception.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlencode

from noln_core.analyses.attribution import VALUE_BIAS
from noln_core.loading import is_valid_repo_id
from noln_core.model import DTYPES as MODEL_DTYPES
from noln_core.registry import REGISTRY, default_pair, parse_spec
from noln_core.teaching.tour import shipped_tours
from pages import PAGE_NAMES
from pages.shell.limits import MAX_TEXT_CHARS

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = tuple(MODEL_DTYPES)
VALUE_BIASES = tuple(VALUE_BIAS)
MAX_LAYER = 1024
"""Layer and head indices in a link are checked against this; a page clamps them to its models."""


@dataclass(frozen=True)
class Preset:
    name: str
    text: str
    answer: str
    counterfactual: str


PRESETS: tuple[Preset, ...] = (
    Preset("IOI (indirect object identification)",
           "When Mary and John went to the store, John gave a drink to", " Mary", " John"),
    Preset("Factual recall", "The Eiffel Tower is located in the city of", " Paris", " London"),
    Preset("Induction: repeated random words",
           " pumpkin orbit velvet canyon lantern quartz violin harbor glacier"
           " pumpkin orbit velvet canyon lantern quartz violin harbor", " glacier", " pumpkin"),
    Preset("KJV: Let there be light (demo corpus)", "And God said, Let there be light: and there was", " light",
           " darkness"),
    Preset("KJV: induction on the sons of Jacob (demo corpus)",
           " Levi Judah Joseph Benjamin Dan Gad Isaac Jacob Levi Judah Joseph Benjamin Dan Gad Isaac", " Jacob", " Levi"),
    Preset("Rare tokens: tab and form feed", "Name:\tAlice\x0cAge:\t42\n\n\n\tCity:\t", " Paris", "\t"),
)


@dataclass(frozen=True)
class AppState:
    """Everything a link carries."""

    model_a: str = ""
    model_b: str = ""
    model_c: str | None = None
    text: str = PRESETS[0].text
    answer: str | None = PRESETS[0].answer
    counterfactual: str | None = PRESETS[0].counterfactual
    position: int = -1
    bos: bool = True
    device: str = "auto"
    dtype: str = "float32"
    page: str = PAGE_NAMES[0]
    attr_layer: int | None = None
    """Attribution page: the layer of the source-token view (None: the last)."""
    attr_vbias: str = "head"
    """Attribution page: where each head's value bias is counted, ``head`` or ``b_O`` (the papers' convention)."""
    attn_layer: int = 0
    """Attention page: the layer and head whose pattern is shown."""
    attn_head: int = 0
    norms_first: bool = True
    """Residual-norms page: include the first token."""
    neurons: str = "marked"
    """Neurons page: the last-layer neurons ablated, ``marked`` (each model's own) or indices ``584,2123``."""
    means_sequences: int = 250
    """Neurons page: sequences of the bundled sample the ablation means are taken over (the papers' 250)."""
    corrupted: str | None = None
    """Patching page: the corrupted prompt (None: the text with the answer and counterfactual swapped)."""
    present: bool = False
    """Presentation mode: larger text and figures, sidebar collapsed on opening (for lectures)."""
    tour: str | None = None
    """Tour page: the shipped tour shown (None: the first shipped one)."""
    step: int = 1
    """Tour page: the step shown, from 1."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """Why parts of a link were ignored, one line each."""


def default_state() -> AppState:
    """Defaults, with ``NOLN_DEFAULT_MODELS="A,B[,C]"`` overriding the model pair (offline use, tests)."""
    pair = default_pair()
    state = AppState(model_a=pair[0], model_b=pair[1])
    env = os.environ.get("NOLN_DEFAULT_MODELS", "").strip()
    if env:
        specs = [s.strip() for s in env.split(",") if s.strip()]
        if len(specs) >= 2:
            state = replace(state, model_a=specs[0], model_b=specs[1], model_c=specs[2] if len(specs) > 2 else None)
    return state


def valid_model_spec(spec: str, allow_local: bool = True, registry_only: bool = False) -> str | None:
    """None if ``spec`` may be loaded, else why not (one line).  No network, no file reads beyond ``exists``."""
    if not isinstance(spec, str) or not spec.strip() or len(spec) > 512 or "\x00" in spec:
        return "an empty or malformed model"
    spec = spec.strip()
    if spec in REGISTRY:
        return None
    if registry_only:
        return f"{spec[:60]!r} is not in the registry, and only registry models are allowed here"
    if Path(os.path.expanduser(spec)).is_dir():
        return None if allow_local else "local directories are disabled here"
    source, revision = parse_spec(spec)
    if not is_valid_repo_id(source):
        return f"{spec[:60]!r} is neither a known model, a local directory nor a hub repo id"
    if revision is not None and not all(c.isalnum() or c in "._-/" for c in revision):
        return f"revision {revision[:40]!r} is malformed"
    return None


def display_name(spec: str) -> str:
    """A short name for menus and charts: a local directory shows its folder name, a hub model its spec."""
    path = Path(os.path.expanduser(spec))
    return path.name if path.is_dir() else spec


def _last_value(value) -> str | None:
    """A parameter given several times counts by its last value, as ``st.query_params`` reads it."""
    if isinstance(value, (list, tuple)):
        value = value[-1] if value else None
    return value if isinstance(value, str) else None


def _flag(value: str) -> bool | None:
    return {"1": True, "true": True, "0": False, "false": False}.get(value)


def parse_query(params, allow_local: bool = True, base: AppState | None = None, registry_only: bool = False,
                max_text_chars: int = MAX_TEXT_CHARS) -> AppState:
    """An :class:`AppState` from query parameters; invalid entries are ignored and explained in ``notes``."""
    state = base if base is not None else default_state()
    notes: list[str] = []
    changes: dict = {}
    get = (lambda k: _last_value(params.get(k))) if hasattr(params, "get") else (lambda k: None)
    for key in ("model_a", "model_b", "model_c"):
        spec = get(key)
        if spec is None:
            continue
        if key == "model_c" and spec.strip() in ("", "none"):
            changes[key] = None
            continue
        problem = valid_model_spec(spec, allow_local, registry_only)
        if problem:
            notes.append(f"ignored {key}: {problem}")
        else:
            changes[key] = spec.strip()
    text = get("text")
    if text is not None:
        if "\x00" in text:
            notes.append("removed NUL characters from the text")
            text = text.replace("\x00", "")
        if len(text) > max_text_chars:
            notes.append(f"the text was cut to {max_text_chars} characters")
            text = text[:max_text_chars]
        if text:
            changes["text"] = text
            # A link with new text but no tokens should not inherit the preset's tokens.
            changes["answer"] = changes["counterfactual"] = None
    for key in ("answer", "counterfactual"):
        value = get(key)
        if value is not None:
            if 0 < len(value) <= 200 and "\x00" not in value:
                changes[key] = value
            else:
                notes.append(f"ignored {key}: it must be 1 to 200 characters")
    position = get("position")
    if position is not None:
        try:
            pos = int(position)
            if not -100_000 <= pos < 100_000:
                raise ValueError
            changes["position"] = pos
        except ValueError:
            notes.append(f"ignored position {position[:20]!r}: not an integer")
    for key in ("bos", "norms_first", "present"):
        value = get(key)
        if value is not None:
            if _flag(value) is None:
                notes.append(f"ignored {key}: use 1 or 0")
            else:
                changes[key] = _flag(value)
    neurons = get("neurons")
    if neurons is not None:
        value = neurons.replace(" ", "")
        if value == "marked" or (0 < len(value) <= 200 and all(x.isdigit() and len(x) <= 6 for x in value.split(","))):
            changes["neurons"] = value
        else:
            notes.append("ignored neurons: use 'marked' or neuron numbers such as 584,2123")
    sequences = get("means_sequences")
    if sequences is not None:
        if sequences.isdigit() and 1 <= int(sequences) <= 10_000:
            changes["means_sequences"] = int(sequences)
        else:
            notes.append(f"ignored means_sequences {sequences[:20]!r}: use a number of sequences from 1")
    corrupted = get("corrupted")
    if corrupted is not None:
        if 0 < len(corrupted) <= max_text_chars and "\x00" not in corrupted:
            changes["corrupted"] = corrupted
        else:
            notes.append(f"ignored corrupted: it must be 1 to {max_text_chars} characters")
    tour = get("tour")
    if tour is not None:
        if tour in shipped_tours():
            changes["tour"] = tour
        else:
            notes.append(f"ignored tour {tour[:40]!r}: the shipped tours are {', '.join(shipped_tours())}")
    step = get("step")
    if step is not None:
        if step.isdigit() and 1 <= int(step) <= MAX_LAYER:
            changes["step"] = int(step)
        else:
            notes.append(f"ignored step {step[:20]!r}: use a step number from 1")
    for key in ("attr_layer", "attn_layer", "attn_head"):
        value = get(key)
        if value is not None:
            if value.isdigit() and int(value) < MAX_LAYER:
                changes[key] = int(value)
            else:
                notes.append(f"ignored {key} {value[:20]!r}: use a layer or head number")
    for key, allowed in (("device", DEVICES), ("dtype", DTYPES), ("page", PAGE_NAMES), ("attr_vbias", VALUE_BIASES)):
        value = get(key)
        if value is not None:
            if value in allowed:
                changes[key] = value
            else:
                notes.append(f"ignored {key} {value[:20]!r}: use one of {', '.join(allowed)}")
    return replace(state, **changes, notes=tuple(notes))


def to_query(state: AppState) -> dict[str, str]:
    """The query parameters that reproduce ``state`` (defaults included, so links survive default changes)."""
    query = {"model_a": state.model_a, "model_b": state.model_b}
    if state.model_c:
        query["model_c"] = state.model_c
    query["text"] = state.text
    for key in ("answer", "counterfactual"):
        if getattr(state, key) is not None:
            query[key] = getattr(state, key)
    query.update({"position": str(state.position), "bos": "1" if state.bos else "0", "device": state.device,
                  "dtype": state.dtype, "page": state.page})
    if state.attr_layer is not None:
        query["attr_layer"] = str(state.attr_layer)
    if state.attr_vbias != "head":
        query["attr_vbias"] = state.attr_vbias
    query.update({"attn_layer": str(state.attn_layer), "attn_head": str(state.attn_head),
                  "norms_first": "1" if state.norms_first else "0"})
    if state.neurons != "marked":
        query["neurons"] = state.neurons
    if state.means_sequences != 250:
        query["means_sequences"] = str(state.means_sequences)
    if state.corrupted is not None:
        query["corrupted"] = state.corrupted
    if state.present:
        query["present"] = "1"
    if state.tour is not None or state.page == "tour":
        query["tour"] = state.tour or next(iter(shipped_tours()), "")
        query["step"] = str(state.step)
    return query


def share_link(state: AppState, base_url: str = "") -> str:
    return f"{base_url.rstrip('/')}/?{urlencode(to_query(state))}"
