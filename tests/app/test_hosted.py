"""Hosted mode and hostile input in the app: limits, registry-only models, escaping, faults that leave it usable."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from noln_core import OfflineError
from pages.shell.limits import load_limits

APP = str(Path(__file__).resolve().parents[2] / "app.py")
HOSTILE = [
    "<script>alert('x')</script> and <img src=x onerror=alert(1)>",
    "**bold** _it_ [link](javascript:alert(1)) $\\frac{a}{b}$ :rocket: :red[red] # heading",
    "\u202eRTL override\u200f and zero\u200bwidth \u200d joiners",
    "emoji 🙂👩‍👩‍👧🏳️‍🌈 mixed",
    "tabs\tand\x0cform feeds\t\t\x0c\x0c",
    "a" * 10_000,
]


@pytest.fixture
def hosted(monkeypatch):
    """Reload the app's limits with NOLN_HOSTED=1; restore them afterwards."""
    import pages.shell.limits as limits

    monkeypatch.setenv("NOLN_HOSTED", "1")
    monkeypatch.setenv("NOLN_MAX_TOKENS", "20")
    monkeypatch.delenv("NOLN_DEFAULT_MODELS", raising=False)
    importlib.reload(limits)
    yield limits
    monkeypatch.delenv("NOLN_HOSTED")
    monkeypatch.delenv("NOLN_MAX_TOKENS")
    importlib.reload(limits)


def test_limits_from_config_and_environment(tmp_path):
    config = tmp_path / "noln.toml"
    config.write_text("[hosted]\nenabled = true\nmax_tokens = 100\nmax_models = 2\n[local]\nmax_models = 5\n")
    assert load_limits({}, config).hosted and load_limits({}, config).max_tokens == 100
    local = load_limits({"NOLN_HOSTED": "0"}, config)
    assert not local.hosted and local.max_models == 5 and local.max_tokens is None
    assert load_limits({"NOLN_HOSTED": "1", "NOLN_MAX_MODELS": "7"}, config).max_models == 7
    assert load_limits({"NOLN_HOSTED": "1", "NOLN_MAX_MODELS": "-3"}, config).max_models == 2
    (tmp_path / "bad.toml").write_text("not [toml")
    assert not load_limits({}, tmp_path / "bad.toml").hosted
    shipped = load_limits({})
    assert not shipped.hosted  # hosted mode is off locally by default


def test_hosted_mode_refuses_local_paths_and_limits_tokens(hosted, ln_dir):
    assert hosted.LIMITS.hosted and hosted.LIMITS.max_tokens == 20
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model_a": str(ln_dir), "text": "word " * 100})
    at.run()
    assert not at.exception and not at.error
    notes = " ".join(w.value for w in at.warning)
    assert "ignored model\\_a" in notes and "registry" in notes
    assert "only the first 20 (this deployment's limit)" in notes
    options = at.sidebar.selectbox(key="w_model_a").options
    assert all("Other" not in o for o in options)


@pytest.mark.parametrize("text", HOSTILE, ids=["html", "markdown-latex", "rtl-zero-width", "emoji", "tab-formfeed", "10k"])
def test_hostile_text_is_shown_as_text(ln_dir, noln_dir, text):
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir), "text": text, "answer": text[:50],
                            "counterfactual": " the", "page": "logit-difference"})
    at.run()
    assert not at.exception and not at.error
    assert at.sidebar.text_area(key="w_text").value == text
    from pages.shell.display import md

    rendered = [e.value for e in (*at.markdown, *at.caption, *at.warning, *at.subheader)] + [m.label for m in at.metric]
    for value in rendered:
        for fragment in ("<script>", "<img", "**bold**", "$\\frac", "[link](", ":rocket:", ":red["):
            if fragment in value.replace("\\", ""):  # the user's markup reached Markdown: it must be escaped there
                assert md(fragment) in value, (fragment, value)


def test_a_failed_download_does_not_poison_the_cache(monkeypatch, ln_dir, noln_dir):
    import pages.shell.cache as common

    real = common.noln_core.load_model
    failures = {"left": 1}

    def flaky(spec, **kwargs):
        if "noln" in str(spec) and failures["left"]:
            failures["left"] -= 1
            raise OfflineError("the download was interrupted")
        return real(spec, **kwargs)

    monkeypatch.setattr(common.noln_core, "load_model", flaky)
    common.model_store().clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir), "text": "kept text"})
    at.run()
    assert not at.exception and any("interrupted" in e.value for e in at.error)
    at.run()  # the retry loads
    assert not at.exception and not at.error
    assert at.sidebar.text_area(key="w_text").value == "kept text"


def test_out_of_memory_on_load_gives_a_message(monkeypatch, ln_dir, noln_dir):
    import pages.shell.cache as common

    def oom(spec, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(common.noln_core, "load_model", oom)
    common.model_store().clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir), "text": "kept text"})
    at.run()
    assert not at.exception and any("Out of memory" in e.value for e in at.error)
    assert at.sidebar.text_area(key="w_text").value == "kept text"
    common.model_store().clear()


def test_switching_a_model_between_runs_is_safe(ln_dir, noln_dir):
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir)})
    at.run()
    before = at.session_state["_run"][1]
    at.sidebar.selectbox(key="w_model_b").set_value("Other (repo id or local directory)…").run()
    at.sidebar.text_input(key="w_model_b_custom").set_value(str(ln_dir)).run()
    assert not at.exception and not at.error
    after = at.session_state["_run"][1]
    assert [r.info.ln_free for r in after.runs] == [False, False]
    assert [r.info.ln_free for r in before.runs] == [False, True]  # an earlier result stays intact


def test_the_run_cache_stays_within_its_byte_budget(ln_dir, noln_dir):
    """Many distinct texts with every analysis kept: the cache's own accounting never passes its budget."""
    from noln_core import ANALYSES, compare, load_model
    from pages.shell.cache import RunCache

    models = (load_model(str(ln_dir), device="cpu"), load_model(str(noln_dir), device="cpu"))
    one = compare(list(models), "a first text to size the budget by", " the", " a")
    cache = RunCache(budget=int(one.nbytes * 3.5))
    for i in range(25):
        result = compare(list(models), f"distinct text number {i} " + "word " * (i % 7), " the", " a")
        entry = cache.put([("k", i)], result)
        for fn in ANALYSES:
            cache.add_analysis(entry, fn.__name__, fn(result))
        assert cache.nbytes <= cache.budget
    assert 1 <= len(cache) <= 4 and cache.get(("k", 24)) is not None and cache.get(("k", 0)) is None


def test_the_app_keeps_runs_within_its_budget_on_the_attention_page(monkeypatch, ln_dir, noln_dir):
    import pages.shell.cache as cache
    import pages.shell.limits as limits

    monkeypatch.setenv("NOLN_RUN_CACHE_MB", "1")
    importlib.reload(limits)
    cache.run_cache.clear()
    try:
        at = AppTest.from_file(APP, default_timeout=120)
        at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir), "page": "attention"})
        at.run()
        for i in range(8):
            at.sidebar.text_area(key="w_text").set_value(f"text {i} " + "many words here " * (3 + i)).run()
            assert not at.exception and not at.error
            assert cache.run_cache().nbytes <= 1_000_000
    finally:
        monkeypatch.delenv("NOLN_RUN_CACHE_MB")
        importlib.reload(limits)
        cache.run_cache.clear()


def test_a_third_model_that_cannot_fit_gets_a_message_not_an_oom(monkeypatch, ln_dir, noln_dir):
    """With a model budget, the store sizes each model from its config and refuses what cannot fit, before loading."""
    import pages.shell.cache as cache
    import pages.shell.limits as limits
    from noln_core.loading import estimate_bytes

    size = estimate_bytes(str(ln_dir), device="cpu")
    monkeypatch.setenv("NOLN_MODEL_MEMORY_MB", str(int(size * 1.5 / 1e6)))
    importlib.reload(limits)
    cache.model_store.clear()
    try:
        at = AppTest.from_file(APP, default_timeout=120)
        at.query_params.update({"model_a": str(ln_dir), "model_b": str(noln_dir), "text": "kept text"})
        at.run()  # each tiny model fits alone, but a run needs both alive at once: refused before loading
        assert not at.exception and any("need about" in e.value and "together" in e.value for e in at.error), [e.value for e in at.error]
        assert cache.model_store().live_bytes() == 0
        monkeypatch.setenv("NOLN_MODEL_MEMORY_MB", str(int(size * 2.5 / 1e6)))
        importlib.reload(limits)
        cache.model_store.clear()
        at.run()  # the pair fits
        assert not at.exception and not at.error and cache.model_store().live_bytes() <= size * 2.5
        monkeypatch.setenv("NOLN_MODEL_MEMORY_MB", str(int(size * 0.5 / 1e6)))
        importlib.reload(limits)
        cache.model_store.clear()
        at.sidebar.checkbox(key="w_add_c").check().run()
        assert not at.exception
        assert any("this server keeps for models" in e.value for e in at.error), [e.value for e in at.error]
        assert at.sidebar.text_area(key="w_text").value == "kept text"
    finally:
        monkeypatch.delenv("NOLN_MODEL_MEMORY_MB")
        importlib.reload(limits)
        cache.model_store.clear()


def test_many_sessions_on_different_pairs_and_dtypes_stay_within_the_model_budget(monkeypatch):
    """The probe that kept 11 models alive (3.1x a 30 MB budget) through six sessions: sessions now keep specs,
    not models, and the store counts every model still alive.  Checked by a census of the live models."""
    import gc
    import weakref

    import pages.shell.cache as cache
    import pages.shell.limits as limits
    from noln_core import LoadedModel
    from noln_core.registry import DEMO_BASE, DEMO_CONTROL, DEMO_NOLN

    budget_mb = 30
    for name, value in (("NOLN_HOSTED", "1"), ("NOLN_MODEL_MEMORY_MB", str(budget_mb)), ("NOLN_MAX_TOKENS", "24")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NOLN_DEFAULT_MODELS", raising=False)
    importlib.reload(limits)
    cache.model_store.clear()

    def live_models() -> list:
        import warnings

        gc.collect()
        with warnings.catch_warnings():  # isinstance() on every object wakes torch's deprecated aliases
            warnings.simplefilter("ignore")
            return [o for o in gc.get_objects() if isinstance(o, LoadedModel)]

    before = weakref.WeakSet(live_models())  # other tests' models (module fixtures) are not this server's

    def live_model_bytes() -> int:
        return sum(o.nbytes for o in live_models() if o not in before)

    sessions = []
    try:
        for i, (a, b, dtype) in enumerate([(DEMO_BASE, DEMO_NOLN, "float32"), (DEMO_BASE, DEMO_CONTROL, "bfloat16"),
                                           (DEMO_NOLN, DEMO_CONTROL, "float32"), (DEMO_CONTROL, DEMO_BASE, "float16"),
                                           (DEMO_NOLN, DEMO_BASE, "bfloat16"), (DEMO_CONTROL, DEMO_NOLN, "float16")]):
            at = AppTest.from_file(APP, default_timeout=120)
            at.query_params.update({"model_a": a, "model_b": b, "dtype": dtype, "device": "cpu",
                                    "text": f"And God said, let session {i} be"})
            at.run()
            assert not at.exception and not at.error, [e.value for e in at.error]
            sessions.append(at)  # every session stays open
            assert live_model_bytes() <= budget_mb * 1_000_000
            assert cache.model_store().live_bytes() <= budget_mb * 1_000_000
        for at in sessions:  # and each can still use its page (its models come back from the store)
            at.switch_page("pages/views/attention.py").run()
            assert not at.exception and not at.error
            assert live_model_bytes() <= budget_mb * 1_000_000
    finally:
        for name in ("NOLN_HOSTED", "NOLN_MODEL_MEMORY_MB", "NOLN_MAX_TOKENS"):
            monkeypatch.delenv(name)
        importlib.reload(limits)
        cache.model_store.clear()


def test_hosted_messages_name_no_server_path_and_give_no_command_line_advice(hosted):
    """The page speaks to a visitor, not to whoever runs the server (SECURITY.md)."""
    from pages.shell.display import for_page

    offline = ("cannot reach the Hugging Face hub and openai-community/gpt2 is not cached: pre-download it where there "
               "is a network (`hf download openai-community/gpt2`) and copy the cache "
               "(~/.cache/huggingface), or point at a local directory holding config.json and the weights")
    shown = for_page(offline, hosted=True)
    assert shown == ("cannot reach the Hugging Face hub and openai-community/gpt2 is not cached: this server cannot "
                     "fetch it now: try again later")
    corpus = "line 3 of '/srv/app/uploads/9f2c.jsonl' has no field 'text' (it has: body); choose one with --field"
    assert for_page(corpus, hosted=True) == "line 3 of '9f2c.jsonl' has no field 'text' (it has: body); name it in " \
                                            "the field box"
    budget = "the budget of 10 tokens is smaller than one sequence of 32: raise --max-tokens to at least 32"
    assert "--" not in for_page(budget) and "raise the budget to at least 32" in for_page(budget)
    assert "/srv" in for_page(corpus)  # locally, where it helps, the path stays


def test_hosted_findings_pages_keep_their_caps(hosted, monkeypatch):
    """Hosted: the benchmarks take the harness's own tasks only (no task folder) and at most 100 items a task; the
    patching page refuses a text longer than its cap in an error box; the neuron means take at most 50 sequences."""
    monkeypatch.setenv("NOLN_DEFAULT_MODELS", "demo:gpt2-kjv,demo:gpt2-kjv-noLN")
    assert hosted.LIMITS.benchmark_max_limit == 100 and hosted.LIMITS.patch_max_tokens == 64
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"page": "study", "model_a": "demo:gpt2-kjv", "model_b": "demo:gpt2-kjv-noLN"})
    at.run()
    at.toggle(key="w_bench_on").set_value(True).run()
    assert not at.exception
    assert not [t for t in at.text_input if t.key == "w_bench_include"]
    assert at.number_input(key="w_bench_limit").max == 100 and "hellaswag" in at.multiselect(key="w_bench_tasks").options
    at.switch_page("pages/views/neurons.py").run()
    assert at.slider(key="w_means_sequences").max == 50
    monkeypatch.setenv("NOLN_PATCH_MAX_TOKENS", "8")  # below the fixture's 20-token text limit
    importlib.reload(hosted)
    long = AppTest.from_file(APP, default_timeout=120)
    long.query_params.update({"page": "patching", "model_a": "demo:gpt2-kjv", "model_b": "demo:gpt2-kjv-noLN",
                              "text": "Then Mary and John went home, " * 10 + "and John gave a drink to",
                              "answer": " Mary", "counterfactual": " John"})
    long.run()
    assert not long.exception and long.error and "up to 8 tokens" in long.error[0].value
    monkeypatch.delenv("NOLN_PATCH_MAX_TOKENS")
