"""The registry of known models and the SRC@REV spelling."""

from __future__ import annotations

import pytest

from noln_core import DEFAULT_PAIR, REGISTRY, parse_spec
from noln_core.registry import BARONI_2025, HEIMERSHEIM_2024, list_revisions, lookup


def test_every_model_of_the_papers_is_known():
    for size, steps in {"small": 300, "medium": 500, "large": 600, "xl": 800}.items():
        free, control = REGISTRY[f"schaeff/gpt2-{size}_LNFree{steps}"], REGISTRY[f"schaeff/gpt2-{size}_vanilla{steps}"]
        assert free.kind == "ln_free" and control.kind == "ln_control" and free.control == control.spec
        assert free.citation == BARONI_2025 and "2507.02559" in free.citation
        assert free.original in REGISTRY
    for rev in ["v1", "v2", "v3", "v4", "v5"]:
        entry = REGISTRY[f"apollo-research/gpt2_noLN@{rev}"]
        assert entry.kind == "ln_free" and entry.citation == HEIMERSHEIM_2024 and "2409.13710" in entry.citation
        assert entry.control in REGISTRY
    for name in ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]:
        assert REGISTRY[f"openai-community/{name}"].kind == "original"
    assert all(m.description and m.citation for m in REGISTRY.values())


def test_default_pair_is_gpt2_against_gpt2_noln_v4():
    assert DEFAULT_PAIR == ("openai-community/gpt2", "apollo-research/gpt2_noLN@v4")
    assert all(spec in REGISTRY for spec in DEFAULT_PAIR)


@pytest.mark.parametrize("spec, expected", [
    ("apollo-research/gpt2_noLN@v2", ("apollo-research/gpt2_noLN", "v2")),
    ("openai-community/gpt2", ("openai-community/gpt2", None)),
    (" gpt2@main ", ("gpt2", "main")),
    ("x@", ("x", None)),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


def test_lookup_defaults_gpt2_noln_to_v4_and_maps_short_names():
    assert lookup("apollo-research/gpt2_noLN", None).revision == "v4"
    assert lookup("gpt2", None).repo_id == "openai-community/gpt2"
    assert lookup("nobody/nothing", None) is None


def test_list_revisions_offline_falls_back_to_the_registry():
    revisions = list_revisions("apollo-research/gpt2_noLN")
    assert {"v1", "v2", "v3", "v4", "v5", "vanilla"} <= set(revisions)
