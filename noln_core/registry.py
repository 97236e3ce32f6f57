"""Known models: GPT-2, its LayerNorm-free fine-tunes and their LN controls.

``apollo-research/gpt2_noLN`` publishes its five removal schedules (v1-v5) and
its fine-tuned-with-LN controls as *git revisions* (branches) of one Hugging
Face repo, so a model is named by a repo id plus an optional revision.  On the
command line and in links this is written ``SOURCE@REVISION``
(``apollo-research/gpt2_noLN@v2``); :func:`parse_spec` splits it.  The
``schaeff/*`` models of the follow-up paper are separate repos, one per size.
:func:`list_revisions` asks the hub for a repo's branches and tags when it can.

Citations:
- Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning",
  arXiv:2409.13710.
- Baroni, Khara, Schaeffer, Subkhankulov, Heimersheim 2025, "Transformers
  Don't Need LayerNorm at Inference Time", arXiv:2507.02559.
"""

from __future__ import annotations

from dataclasses import dataclass

HEIMERSHEIM_2024 = 'Heimersheim 2024, "You can remove GPT2\'s LayerNorm by fine-tuning", arXiv:2409.13710'
BARONI_2025 = (
    "Baroni, Khara, Schaeffer, Subkhankulov, Heimersheim 2025, "
    '"Transformers Don\'t Need LayerNorm at Inference Time", arXiv:2507.02559'
)
RADFORD_2019 = 'Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2)'

PUBLISHED_CE_BARONI: dict[str, dict[str, tuple[float, float, float]]] = {
    "OpenWebText": {"small": (3.1006, 3.0126, 3.0797), "medium": (2.8145, 2.7390, 2.7642),
                    "large": (2.6623, 2.6240, 2.6384), "xl": (2.5567, 2.4799, 2.5052)},
    "Pile": {"small": (2.8450, 2.8511, 2.8852), "medium": (2.5163, 2.5752, 2.6579),
             "large": (2.5320, 2.6233, 2.7504), "xl": (2.4436, 2.4673, 130.22)},
    "Pile-filtered": {"small": (2.7899, 2.8112, 2.8757), "medium": (2.5390, 2.5724, 2.6352),
                      "large": (2.4347, 2.5074, 2.5159), "xl": (2.3739, 2.3821, 2.3992)},
}
"""Baroni et al. 2025's cross-entropy: corpus -> size -> (original, fine-tuned with LN, LN-free) (PAPERS.md)."""
PUBLISHED_CE_HEIMERSHEIM: dict[str, tuple[float, float, float]] = {
    "OpenWebText": (3.095, 2.989, 3.014), "Pile": (2.856, 2.880, 2.926)}
"""Heimersheim 2024's cross-entropy of GPT-2 small, corpus -> (original, fine-tuned with LN, gpt2_noLN)."""

GPT2_NOLN = "apollo-research/gpt2_noLN"
GPT2_NOLN_DEFAULT_REVISION = "v4"


@dataclass(frozen=True)
class KnownModel:
    """One registry entry: a repo id (plus revision) with what it is."""

    repo_id: str
    """Hugging Face repo id, e.g. ``"apollo-research/gpt2_noLN"``."""
    revision: str | None
    """Git revision (branch, tag or commit); ``None`` means the repo's default branch."""
    kind: str
    """``"original"``, ``"ln_free"`` or ``"ln_control"`` (fine-tuned *with* LN)."""
    size: str
    """``"small"``, ``"medium"``, ``"large"`` or ``"xl"``."""
    description: str
    """One line for menus and ``--help``."""
    citation: str
    """Paper to cite when showing this model's numbers."""
    control: str | None = None
    """For an LN-free model: the spec of its fine-tuned-with-LN control."""
    original: str | None = None
    """For fine-tunes: the spec of the original GPT-2 it started from."""

    @property
    def spec(self) -> str:
        """``repo_id`` or ``repo_id@revision``: the string the CLI and links use."""
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


_SIZES = {"small": ("gpt2", 300), "medium": ("gpt2-medium", 500), "large": ("gpt2-large", 600), "xl": ("gpt2-xl", 800)}


def _build() -> dict[str, KnownModel]:
    models: list[KnownModel] = []
    for size, (hf_name, steps) in _SIZES.items():
        original = f"openai-community/{hf_name}"
        models.append(KnownModel(original, None, "original", size, f"GPT-2 {size}, the original OpenAI weights", RADFORD_2019))
        control = f"schaeff/gpt2-{size}_vanilla{steps}"
        models.append(
            KnownModel(
                f"schaeff/gpt2-{size}_LNFree{steps}", None, "ln_free", size,
                f"GPT-2 {size} with every LayerNorm removed by fine-tuning ({steps} steps, Baroni et al. 2025)",
                BARONI_2025, control=control, original=original,
            )
        )
        models.append(
            KnownModel(
                control, None, "ln_control", size,
                f"GPT-2 {size} fine-tuned *with* LayerNorm on the same data and steps: the control for LNFree{steps}",
                BARONI_2025, original=original,
            )
        )
    schedules = {
        "v1": "removal schedule v1", "v2": "removal schedule v2 (the default before 2024-09-06)",
        "v3": "removal schedule v3", "v4": "removal schedule v4, the repo's default and best model",
        "v5": "removal schedule v5",
    }
    for rev, what in schedules.items():
        models.append(
            KnownModel(
                GPT2_NOLN, rev, "ln_free", "small",
                f"GPT-2 small with LayerNorm fine-tuned out, {what} (Heimersheim 2024)",
                HEIMERSHEIM_2024, control=f"{GPT2_NOLN}@vanilla", original="openai-community/gpt2",
            )
        )
    for rev, what in {"vanilla": "same data and length", "vanilla_1200": "1200 iterations"}.items():
        models.append(
            KnownModel(
                GPT2_NOLN, rev, "ln_control", "small",
                f"GPT-2 small fine-tuned *with* LayerNorm ({what}): the control for gpt2_noLN",
                HEIMERSHEIM_2024, original="openai-community/gpt2",
            )
        )
    return {m.spec: m for m in models}


DEMO_PREFIX = "demo:"
DEMO_BASE, DEMO_NOLN, DEMO_CONTROL = "demo:gpt2-kjv", "demo:gpt2-kjv-noLN", "demo:gpt2-kjv-ft"


def _demo_entries() -> list[KnownModel]:
    cite = "noLN Explorer's offline demo (see its model card in noln_core/data/demo)"
    return [
        KnownModel(DEMO_BASE, None, "original", "demo",
                   "demo (offline): a 6-layer GPT-2 trained on the King James Bible, with LayerNorm", cite),
        KnownModel(DEMO_NOLN, None, "ln_free", "demo",
                   "demo (offline): its LN-free fine-tune, made with the papers' removal schedule", cite,
                   control=DEMO_CONTROL, original=DEMO_BASE),
        KnownModel(DEMO_CONTROL, None, "ln_control", "demo",
                   "demo (offline): its fine-tune *with* LayerNorm, same data and steps: the control", cite,
                   original=DEMO_BASE),
    ]


REGISTRY: dict[str, KnownModel] = {**_build(), **{m.spec: m for m in _demo_entries()}}
"""Every known model, keyed by its spec (``repo``, ``repo@revision`` or ``demo:name``)."""

DEFAULT_PAIR: tuple[str, str] = ("openai-community/gpt2", f"{GPT2_NOLN}@{GPT2_NOLN_DEFAULT_REVISION}")
"""The default comparison with hub access: GPT-2 small against gpt2_noLN v4."""

DEMO_PAIR: tuple[str, str] = (DEMO_BASE, DEMO_NOLN)
"""The embedded offline default, shipped in the repository."""

DEMO_TRIO: tuple[str, str, str] = (DEMO_BASE, DEMO_CONTROL, DEMO_NOLN)
"""The papers' three columns for the demo: original, fine-tuned with LN, LN-free."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once when ``HF_HUB_OFFLINE`` is set)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(DEFAULT_PAIR[0], timeout=timeout)
        return True
    except Exception:  # no network, DNS failure, hub down: all mean "use what is local"
        return False


def default_pair_cached() -> bool:
    """Whether both default models are already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for spec in DEFAULT_PAIR:
            repo, revision = parse_spec(spec)
            if not isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
                return False
        return True
    except Exception:
        return False


_default: tuple[str, str] | None = None


def default_pair() -> tuple[str, str]:
    """gpt2 against gpt2_noLN when they are cached or the hub answers, else the shipped demo pair (once per process)."""
    global _default
    if _default is None:
        _default = DEFAULT_PAIR if default_pair_cached() or hub_reachable() else DEMO_PAIR
    return _default

_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
            "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"SOURCE@REVISION"`` into ``(source, revision)``.

    The revision is whatever follows the *last* ``@``; a source with no ``@``
    gets ``None``.  Local paths may contain ``@`` only if they exist as typed,
    which :func:`noln_core.loading.load_model` checks before splitting.
    """
    spec = spec.strip()
    if "@" in spec:
        source, _, revision = spec.rpartition("@")
        return source.strip(), (revision.strip() or None)
    return spec, None


def canonical_repo(source: str) -> str:
    """Map the hub's legacy short names (``gpt2``) to their canonical repo ids."""
    return _ALIASES.get(source, source)


def lookup(source: str, revision: str | None) -> KnownModel | None:
    """The registry entry for ``source``/``revision``, if it is a known model.

    A missing revision on gpt2_noLN means its default branch, which is v4.
    """
    repo = canonical_repo(source)
    if repo.startswith(DEMO_PREFIX):
        return REGISTRY.get(repo)
    if revision is None and repo == GPT2_NOLN:
        revision = GPT2_NOLN_DEFAULT_REVISION
    return REGISTRY.get(repo if revision is None else f"{repo}@{revision}")


def list_revisions(repo_id: str) -> list[str]:
    """Branches and tags of a hub repo; falls back to the registry when offline.

    Revisions are plain git refs on the hub, so any branch, tag or commit hash
    works as ``revision=``; this lists the named ones.
    """
    repo = canonical_repo(repo_id)
    known = [m.revision for m in REGISTRY.values() if m.repo_id == repo and m.revision]
    try:
        from huggingface_hub import HfApi

        refs = HfApi().list_repo_refs(repo)
        found = [b.name for b in refs.branches] + [t.name for t in refs.tags]
        return sorted(set(found))
    except Exception:  # offline, unknown repo, rate limit: the registry is the best we know
        return known
