"""The papers' published numbers, each with the settings that produced it: ``study --reproduce NAME``.

A :class:`Figure` is one published table or figure: its models (ids, in the papers' column order), its
dataset and how its scripts sample it (:class:`~noln_core.corpus.Sampling`), its sequence length, BOS and
budget, its metrics and definitions, and the numbers it reports.  Everything comes from the follow-up
paper's repository, ``submarat/removing-layer-norm`` at commit 583a9e6 (PAPERS.md for the tables), each
figure naming the script and lines it follows.

``study.md`` prints a figure's numbers beside a study only when the study's settings equal the figure's
(:func:`compare`); otherwise it says which settings differ, so a published number never sits beside a
number measured another way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..corpus import Sampling
from ..errors import InputError
from ..registry import BARONI_2025, PUBLISHED_CE_BARONI, lookup

REPO = "submarat/removing-layer-norm@583a9e6"
COLUMNS = ("original", "fine-tuned with LN", "LN-free")
SIZES = {"small": ("openai-community/gpt2", "schaeff/gpt2-small_vanilla300", "schaeff/gpt2-small_LNFree300"),
         "medium": ("openai-community/gpt2-medium", "schaeff/gpt2-medium_vanilla500", "schaeff/gpt2-medium_LNFree500"),
         "large": ("openai-community/gpt2-large", "schaeff/gpt2-large_vanilla600", "schaeff/gpt2-large_LNFree600"),
         "xl": ("openai-community/gpt2-xl", "schaeff/gpt2-xl_vanilla800", "schaeff/gpt2-xl_LNFree800")}
"""The papers' three models per GPT-2 size (``load_models.py``, lines 218-229; ``eval_all.sh``)."""

PILE_FILTERED = "lucabaroni/apollo-pile-filtered-10k"
PILE = "apollo-research/monology-pile-uncopyrighted-tokenizer-gpt2"
OPENWEBTEXT = "Skylion007/openwebtext"
CORPUS_NAMES = {PILE_FILTERED: "Pile-filtered", PILE: "Pile", OPENWEBTEXT: "OpenWebText",
                "NeelNanda/pile-10k": "Pile-10k"}

FIRST_TOKENS = Sampling("first-tokens", rows=1000, seed=42)
"""``mech_interp/load_dataset.py``, lines 59-60 and 72-82, as ``run_analysis.py`` (lines 29-34),
``run_inference.py`` (lines 191-195) and through it ``residual_norms.py`` call it: Pile-filtered streamed,
``shuffle(seed=42).take(1000)``, each row's first 512 tokens, no BOS."""


@dataclass(frozen=True)
class Figure:
    """One published table or figure, with everything a study needs to measure it the same way."""

    name: str
    title: str
    paper: str
    """The full citation; ``cite`` is its short form."""
    source: str
    """The script(s) and lines that produced it."""
    models: tuple[str, ...]
    """Model specs, in the papers' column order (:data:`COLUMNS`)."""
    dataset: str
    sampling: Sampling
    seq_len: int
    metrics: tuple[str, ...]
    split: str = "train"
    column: str | None = None
    """The dataset column (``--field``); None: ``input_ids`` when present, else ``text``."""
    config: str | None = None
    max_tokens: int | None = None
    bos: bool = False
    nmae_target: str = "last-token"
    published: dict[str, tuple[float | None, ...]] = field(default_factory=dict)
    """Metric -> one value per model (None where that column was not published)."""
    published_pairs: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    """Pair metric -> ``{(i, j): value}`` over the model columns."""
    note: str = ""
    cite: str = "Baroni et al. 2025"
    neurons: str | None = None
    """Last-layer neurons mean-ablated over the same sequences (``study --neurons``), as ``N,N,N``."""

    def settings(self) -> dict:
        """The settings a study must share with this figure for its numbers to be comparable."""
        return {"dataset": self.dataset, "config": self.config, "split": self.split, "field": self.column,
                "sampling": asdict(self.sampling), "seq_len": self.seq_len, "bos": self.bos,
                "max_tokens": self.max_tokens, "nmae_target": self.nmae_target if "nmae" in self.published else None}


def _ce(size: str, corpus: str) -> Figure:
    values = {"ce": PUBLISHED_CE_BARONI[CORPUS_NAMES[{"owt": OPENWEBTEXT, "pile": PILE,
                                                       "pile-filtered": PILE_FILTERED}[corpus]]][size]}
    if corpus == "owt":  # prepare_dataset.py, lines 16-50; eval_pile.py, lines 140-145
        spec = dict(dataset=OPENWEBTEXT, column="text", sampling=Sampling("owt-eval", chunk=1024),
                    source="eval_pile.py lines 140-145 and prepare_dataset.py lines 16-50 (the test split, 4.5M tokens)",
                    note="The papers load `openwebtext` through its loading script; its hub copy "
                         "`Skylion007/openwebtext` holds the same rows. Reading it needs the whole dataset (about "
                         "55 GB), as train_test_split permutes every row.")
    elif corpus == "pile":  # pile_eval.py, lines 32-34, 47, 54-57, 74-84
        spec = dict(dataset=PILE, sampling=Sampling("pile-eval", rows=10_000, seed=42, chunk=1024, streaming=True),
                    source="eval_pile.py (-d pile-apollo, -n 10000) and pile_eval.py lines 31-89")
    else:  # pile_eval.py, lines 35-38, 47, 54-57, 74-84
        spec = dict(dataset=PILE_FILTERED, sampling=Sampling("pile-eval", rows=10_000, seed=42, chunk=1024,
                                                             streaming=False),
                    source="eval_pile.py (-d pile-apollo-luca, -n 10000) and pile_eval.py lines 31-89")
    if size == "xl" and corpus == "pile":  # the README's footnotes 1 and 2
        values.update({"ce_median": (1.0103, None, 1.0937), "ce_p2.5": (0.0005, None, 0.0004),
                       "ce_p97.5": (10.6193, None, 10.7548), "ce_p99.95": (43.0064, None, 48.6459)})
    return Figure(name=f"ce-{size}-{corpus}", title=f"Cross-entropy of GPT-2 {size} on {CORPUS_NAMES[spec['dataset']]}",
                  paper=BARONI_2025, models=SIZES[size], seq_len=1024, metrics=("ce",), published=values, **spec)


def _nmae(size: str) -> Figure:
    return Figure(
        name=f"nmae-{size}", title=f"DLA against the direct effect, NMAE over heads, GPT-2 {size}", paper=BARONI_2025,
        source="mech_interp/attention_head_attribution/run_analysis.py lines 22-233 and 358-408",
        models=SIZES[size], dataset=PILE_FILTERED, sampling=FIRST_TOKENS, seq_len=512, metrics=("nmae",),
        published={"nmae": (0.4907, 0.5785, 0.0)} if size == "small" else {},
        note="" if size == "small" else "The paper shows medium's per-head NMAE as a heat map, without a global number.")


_INFERENCE = {  # mech_interp/inference_analysis/figures/{size}/ci_statistics.csv
    "small": {"ce": (2.9641984429061807, 2.9836349268244677, 3.049144688644647),
              "entropy": (3.053046978758494, 2.800587307581371, 2.7940226432145985),
              "ece": (0.019289099817611663, 0.026285939469492457, 0.03544027682408278),
              "js": {(0, 1): 0.020230668394236265, (0, 2): 0.03934332525115214, (1, 2): 0.025443268781350073}},
    "medium": {"ce": (2.711123786900787, 2.742433383554238, 2.8031809014699376),
               "entropy": (2.864033100317862, 2.5860628421764322, 2.53159843439351),
               "ece": (0.01944271929758381, 0.02228035158893083, 0.03398868095240084),
               "js": {(0, 1): 0.02337384497253495, (0, 2): 0.034719963987298, (1, 2): 0.017244497320092488}},
}


def _inference(size: str) -> Figure:
    values = _INFERENCE[size]
    return Figure(
        name=f"entropy-ece-{size}", title=f"Entropy, calibration and divergence of GPT-2 {size}", paper=BARONI_2025,
        source="mech_interp/run_inference.py lines 17-199 and inference_analysis/analyse_models.py lines 603-696, "
               f"1073-1160 (figures/{size}/ci_statistics.csv)",
        models=SIZES[size], dataset=PILE_FILTERED, sampling=FIRST_TOKENS, seq_len=512,
        metrics=("entropy", "calibration", "pairs"),
        published={k: v for k, v in values.items() if k != "js"}, published_pairs={"js": values["js"]},
        note="run_inference.py takes log(p + 1e-10) for the CE and the entropy and smooths the JS with 1e-8; the "
             "study computes them exactly (the differences stay below 1e-4 nats for models like these).")


def _sinks() -> Figure:
    return Figure(
        name="sinks-medium", title="Attention-sink rate of GPT-2 medium (the papers' definition)", paper=BARONI_2025,
        source="sink_rate.py lines 164-232 with utils.calculate_sink_rate (lines 65-102) and pile_eval.py lines "
               "31-89 (pile-apollo-luca, 1000 samples)",
        models=SIZES["medium"], dataset=PILE_FILTERED,
        sampling=Sampling("pile-eval", rows=1000, seed=42, chunk=1024, streaming=False), seq_len=512,
        metrics=("sinks",), published={"sink_papers": (None, 0.553, 0.453)},
        note="sink_rate.py compares the fine-tune with LN ('schaeff/gpt-2medium_vanilla500', a typo of the released "
             "schaeff/gpt2-medium_vanilla500) with 'submarat/gpt2-medium-noln-aux', the LN-free model before its "
             "release as schaeff/gpt2-medium_LNFree500 (lines 166-167): 55.3% is the fine-tuned-with-LN column, and "
             "the original GPT-2 medium was not measured. The study adds it as the first column. The script's "
             "interval is a spread of per-batch rates; the study's is a 95% interval of the mean.")


def _norms(size: str) -> Figure:
    return Figure(
        name=f"norms-{size}", title=f"First-token residual norms of GPT-2 {size}", paper=BARONI_2025,
        source="mech_interp/residual_stream/residual_norms.py lines 18-404 (on run_inference.py's sequences)",
        models=SIZES[size], dataset=PILE_FILTERED, sampling=FIRST_TOKENS, seq_len=512, metrics=("norms",),
        note="Published as a figure (figures/{size}/bos_vs_rest/l2_norms.png): in models with LN the first token's "
             "norm grows to about 3,100-3,600, in LN-free models it stays around 300-500. No table of numbers.")


PILE_10K = "NeelNanda/pile-10k"
PILE_10K_BASELINE = {"small": 2.7926, "medium": 2.49, "large": 2.48}
"""The original GPT-2's Pile-10k loss (``EVAL_RESULTS.md``; ``EVAL_TABLE_ALL.md`` for medium and large, 2 decimals)."""


def _pile10k(size: str) -> Figure:
    return Figure(
        name=f"pile10k-{size}", title=f"Pile-10k loss, GPT-2 {size}", paper=BARONI_2025,
        source="eval_lora.py lines 68-101 (eval_pile10k) on pile_eval.py lines 15-91: NeelNanda/pile-10k read whole, "
               "shuffle(seed=42), OpenWebText2/Books3/BookCorpus2 left out, each text + EOT, cut into 1024-token "
               "chunks, at most 10,000",
        models=SIZES[size], dataset=PILE_10K,
        sampling=Sampling("pile-eval", rows=10_000, seed=42, chunk=1024, streaming=False,
                          skip_sets=("OpenWebText2", "Books3", "BookCorpus2")),
        seq_len=1024, metrics=("ce",), column="text",
        published={"ce": (PILE_10K_BASELINE[size], None, None)},
        note="The repository's LoRA evaluations report the original GPT-2's Pile-10k loss as their baseline; the "
             "fine-tunes' were not evaluated there.")


def _neurons(size: str) -> Figure:
    neurons = {"small": "584,2123,2870", "medium": "3144,1083,1108"}[size]
    return Figure(
        name=f"neurons-{size}", title=f"Entropy neurons: mean ablation, GPT-2 {size}", paper=BARONI_2025,
        source="mech_interp/entropy_neurons/ablate_all_models.py lines 24-296, 498-549 (load_dataset.py lines "
               "59-60, 72-82: Pile-filtered shuffle(seed=42).take(250), first 512 tokens, no BOS)",
        models=SIZES[size], dataset=PILE_FILTERED, sampling=Sampling("first-tokens", rows=250, seed=42), seq_len=512,
        metrics=("ce",), neurons=neurons,
        note=f"Published as box plots (figures/{size}/all_models_loss_effect.png, all_models_entropy_effect.png) "
             f"of |Δ CE| and |Δ entropy| per token for neurons {neurons.replace(',', ', ')}: large with LN, none "
             "without. No table of numbers.")


FIGURES: dict[str, Figure] = {f.name: f for f in (
    *(_ce(size, corpus) for size in SIZES for corpus in ("owt", "pile", "pile-filtered")),
    _nmae("small"), _nmae("medium"), _inference("small"), _inference("medium"), _sinks(), _norms("small"),
    _norms("medium"), _neurons("small"), _neurons("medium"), *(_pile10k(size) for size in ("small", "medium", "large")),
)}
"""Every figure ``study --reproduce`` knows, by name."""

HEIMERSHEIM_NOTE = ("Heimersheim 2024 published CE for apollo-research/gpt2_noLN (OpenWebText 3.095 / 2.989 / 3.014, "
                    "Pile 2.856 / 2.880 / 2.926), measured with nanoGPT's evaluation, which draws random windows: no "
                    "study reproduces those exact tokens, so they are not printed beside one.")


def listing() -> str:
    """``study --reproduce list``: each figure's name, what it is, and where it comes from."""
    lines = [f"The papers' figures (code: {REPO}):", ""]
    for f in FIGURES.values():
        numbers = ", ".join(sorted(f.published)) or "figure only"
        lines.append(f"  {f.name:24s} {f.title} [{numbers}]")
        lines.append(f"  {'':24s} {f.source}")
    return "\n".join(lines)


def canonical(source: str, revision: str | None) -> str:
    """A model's identity for matching: the registry's spec when it is a known model."""
    if revision in ("main", ""):
        revision = None
    known = lookup(source, revision)
    return known.spec if known else (source if revision is None else f"{source}@{revision}")


def study_settings(doc: dict) -> dict:
    """A study document's comparable settings (see :meth:`Figure.settings`)."""
    spec = doc.get("corpus_spec") or {}
    s = doc.get("settings", {})
    return {"dataset": spec.get("source") if spec.get("kind") == "dataset" else f"({spec.get('kind', '?')}) "
            f"{spec.get('source', doc.get('corpus'))}", "config": spec.get("config"), "split": spec.get("split"),
            "field": spec.get("field"), "sampling": spec.get("sampling"), "seq_len": doc.get("seq_len"),
            "bos": doc.get("bos"), "max_tokens": doc.get("max_tokens"), "nmae_target": s.get("nmae_target")}


def _differences(figure: Figure, doc: dict) -> list[str]:
    want, got = figure.settings(), study_settings(doc)
    out = []
    for key, value in want.items():
        if key == "nmae_target" and value is None:
            continue
        if key == "sampling":
            theirs = got.get("sampling") or {}
            def same(a, b) -> bool:  # a JSON document holds tuples as lists
                return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)

            diff = [f"{k} {theirs.get(k)!r} (figure: {v!r})" for k, v in value.items()
                    if not same(theirs.get(k, () if k == "skip_sets" else None), v)]
            out += [f"sampling {d}" for d in diff]
        elif got.get(key) != value:
            out.append(f"{key.replace('_', ' ')} {got.get(key)!r} (figure: {value!r})")
    if not doc.get("complete", True):
        out.append("the study stopped before its end")
    return out


@dataclass(frozen=True)
class Match:
    """How one figure relates to a study: its columns among the study's models, and what differs."""

    figure: Figure
    columns: tuple[int | None, ...]
    """For each of the study's models, the figure's column it is (None when it is not one of the figure's)."""
    differences: tuple[str, ...]

    @property
    def same_settings(self) -> bool:
        return not self.differences


_MEASURED = {"ce": "ce", "ce_median": "ce", "ce_p2.5": "ce", "ce_p97.5": "ce", "ce_p99.95": "ce",
             "entropy": "entropy", "ece": "ece", "nmae": "nmae", "sink_papers": "sink_rate"}
"""Published metric -> the study document's key that holds it (null when the study did not measure it)."""


def _measured(figure: Figure, doc: dict) -> bool:
    """Whether the study measured any of the figure's published numbers."""
    keys = {_MEASURED[k] for k in figure.published}
    return (any(m.get(k) is not None for m in doc["models"] for k in keys)
            or bool(figure.published_pairs and doc.get("pairs")))


def matches(doc: dict) -> list[Match]:
    """The figures sharing a model, the dataset and a measured metric with a study, with the settings that differ
    (none: comparable)."""
    ids = [canonical(m["source"], m.get("revision")) for m in doc["models"]]
    out = []
    for figure in FIGURES.values():
        if not (figure.published or figure.published_pairs) or not _measured(figure, doc):
            continue
        columns = tuple(figure.models.index(i) if i in figure.models else None for i in ids)
        if all(c is None for c in columns) or study_settings(doc)["dataset"] != figure.dataset:
            continue
        out.append(Match(figure, columns, tuple(_differences(figure, doc))))
    return out


def other_corpora(doc: dict) -> list[str]:
    """Figures with numbers for a study's models on other datasets (to name, never to print)."""
    ids = {canonical(m["source"], m.get("revision")) for m in doc["models"]}
    dataset = study_settings(doc)["dataset"]
    return [f.name for f in FIGURES.values() if (f.published or f.published_pairs) and ids & set(f.models)
            and f.dataset != dataset]


def cites_heimersheim(doc: dict) -> bool:
    return any(canonical(m["source"], m.get("revision")).startswith("apollo-research/gpt2_noLN") for m in doc["models"])


def resolve(name: str) -> Figure:
    """The figure called ``name``; one line naming how to list them otherwise."""
    if name not in FIGURES:
        raise InputError(f"unknown figure {name!r}: `study --reproduce list` names them")
    return FIGURES[name]
