"""The shipped offline demo pair: small enough, LN-free where it says so, exact, the default without a hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from noln_core import compare, direct_logit_attribution, load_model, registry
from noln_core.analyses import exactness_tolerance
from noln_core.paths import DEMO_DIR
from noln_core.training.demo import demo_paths, heldout_loss, tokenize_file
from pages.shell.links import PRESETS

BASE, NOLN = demo_paths()
APP = str(Path(__file__).resolve().parents[2] / "app.py")


@pytest.fixture(scope="module")
def pair():
    return load_model(registry.DEMO_BASE, device="cpu"), load_model(registry.DEMO_NOLN, device="cpu")


def test_shipped_weights_fit_the_budget():
    sizes = [(d / "model.safetensors").stat().st_size for d in (BASE, NOLN)]
    assert sum(sizes) <= 25 * 2**20


def test_demo_models_load_by_name(pair):
    base, noln = pair
    assert not base.ln_free and noln.ln_free
    assert noln.info.eps == 1e12 and json.loads((NOLN / "config.json").read_text())["layer_norm_epsilon"] == 1e12
    assert not [n for n in noln.hook_names() if any(part.startswith("ln") for part in n.split("."))]


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_work_on_the_demo_pair_and_ln_free_dla_is_exact(pair, preset):
    result = compare(list(pair), preset.text, preset.answer, preset.counterfactual)
    dla = direct_logit_attribution(result)
    assert dla[1].exact and dla[1].error <= exactness_tolerance(dla[1].logit_diff)
    assert np.isfinite(dla[0].error)


def test_model_cards_report_the_shipped_models_losses():
    heldout = DEMO_DIR / "heldout.txt"
    from noln_core.tokenizer import gpt2_tokenizer

    tokens = tokenize_file(heldout, gpt2_tokenizer())
    for directory in (BASE, NOLN):
        card = (directory / "README.md").read_text()
        metrics = json.loads((directory / "metrics.json").read_text())
        assert "public domain" in card and "King James" in card and "## Samples" in card
        assert f"{metrics['base_loss']:.4f}" in card and f"{metrics['noln_loss']:.4f}" in card
        gap = re.search(r"gap \(LN-free − with LN\) \| ([+-][0-9.]+)", card).group(1)
        assert float(gap) == pytest.approx(metrics["noln_loss"] - metrics["base_loss"], abs=1e-4)
    metrics = json.loads((BASE / "metrics.json").read_text())
    assert metrics["heldout_tokens"] == len(tokens)
    assert abs(heldout_loss(BASE, tokens, metrics["block"]) - metrics["base_loss"]) < 1e-3
    assert abs(heldout_loss(NOLN, tokens, metrics["block"]) - metrics["noln_loss"]) < 1e-3


@pytest.mark.parametrize("hub_answers", [False, True])
def test_default_pair_is_the_demo_only_without_a_hub(monkeypatch, hub_answers):
    """The hub is asked (offline mode off); its answer, not the environment, decides the default pair."""
    import huggingface_hub

    def model_info(self, *args, **kwargs):
        if not hub_answers:
            raise ConnectionError("no route to host")
        return object()

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(registry, "default_pair_cached", lambda: False)
    monkeypatch.setattr(registry, "_default", None)
    assert registry.hub_reachable() is hub_answers
    assert registry.default_pair() == (registry.DEFAULT_PAIR if hub_answers else registry.DEMO_PAIR)


def test_cli_defaults_to_the_demo_pair_offline(capsys):
    from noln_core.cli import main

    assert main(["compare", "--text", "In the beginning God created", "--json", "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["source"] for m in doc["models"]] == list(registry.DEMO_PAIR)
    assert [m["ln_free"] for m in doc["models"]] == [False, True]


def test_app_starts_on_the_demo_pair_offline(monkeypatch):
    monkeypatch.delenv("NOLN_DEFAULT_MODELS", raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception and not at.error
    assert at.query_params["model_a"] == registry.DEMO_BASE and at.query_params["model_b"] == registry.DEMO_NOLN
    assert any("gpt2-kjv" in m.label for m in at.metric)
    label = at.sidebar.selectbox(key="w_model_a")
    assert label.format_func(label.value).startswith("demo (offline)")
