"""End to end: a real headless Chromium (Debian's, driven by Playwright) against the running app.

It opens the app on tiny checkpoints, waits for the charts, switches pages through the sidebar,
checks the figures rendered and no exception box appeared, and saves screenshots to
``artifacts/screenshots``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PAGES_SHOWN = PAGES = [("Overview", "Overview: what each model predicts", 2), ("Tour", "What removing LayerNorm changes, in eight steps", 1),
         ("Logit difference", "Logit difference and its logit lens", 1),
         ("Residual norms", "Residual-stream norms", 3), ("Attribution", "Attribution: who wrote the logit difference?", 4),
         ("Attention", "Attention and attention sinks", 2),
         ("Entropy neurons", "Entropy neurons: do they still work without LayerNorm?", 2),
         ("Patching", "Patching: is attribution patching exact without LayerNorm?", 3),
         ("Study", "Study: a corpus, many models", 0),
         ("About", "About noLN Explorer", 0)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ln_dir, noln_dir, **env_changes) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "NOLN_DEFAULT_MODELS": f"{ln_dir},{noln_dir}", "HF_HUB_OFFLINE": "1", "NOLN_HOSTED": "0",
           "NOLN_STUDY_CACHE": tempfile.mkdtemp(prefix="noln-study-"), **env_changes}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.time() + 150  # several fresh servers on 2 busy cores start slowly
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("streamlit did not start: " + (proc.stdout.read() if proc.stdout else ""))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def streamlit_server(ln_dir, noln_dir, **env_changes):
    """A fresh Streamlit server on a free loopback port, stopped afterwards."""
    with fresh_servers(1, ln_dir, noln_dir, **env_changes) as urls:
        yield urls[0]


@contextlib.contextmanager
def fresh_servers(count: int, ln_dir, noln_dir, **env_changes):
    """``count`` fresh servers started side by side (each one's first request is still to come)."""
    started = [_start(ln_dir, noln_dir, **env_changes) for _ in range(count)]
    try:
        for proc, url in started:
            _wait_healthy(proc, url)
        yield [url for _, url in started]
    finally:
        for proc, _ in started:
            _stop(proc)


SECRET = "hf_probe_secret_value_4f8e1c"
"""The server's HF_TOKEN in these tests: no page may ever show it."""


@pytest.fixture(scope="module")
def server(ln_dir, noln_dir):
    with streamlit_server(ln_dir, noln_dir, HF_TOKEN=SECRET) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium (apt-get install chromium); .ci/run does"
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _wait_for_charts(page, count: int) -> None:
    page.wait_for_function(
        f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {count}", timeout=90_000)


def _assert_no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.locator("[data-testid='stAlertContentError']").count() == 0


OVERLAPS = """() => {
  const box = e => e.getBoundingClientRect();
  const meets = (a, b) => a.width > 0 && b.width > 0 && a.left < b.right - 1 && b.left < a.right - 1
                          && a.top < b.bottom - 1 && b.top < a.bottom - 1;
  const bad = [];
  document.querySelectorAll('.js-plotly-plot').forEach((plot, k) => {
    const svg = box(plot.querySelector('.main-svg'));
    const areas = [...plot.querySelectorAll('.nsewdrag')].map(box);
    const titles = [...plot.querySelectorAll('text.annotation-text, [class^="g-x"][class$="title"] text, '
                                           + '[class^="g-y"][class$="title"] text')];
    const ticks = [...plot.querySelectorAll('g[class$="tick"] text')];
    const name = plot.querySelector('.gtitle') ? plot.querySelector('.gtitle').textContent : 'chart ' + k;
    for (const t of titles) {
      const b = box(t);
      areas.forEach((a, i) => { if (meets(b, a)) bad.push(`${name}: '${t.textContent}' on plot area ${i}`); });
      ticks.forEach(x => { if (meets(b, box(x))) bad.push(`${name}: '${t.textContent}' on tick '${x.textContent}'`); });
    }
    const legend = plot.querySelector('.legend');
    if (legend) {
      const b = box(legend);
      if (b.width > 0 && (b.left < svg.left - 1 || b.right > svg.right + 1 || b.bottom > svg.bottom + 1))
        bad.push(`${name}: legend cut off`);
    }
    for (const x of ticks) {
      const b = box(x);
      if (b.width > 0 && (b.left < svg.left - 1 || b.right > svg.right + 1 || b.bottom > svg.bottom + 1))
        bad.push(`${name}: tick '${x.textContent}' clipped`);
    }
  });
  return bad;
}"""
"""Every chart on the page: no panel title or axis title over a plot area or a tick label, no tick label or legend
cut off."""


def test_pages_render_in_a_real_browser(server, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(server)
    _wait_for_charts(page, 2)
    for title, heading, charts in PAGES:
        page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click()
        page.get_by_role("heading", name=heading).wait_for(timeout=60_000)
        if charts:
            _wait_for_charts(page, charts)
        page.wait_for_timeout(500)
        _assert_no_exception(page)
        assert page.locator(".js-plotly-plot").count() >= charts
        page.screenshot(path=str(SHOTS / f"{title.lower().replace(' ', '-')}.png"))
        assert page.evaluate(OVERLAPS) == [], title  # at the app's default width (this viewport)
        if title == "Attribution":  # the top-neurons table shows both models' 10 rows, no inner scroll hiding B
            heights = page.locator("[data-testid='stDataFrame']").evaluate_all(
                "els => els.map(e => e.getBoundingClientRect().height)")
            assert max(heights) >= 35 * 21, heights
    assert "page=about" in page.url


def test_study_page_runs_a_study_in_a_real_browser(server, browser, ln_dir, noln_dir):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(server)
    _wait_for_charts(page, 2)
    page.locator("[data-testid='stSidebarNav'] a", has_text="Study").first.click()
    page.get_by_role("heading", name="Study: a corpus, many models").wait_for(timeout=60_000)
    for label, value in (("More models", f"{ln_dir}, {noln_dir}"), ("Tokens per sequence", "32"),
                         ("Budget (tokens)", "192"), ("Batch", "3")):
        field = page.locator(f"input[aria-label^='{label}']").first
        field.fill(value)
        field.press("Enter")
        page.wait_for_timeout(700)
    page.get_by_role("button", name="Run study").click()
    _wait_for_charts(page, 6)
    page.get_by_text("6 sequences of 32 tokens").first.wait_for(timeout=60_000)
    page.get_by_text("JSON: study").wait_for(timeout=60_000)  # the last element: the run has finished
    _assert_no_exception(page)
    assert page.get_by_text("JSON: study").count() == 1
    page.screenshot(path=str(SHOTS / "study-run.png"), full_page=True)
    assert page.evaluate(OVERLAPS) == []  # the CE chart's rows, labels and legend included


def test_every_page_opened_by_a_link_as_a_fresh_servers_first_request_shows_no_dialog(browser, ln_dir, noln_dir):
    """A Space that slept restarts fresh: its first visitor arrives through a link copied from the address bar
    (/NAME?...), to any page.  No "Page not found" dialog, and the page itself.  (The footer's links, /?page=NAME,
    and the default page are served at /, which a fresh server always finds.)"""
    from pages import PAGES

    query = {"text": "The Eiffel Tower is located in the city of", "answer": " Paris", "counterfactual": " London",
             "attr_layer": "1"}
    # Every page but the default is reached through the same mechanism, its first-request shim, byte for byte the
    # same file: checked for all of them here, and opened in fresh servers for four (a page with link fields, the
    # tour, a findings page, the study), so that a 2-core machine is not asked to start nine servers at once.
    shims = {spec.name: (ROOT / "pages" / f"{spec.name}.py").read_text().split("\n", 1)[1] for spec in PAGES[1:]}
    assert len(set(shims.values())) == 1, "every page's shim runs app.py the same way"
    opened = ("attribution", "tour", "patching", "study")
    links = [f"/{spec.name}?{urlencode(query)}" for spec in PAGES[1:] if spec.name in opened]
    headings = {spec.name: heading for spec, (_, heading, _) in zip(PAGES, PAGES_SHOWN)}
    with fresh_servers(len(links), ln_dir, noln_dir, OMP_NUM_THREADS="1") as urls:
        pages = []
        for url, link in zip(urls, links):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + link, wait_until="commit")
            pages.append(page)
        for page, link in zip(pages, links):
            name = link[1:].split("?")[0]
            page.get_by_role("heading", name=headings[name]).wait_for(timeout=150_000)
            page.wait_for_timeout(1500)  # a dialog comes with the first messages; give it time to show
            assert page.locator("[role=dialog]").count() == 0, (link, page.locator("[role=dialog]").all_inner_texts())
            _assert_no_exception(page)
            assert page.locator("[data-testid='stSidebarNav'] a").count() == len(PAGES)
            with contextlib.suppress(Exception):  # the sidebar may fill its text a moment after the heading shows
                page.wait_for_function("t => (document.querySelector('textarea') || {}).value === t", arg=query["text"],
                                       timeout=60_000)
            assert page.locator("textarea").first.input_value() == query["text"], (link, page.locator(
                "textarea").evaluate_all("els => els.map(e => e.value)"))
            assert f"page={name}" in page.url
            page.close()


def test_a_shared_link_opens_the_same_view(server, browser, ln_dir, noln_dir):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    query = urlencode({"model_a": str(ln_dir), "model_b": str(noln_dir), "text": "The Eiffel Tower is located in the city of",
                       "answer": " Paris", "counterfactual": " London", "page": "attribution"})
    page.goto(f"{server}/?{query}")
    page.get_by_role("heading", name="Attribution: who wrote the logit difference?").wait_for(timeout=60_000)
    _wait_for_charts(page, 4)
    _assert_no_exception(page)
    assert page.locator("textarea").first.input_value() == "The Eiffel Tower is located in the city of"
    assert "answer=+Paris" in page.url or "answer=%20Paris" in page.url


def test_user_html_is_shown_as_text(server, browser, ln_dir, noln_dir):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    hostile = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script> **bold** $x$"
    page.goto(f"{server}/?{urlencode({'model_a': str(ln_dir), 'model_b': str(noln_dir), 'text': hostile})}")
    _wait_for_charts(page, 2)
    page.wait_for_timeout(1000)
    _assert_no_exception(page)
    assert page.title() != "pwned"
    assert page.locator("img[src='x']").count() == 0


def test_concurrent_browser_sessions_each_get_their_own_result(server, browser, ln_dir, noln_dir):
    """A bounded load test: 6 sessions at once, 2 page views each, on the same cached models.

    Every session must show the numbers of its own text (as noln_core computes them) and no
    error; the counts go to artifacts/load_report.json.
    """
    import json

    from helpers import PROMPTS
    from noln_core import compare, load_model, logit_difference

    models = [load_model(str(ln_dir), device="cpu"), load_model(str(noln_dir), device="cpu")]
    texts = [f"Session {i} says: {PROMPTS[i % len(PROMPTS)]}" for i in range(6)]
    expected = [logit_difference(compare(models, t, " the", " a")).models[0].value for t in texts]
    started = time.time()
    contexts = [browser.new_context(viewport={"width": 1200, "height": 800}) for _ in texts]
    pages = [c.new_page() for c in contexts]
    for page, text in zip(pages, texts):  # all sessions start before any is read
        query = {"model_a": str(ln_dir), "model_b": str(noln_dir), "text": text, "answer": " the", "counterfactual": " a",
                 "page": "logit-difference"}
        page.goto(f"{server}/?{urlencode(query)}", wait_until="commit")
    served, errors = 0, 0
    for page, value in zip(pages, expected):
        page.get_by_role("heading", name="Logit difference and its logit lens").wait_for(timeout=90_000)
        _wait_for_charts(page, 1)
        shown = page.locator("[data-testid='stMetricValue']").first.inner_text()
        errors += int(shown != f"{value:+.4f}") + page.locator("[data-testid='stException']").count()
        served += 1
    for page in pages:
        page.locator("[data-testid='stSidebarNav'] a", has_text="Attribution").first.click()
    for page in pages:
        page.get_by_role("heading", name="Attribution: who wrote the logit difference?").wait_for(timeout=90_000)
        _wait_for_charts(page, 4)
        errors += page.locator("[data-testid='stException']").count() + page.locator("[data-testid='stAlertContentError']").count()
        served += 1
    report = {"sessions": len(pages), "requests_served": served, "errors": errors,
              "seconds": round(time.time() - started, 1)}
    SHOTS.parent.mkdir(parents=True, exist_ok=True)
    (SHOTS.parent / "load_report.json").write_text(json.dumps(report, indent=2))
    print("load test:", report)
    for c in contexts:
        c.close()
    assert report == {**report, "sessions": 6, "requests_served": 12, "errors": 0}


def test_no_visitor_text_becomes_a_link(server, browser, tmp_path, ln_dir):
    """A link's answer, a rejected model id quoted in a note, and a directory name in labels: shown, never clickable."""
    import shutil

    lookalike = tmp_path / "www.hf-login.example.org"
    shutil.copytree(ln_dir, lookalike)
    query = {"model_a": str(lookalike), "model_b": str(ln_dir), "model_c": "https://evil.example/x",
             "text": "Hello there", "answer": " Your session expired: sign in again at www.hf-login.example.org/verify",
             "counterfactual": " me@evil.example.org"}
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{server}/?{urlencode(query)}")
    _wait_for_charts(page, 2)
    page.wait_for_timeout(1000)
    shown = " ".join(page.locator("[data-testid='stAlert']").all_inner_texts()).replace("\u2060", "")
    assert "hf-login.example.org/verify" in shown and "evil.example/x" in shown  # the visitor's words are shown...
    assert "www.hf-login.example.org" in page.locator("[data-testid='stMetric']").first.inner_text().replace("\u2060", "")
    inert = ("[data-testid='stAlert'] a", "[data-testid='stCaptionContainer'] a", "[data-testid='stMetric'] a",
             "[data-testid='stMarkdownContainer'] a[href*='example']")
    for selector in inert:  # ...and none of them is a link
        assert page.locator(selector).count() == 0, selector


def test_a_teacher_loads_an_edited_tour_and_a_broken_one_gets_an_error_box(server, browser, ln_dir, noln_dir, tmp_path):
    """The Tour page's upload, in a real browser: an edited copy of the shipped tour runs; a broken file says why."""
    from noln_core.teaching.tour import shipped_tours

    edited = tmp_path / "my-class.toml"
    edited.write_text(shipped_tours()["ln-free-story"].read_text().replace("in eight steps", "for my class"))
    broken = tmp_path / "broken.toml"
    broken.write_text(edited.read_text().replace('figure = "dla"', 'figure = "heatmap"'))
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    query = urlencode({"model_a": str(ln_dir), "model_b": str(noln_dir), "page": "tour", "tour": "ln-free-story",
                       "step": "4"})
    page.goto(f"{server}/?{query}")
    page.get_by_role("heading", name="4. DLA against the true direct effect").wait_for(timeout=60_000)
    _wait_for_charts(page, 1)
    _assert_no_exception(page)
    upload = page.locator("[data-testid='stFileUploaderDropzoneInput']").last
    upload.set_input_files(str(broken))
    page.get_by_text("unknown figure 'heatmap'").wait_for(timeout=30_000)
    assert page.locator("[data-testid='stException']").count() == 0
    # The probe that showed the server's HF_TOKEN through a weak text's placeholder, and one that allocated a gigabyte.
    probe = tmp_path / "probe.toml"
    probe.write_text(edited.read_text().replace(
        "The Study page measures it on a corpus.",
        "{zz.__format__.__globals__[Path].exists.__globals__[os].environ[HF_TOKEN]} {nmae_a:>100000000}"))
    upload.set_input_files(str(probe))
    page.get_by_text("malformed placeholder").wait_for(timeout=30_000)
    assert SECRET not in page.content() and page.locator("[data-testid='stException']").count() == 0
    upload.set_input_files(str(edited))
    page.get_by_role("heading", name="What removing LayerNorm changes, for my class").wait_for(timeout=60_000)
    page.get_by_role("button", name="Start the tour at step 1").or_(
        page.get_by_role("heading", name="1. The two models predict alike")).first.wait_for(timeout=60_000)
    _assert_no_exception(page)
