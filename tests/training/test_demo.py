"""The shipped offline demo trio: small enough, float32, each what it says it is, its cards' numbers re-measured."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from streamlit.testing.v1 import AppTest

from noln_core import compare, direct_logit_attribution, load_model, registry
from noln_core.analyses import exactness_tolerance
from noln_core.training.demo import (
    CONTROL_NAME, MAX_DEMO_BYTES, NAMES, demo_paths, heldout_chunks, heldout_loss, token_losses,
    shipped_metrics,
)
from pages.shell.links import PRESETS

BASE, CONTROL, NOLN = demo_paths()
ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")
METRICS = shipped_metrics()


@pytest.fixture(scope="module")
def trio():
    return {spec: load_model(spec, device="cpu") for spec in registry.DEMO_TRIO}


@pytest.fixture(scope="module")
def held():
    return heldout_chunks()


@pytest.fixture(scope="module")
def losses(held) -> dict:
    """Every shipped model's per-token held-out losses, without and with BOS: computed once for the tests below."""
    return {(name, bos): token_losses(ROOT / "noln_core/data/demo" / name, held, bos=bos)
            for name in NAMES for bos in (False, True)}


def test_shipped_trio_is_float32_and_fits_the_budget():
    total = 0
    for directory in (BASE, CONTROL, NOLN):
        total += sum(f.stat().st_size for f in directory.iterdir())
        with safe_open(directory / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert total <= MAX_DEMO_BYTES == 40_000_000


def test_demo_models_load_by_name_and_are_what_they_say(trio):
    base, control, noln = (trio[s] for s in registry.DEMO_TRIO)
    assert not base.ln_free and not control.ln_free and noln.ln_free
    assert noln.info.eps == 1e12 and json.loads((NOLN / "config.json").read_text())["layer_norm_epsilon"] == 1e12
    assert control.info.eps == pytest.approx(1e-5)
    assert not [n for n in noln.hook_names() if any(part.startswith("ln") for part in n.split("."))]
    assert any(part.startswith("ln") for n in control.hook_names() for part in n.split("."))
    assert registry.REGISTRY[registry.DEMO_NOLN].control == registry.DEMO_CONTROL
    assert registry.REGISTRY[registry.DEMO_CONTROL].kind == "ln_control"
    recipes = [json.loads((d / "removal.json").read_text()) for d in (CONTROL, NOLN)]
    same = ("steps", "batch", "lr", "min_lr", "seed", "seq_len", "warmup")
    assert [r["recipe"][k] for k in same for r in recipes[:1]] == [recipes[1]["recipe"][k] for k in same]
    assert recipes[0]["kind"] == "ln_control" and recipes[1]["kind"] == "ln_free"


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_work_on_the_demo_and_ln_free_dla_is_exact(trio, preset):
    result = compare([trio[registry.DEMO_BASE], trio[registry.DEMO_NOLN]], preset.text, preset.answer,
                     preset.counterfactual)
    dla = direct_logit_attribution(result)
    assert dla[1].exact and dla[1].error <= exactness_tolerance(dla[1].logit_diff)
    assert np.isfinite(dla[0].error)


def test_the_declared_window_was_trained(trio, held, losses):
    """Positions 128-255 were untrained in the old demo (held-out loss rose by 0.4-0.7 there); now the late half of the
    window is within 0.1 nats of positions 64-127 (over every held-out chunk: content noise is a few hundredths)."""
    assert held.shape[1] == trio[registry.DEMO_BASE].info.n_ctx == 256
    for name in NAMES:
        nll = losses[name, False].mean(0)
        assert nll[128:].mean() <= nll[64:128].mean() + 0.1, name


def test_cards_and_readme_report_the_shipped_models_losses(held, losses):
    measured = losses
    losses = METRICS["losses"]
    assert METRICS["heldout_chunks"] == len(held) and METRICS["heldout_tokens"] == held.size
    assert heldout_loss(ROOT / "noln_core/data/demo" / NAMES[0], held[:4]) == pytest.approx(
        float(measured[NAMES[0], False][:4].mean()), abs=1e-12)  # the cards' number is the mean of these
    for name in NAMES:
        for key, bos in (("no_bos", False), ("bos", True)):
            assert float(measured[name, bos].mean()) == pytest.approx(losses[name][key], abs=1e-4)
        card = (ROOT / "noln_core/data/demo" / name / "README.md").read_text()
        assert "public domain" in card and "King James" in card and "## Samples" in card
        assert "fine-tuned with LN" in card and "LN-free" in card
    readme = (ROOT / "README.md").read_text()
    for label, key in (("no BOS (the papers' convention)", "no_bos"), ("BOS first (the app's default)", "bos")):
        row = re.search(rf"\| {re.escape(label)} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([+−-][0-9.]+) \|", readme)
        assert row, label
        assert [float(x) for x in row.groups()[:3]] == [round(losses[n][key], 4) for n in NAMES]
        card = (NOLN / "README.md").read_text()
        assert row.group(0) in card


def test_the_cards_loss_is_the_studys_full_softmax_cross_entropy(trio, held, tmp_path):
    """The cards' fast exact loss (zero unembedding rows enter as log(n_zero)) equals the study engine's full-vocabulary
    softmax on the same chunks of the ``demo`` corpus (the first 16, to keep the test short)."""
    from noln_core.study import Settings, parse_corpus, run_study

    models = [trio[spec] for spec in registry.DEMO_TRIO]
    result = run_study(models, parse_corpus("demo"), seq_len=256, batch=8, max_tokens=16 * 256,
                       settings=Settings(metrics=("ce",)), state_dir=tmp_path)
    assert result.n_sequences == 16
    for model, name in zip(result.models, NAMES):
        assert model.ce.mean == pytest.approx(heldout_loss(ROOT / "noln_core/data/demo" / name, held[:16]), abs=1e-5)


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


def test_app_starts_on_the_demo_pair_and_its_third_model_is_the_control(monkeypatch):
    monkeypatch.delenv("NOLN_DEFAULT_MODELS", raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception and not at.error
    assert at.query_params["model_a"] == registry.DEMO_BASE and at.query_params["model_b"] == registry.DEMO_NOLN
    assert any("gpt2-kjv" in m.label for m in at.metric)
    label = at.sidebar.selectbox(key="w_model_a")
    assert label.format_func(label.value).startswith("demo (offline)")
    at.sidebar.checkbox(key="w_add_c").check().run()
    assert not at.exception and not at.error
    assert at.query_params["model_c"] == registry.DEMO_CONTROL
    assert len([m for m in at.metric if m.label.startswith("Mean loss")]) == 3


def test_about_page_shows_the_demo_table_and_what_the_gaps_mean(monkeypatch):
    monkeypatch.delenv("NOLN_DEFAULT_MODELS", raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/views/about.py").run()
    text = "\n".join(m.value for m in at.markdown)
    assert "fine-tuned with LN → LN-free" in text and "original → fine-tuned with LN" in text
    assert f"{METRICS['losses'][CONTROL_NAME]['no_bos']:.4f}" in text


def test_make_demo_without_the_bible_text_is_one_line(monkeypatch, capsys, tmp_path):
    from noln_core.cli import main
    from noln_core.training import demo

    def missing():
        raise RuntimeError("the King James text comes from Debian's bible-kjv: apt-get install bible-kjv")

    monkeypatch.setattr(demo, "kjv_chapters", missing)
    assert main(["make-demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "apt-get install bible-kjv" in err and err.count("\n") == 1
