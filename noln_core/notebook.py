""""Open this view in Python": a Jupyter notebook (or a script) that reproduces one view with ``noln_core``.

:func:`view_notebook` writes the models and revisions, the text, the answer and
counterfactual, the position and BOS, the analysis calls and the figure of one
page, then prints the view's numbers as JSON (the same fields, with the same
names, as ``python -m noln_core compare --json``), so a test (and a reader) can
check that the notebook shows what the app showed.  No Streamlit, no network
beyond loading the models: on the demo models it runs offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

VIEWS = ("overview", "logit-difference", "residual-norms", "attribution", "attention", "neurons", "patching")
"""The pages a notebook reproduces (the Study and About pages have their own exports)."""


@dataclass(frozen=True)
class View:
    """What a page shows, as the app's state holds it."""

    models: tuple[str, ...]
    """Specs as the CLI takes them (``repo@revision``, a local directory, ``demo:...``)."""
    text: str
    answer: str | None = None
    counterfactual: str | None = None
    position: int | None = None
    bos: bool = True
    page: str = "overview"
    device: str = "cpu"
    dtype: str = "float32"
    install: str = ""
    """What the first cell pip-installs when the kernel lacks ``noln_core`` (default: :func:`install_source`)."""
    options: dict = field(default_factory=dict)
    """Page controls: ``layer`` (attribution source heatmap, attention), ``head`` (attention), ``value_bias``
    (attribution: ``head`` or ``b_O``), ``neurons`` and ``means_sequences`` (neurons), ``corrupted`` (patching)."""


PACKAGE = "noln-explorer"


def install_source(hosted: bool = False) -> str:
    """Where a downloaded notebook installs ``noln_core`` from, outside any checkout.

    ``NOLN_INSTALL_SOURCE`` if the operator set it; on a Hugging Face Space (``SPACE_ID``), the Space's own git
    repository; locally, this checkout (the user's own disk); else the package name.  A hosted server never
    names one of its paths.
    """
    if os.environ.get("NOLN_INSTALL_SOURCE"):
        return os.environ["NOLN_INSTALL_SOURCE"]
    if os.environ.get("SPACE_ID"):
        return f"{PACKAGE} @ git+https://huggingface.co/spaces/{os.environ['SPACE_ID']}"
    root = Path(__file__).resolve().parent.parent
    if not hosted and (root / "pyproject.toml").is_file():
        return str(root)
    return PACKAGE


def _install_cell(source: str) -> str:
    return "\n".join([
        "# noln_core is the noLN Explorer package: installed here if this kernel lacks it.",
        f"SOURCE = {source!r}",
        "import importlib.util, subprocess, sys",
        'if importlib.util.find_spec("noln_core") is None:',
        '    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", SOURCE])',
        "    importlib.invalidate_caches()",
    ])


_ANALYSIS = {
    "overview": '''nt = next_token(result)
figures.loss_strip(nt, result.tokens).show()
if nt.pairs:
    figures.divergence_chart(nt, result.tokens).show()
numbers = {"mean_loss": [m.mean_loss for m in nt.models], "agreement": [p.agreement for p in nt.pairs]}''',
    "logit-difference": '''lens = logit_difference(result)  # None without an answer and a counterfactual
figures.logit_lens_chart(lens).show()
numbers = {"logit_diff": [m.value for m in lens.models], "logit_lens": [m.lens for m in lens.models]}''',
    "residual-norms": '''norms = residual_norms(result)
figures.norm_heatmaps(norms, result.tokens, True).show()
numbers = {"first_token_max": [m.first_token_max for m in norms], "resid_norms": [m.hidden for m in norms]}''',
    "attribution": '''dla = direct_logit_attribution(result, value_bias=VALUE_BIAS)
effects = head_direct_effects(result, value_bias=VALUE_BIAS)
figures.dla_components_chart(dla).show()
figures.head_heatmaps(dla).show()
figures.head_source_heatmaps(dla, LAYER, result.tokens).show()
figures.dla_vs_direct_effect(effects).show()
numbers = {"logit_diff": [d.logit_diff for d in dla], "dla_constant": [d.constant for d in dla],
           "dla_error": [d.error for d in dla], "direct_effect_nmae": [e.nmae for e in effects]}''',
    "neurons": '''from noln_core.corpus import parse_corpus
from noln_core.findings.neurons import ablation_summary, corpus_means, neuron_ablation, neuron_signature, parse_neurons
from noln_core.viz import findings

chosen = parse_neurons(NEURONS)
signatures = [neuron_signature(m) for m in models]
shown = [s.marked if chosen is None else chosen for s in signatures]
means = [corpus_means(m, parse_corpus("demo"), sequences=MEANS_SEQUENCES) for m in models]  # the bundled sample
ablations = [neuron_ablation(m, result.token_ids, n, mu) for m, n, mu in zip(models, shown, means)]
findings.signature_scatter(signatures, shown).show()
findings.ablation_parts(ablations, result.tokens).show()
numbers = {"neurons": [list(a.neurons) for a in ablations], "loss_total": [a.loss_total for a in ablations],
           "loss_direct": [a.loss_direct for a in ablations], "loss_via_ln": [a.loss_via_ln for a in ablations],
           "via_ln_share": [[x.via_ln_share for x in ablation_summary(a)] for a in ablations]}''',
    "patching": '''from noln_core.findings.patching import patching
from noln_core.viz import findings

patched = [patching(m, TEXT, CORRUPTED, ANSWER, COUNTERFACTUAL, PREPEND_BOS) for m in models]
findings.patching_heatmaps(patched, result.tokens).show()
findings.patching_scatter(patched).show()
findings.head_patching_heatmaps(patched).show()
numbers = {"resid_act": [p.resid_act for p in patched], "resid_attr": [p.resid_attr for p in patched],
           "z_act": [p.z_act for p in patched], "z_attr": [p.z_attr for p in patched],
           "normaliser": [p.normaliser for p in patched]}''',
    "attention": '''summaries = attention(result)
figures.sink_heatmaps(summaries).show()
numbers = {"sink_rate": [s.sink_rate for s in summaries], "sink_rate_papers": [s.sink_rate_papers for s in summaries]}''',
}


def _cells(view: View) -> list[tuple[str, str]]:
    if view.page not in VIEWS:
        raise ValueError(f"no notebook for page {view.page!r}: choose from {', '.join(VIEWS)}")
    if view.page in ("logit-difference", "attribution", "patching") and not (view.answer and view.counterfactual):
        raise ValueError(f"the {view.page} view needs an answer and a counterfactual token")
    title = view.page.replace("-", " ").capitalize()
    setup = "\n".join([
        f"MODELS = {list(view.models)!r}",
        f"TEXT = {view.text!r}",
        f"ANSWER, COUNTERFACTUAL = {view.answer!r}, {view.counterfactual!r}",
        f"POSITION = {-1 if view.position is None else view.position!r}  # -1: the last token",
        f"PREPEND_BOS = {view.bos!r}",
        f"LAYER = {int(view.options.get('layer', 0))!r}",
        *([f"VALUE_BIAS = {str(view.options.get('value_bias', 'head'))!r}  # 'b_O': the papers' convention"]
          if view.page == "attribution" else []),
        *([f"NEURONS = {str(view.options.get('neurons', 'marked'))!r}  # 'marked': the papers' (or the top 3)",
           f"MEANS_SEQUENCES = {int(view.options.get('means_sequences', 250))!r}"] if view.page == "neurons" else []),
        *([f"CORRUPTED = {str(view.options.get('corrupted') or '')!r}"] if view.page == "patching" else []),
        f"DEVICE, DTYPE = {view.device!r}, {view.dtype!r}",
    ])
    return [
        ("markdown", f"# noLN Explorer: {title}\n\nThis notebook reproduces the app's *{title}* view with `noln_core` "
                     "(the first cell installs it if needed, from any directory). The models run exactly as in "
                     "the app: LN-free checkpoints without any normalisation, so attribution is exact."),
        ("code", _install_cell(view.install or install_source())),
        ("code", setup),
        ("code", "import json\n\nfrom noln_core import compare, load_model\n"
                 "from noln_core.analyses import (attention, direct_logit_attribution, head_direct_effects, "
                 "logit_difference,\n                                next_token, residual_norms)\n"
                 "from noln_core.study.results import json_safe\nfrom noln_core.viz import figures\n\n"
                 "models = [load_model(spec, device=DEVICE, dtype=DTYPE, name=spec) for spec in MODELS]\n"
                 "result = compare(models, TEXT, ANSWER, COUNTERFACTUAL, POSITION, prepend_bos=PREPEND_BOS)\n"
                 "print(len(result.tokens), 'tokens; position', result.position, repr(result.tokens[result.position]))"),
        ("code", _ANALYSIS[view.page]),
        ("markdown", "The view's numbers, with the names `python -m noln_core compare --json` uses:"),
        ("code", "print(json.dumps(json_safe(numbers)))"),
    ]


def view_notebook(view: View) -> dict:
    """The view as an nbformat-4 notebook (a dict, ready for ``json.dump``)."""
    cells = []
    for i, (kind, source) in enumerate(_cells(view)):
        cell = {"cell_type": kind, "id": f"{view.page}-{i}", "metadata": {}, "source": source}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}}}


def view_script(view: View) -> str:
    """The same view as a plain Python script (markdown cells become comments).

    A script writes its figures beside it instead of opening a browser: the ``.show()`` calls of the page's
    analysis template (ours, never the user's text, which is a literal in the setup cell) become ``write_html``.
    """
    parts = []
    for kind, source in _cells(view):
        if kind == "markdown":
            parts.append("\n".join("# " + line if line else "#" for line in source.splitlines()))
        elif source == _ANALYSIS[view.page]:
            pieces = source.split(".show()")
            parts.append(pieces[0] + "".join(f'.write_html("{view.page}-figure-{i}.html"){piece}'
                                             for i, piece in enumerate(pieces[1:], 1)))
        else:
            parts.append(source)
    return "\n\n".join(parts) + "\n"


def notebook_json(view: View) -> str:
    return json.dumps(view_notebook(view), indent=1, ensure_ascii=False) + "\n"
