"""A hosted server under a few hundred mixed requests: memory, models alive and the study cache's disk, each
against its budget.

    python -m bench.hosted_mixed [--requests 300] [--sessions 4] [--out bench/hosted_mixed.md]

One process plays the server: the real app (``app.py`` and its caches) in hosted mode, driven through
Streamlit's ``AppTest`` by several open sessions on the offline demo models (registry models, as a public Space
serves them).  Each request is one of: a new text on an analysis page, another model pair or dtype, another
page, a tour step, or a small study on a pasted text (written to the study cache).  The budgets are set small so
that they bind: ``model_memory_mb`` 40 (a demo model is 12 MB in float32), ``run_cache_mb`` 64,
``study_cache_mb`` 4.  Sampled as it goes: resident memory (``VmRSS``), the bytes of every model alive (a census
of ``LoadedModel`` objects, not the store's accounting), the run cache's accounting and the study cache on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {"NOLN_MODEL_MEMORY_MB": "40", "NOLN_RUN_CACHE_MB": "64", "NOLN_STUDY_CACHE_MB": "4", "NOLN_MAX_MODELS": "3"}

DRIVER = r"""
import gc, json, sys, time, warnings
sys.path.insert(0, {root!r})
from pathlib import Path
from streamlit.testing.v1 import AppTest
from noln_core import LoadedModel
from noln_core.study.engine import cache_root, directory_bytes

warnings.simplefilter("ignore")

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1e6

def alive():
    gc.collect()
    return sum(o.nbytes for o in gc.get_objects() if isinstance(o, LoadedModel))

MODELS = ["demo:gpt2-kjv", "demo:gpt2-kjv-noLN", "demo:gpt2-kjv-ft"]
DTYPES = ["float32", "bfloat16", "float16"]
PAGES = ["pages/views/attention.py", "pages/views/attribution.py", "pages/views/residual_norms.py",
         "pages/views/overview.py", "pages/views/logit_difference.py"]
words = ["light", "darkness", "waters", "firmament", "evening", "morning", "heaven", "earth", "day", "night"]
sessions = []
for s in range({sessions}):
    at = AppTest.from_file({app!r}, default_timeout=600)
    at.query_params.update({{"model_a": MODELS[s % 3], "model_b": MODELS[(s + 1) % 3], "device": "cpu"}})
    at.run()
    sessions.append(at)
import pages.shell.cache as cache
samples, kinds, started, peak = [], {{}}, time.time(), {{"rss": 0, "alive": 0, "disk": 0, "run_cache": 0}}
for i in range({requests}):
    at = sessions[i % len(sessions)]
    kind = ["text", "text", "page", "models", "text", "study", "tour"][i % 7]
    kinds[kind] = kinds.get(kind, 0) + 1
    if kind == "text":
        n = 8 + (i * 37) % 60
        at.sidebar.text_area(key="w_text").set_value(
            "And " + " ".join(words[(i * 7 + j * j) % 10] for j in range(n))).run()
    elif kind == "page":
        at.switch_page(PAGES[i % len(PAGES)]).run()
    elif kind == "models":
        at.sidebar.selectbox(key="w_model_b").set_value(MODELS[i % 3]).run()
        at.sidebar.selectbox(key="w_dtype").set_value(DTYPES[(i // 7) % 3]).run()
    elif kind == "tour":
        at.switch_page("pages/views/tour.py").run()
    else:
        at.switch_page("pages/views/study.py").run()
        at.number_input(key="w_study_seq").set_value(32)
        at.number_input(key="w_study_budget").set_value(32 * 4)
        at.radio(key="w_study_source").set_value("text").run()
        at.text_area(key="w_study_text").set_value(f"Request {{i}}. " + "And God saw the light, that it was good. " * 12).run()
        at.button(key="w_study_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    now = {{"rss": rss(), "alive": alive() / 1e6, "disk": directory_bytes(cache_root()) / 1e6,
           "run_cache": cache.run_cache().nbytes / 1e6}}
    peak = {{k: max(peak[k], v) for k, v in now.items()}}
    if i % 25 == 24 or i == 0:
        print(f"request {{i + 1}}/{requests}: resident {{now['rss']:.2f}} GB, models alive {{now['alive']:.1f}} MB, "
              f"study cache {{now['disk']:.2f}} MB", file=sys.stderr, flush=True)
        samples.append({{"request": i + 1, **{{k: round(v, 3) for k, v in now.items()}},
                         "seconds": round(time.time() - started, 1)}})
print(json.dumps({{"samples": samples, "peak": peak, "kinds": kinds, "seconds": time.time() - started}}))
"""


HEADING = '## A hosted server under mixed requests'
INTRO = ("Written by `python -m bench.hosted_mixed --update-docs`. The budgets are set small so that each binds "
         "within a few hundred requests; \"models alive\" counts a model held by a session or a cached run whether "
         "or not the store still lists it.\n\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hosted_mixed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--out", default=None,
                        help="write the Markdown section here (bench/hosted_mixed.md is what docs/BENCHMARKS.md shows)")
    parser.add_argument("--update-docs", action="store_true",
                        help="write the result as its section of docs/BENCHMARKS.md (that section only)")
    args = parser.parse_args(argv)
    code = DRIVER.format(root=str(ROOT), app=str(ROOT / "app.py"), requests=args.requests, sessions=args.sessions)
    env = {**os.environ, **BUDGETS, "HF_HUB_OFFLINE": "1", "NOLN_HOSTED": "1",
           "NOLN_STUDY_CACHE": tempfile.mkdtemp(prefix="noln-bench-studies-")}
    env.pop("NOLN_DEFAULT_MODELS", None)
    print(f"driving {args.requests} requests over {args.sessions} sessions (progress every 25)...", file=sys.stderr)
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if out.returncode:  # its error went to stderr, with the progress lines
        return 1
    report = json.loads(out.stdout.strip().splitlines()[-1])
    b = {k: int(v) for k, v in BUDGETS.items()}
    kinds = ", ".join(f"{n} {k}" for k, n in report["kinds"].items())
    lines = [
        f"### A hosted server under {args.requests} mixed requests ({args.sessions} open sessions, demo models)", "",
        f"Hosted mode, {kinds}; {report['seconds']:.0f} s in all. Budgets: models {b['NOLN_MODEL_MEMORY_MB']} MB, run "
        f"cache {b['NOLN_RUN_CACHE_MB']} MB, study cache {b['NOLN_STUDY_CACHE_MB']} MB on disk. \"Models alive\" is a "
        "census of every loaded model still in memory (resident or held by a run), not the store's own accounting.",
        "", "| after request | resident memory | models alive | run cache | study cache on disk |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s['request']} | {s['rss']:.2f} GB | {s['alive']:.1f} MB | {s['run_cache']:.1f} MB | "
              f"{s['disk']:.2f} MB |" for s in report["samples"]]
    p = report["peak"]
    lines += ["", f"Peaks over every request: resident memory {p['rss']:.2f} GB, models alive {p['alive']:.1f} MB "
              f"(budget {b['NOLN_MODEL_MEMORY_MB']}), run cache {p['run_cache']:.1f} MB (budget "
              f"{b['NOLN_RUN_CACHE_MB']}), study cache {p['disk']:.2f} MB (budget {b['NOLN_STUDY_CACHE_MB']})."]
    under = (p["alive"] <= b["NOLN_MODEL_MEMORY_MB"] and p["disk"] <= b["NOLN_STUDY_CACHE_MB"]
             and p["run_cache"] <= b["NOLN_RUN_CACHE_MB"])
    lines += ["", "Every budget held at every request." if under else "**A budget was exceeded** (see the peaks)."]
    text = "\n".join(lines) + "\n"
    from bench.run import publish

    publish(text, args.out, args.update_docs, HEADING, INTRO)
    return 0 if under else 1


if __name__ == "__main__":
    sys.exit(main())
