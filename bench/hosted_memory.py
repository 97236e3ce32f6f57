"""The app server's memory over a few hundred distinct requests, with hosted mode's limits.

    python -m bench.hosted_memory [--requests 200] [--out FILE]

One process plays the server: the real app (``app.py`` and its caches) is driven
through Streamlit's ``AppTest`` on the Attention page (the page that used to keep
every pattern) with three GPT-2-small-shaped models (random weights, built
offline as ``bench.run`` builds them) and a new text of 32 to 256 tokens on each
request.  The limits are hosted mode's (``run_cache_mb`` 256, ``max_tokens`` 256,
``model_memory_mb`` 6000), set through the environment; local checkpoint
directories stand in for the registry's models, which need the hub.  Resident
memory (``VmRSS``) and the run cache's own accounting are sampled as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"NOLN_RUN_CACHE_MB": "256", "NOLN_MAX_TOKENS": "256", "NOLN_MODEL_MEMORY_MB": "6000", "NOLN_MAX_MODELS": "3"}

DRIVER = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from streamlit.testing.v1 import AppTest

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1e6

words = ["the", "model", "norm", "layer", "attention", "head", "sink", "token", "residual", "stream"]
at = AppTest.from_file({app!r}, default_timeout=600)
at.query_params.update({{"model_a": {a!r}, "model_b": {b!r}, "model_c": {a!r}, "page": "attention", "device": "cpu"}})
at.run()
import pages.shell.cache as cache
samples, started = [], time.time()
for i in range({requests}):
    n = 16 + (i * 37) % 113  # 16..128 words: 32..256 tokens
    text = " ".join(words[(i * 7 + j * j) % 10] + str((i + 3 * j) % 101) for j in range(n))
    at.sidebar.text_area(key="w_text").set_value(text).run()
    assert not at.exception, [e.value for e in at.exception]
    if i % 20 == 19 or i == 0:
        print(f"request {{i + 1}}/{requests}: resident {{rss():.2f}} GB", file=sys.stderr, flush=True)
        samples.append({{"request": i + 1, "rss_gb": round(rss(), 3), "run_cache_mb": round(cache.run_cache().nbytes / 1e6, 1),
                         "runs_kept": len(cache.run_cache()), "seconds": round(time.time() - started, 1)}})
print(json.dumps(samples))
"""


HEADING = '## App server memory'
INTRO = "Written by `python -m bench.hosted_memory --update-docs`.\n\n"


def main(argv=None) -> int:
    from bench.run import build_checkpoints

    parser = argparse.ArgumentParser(prog="python -m bench.hosted_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "noln-bench"))
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    parser.add_argument("--update-docs", action="store_true",
                        help="write the result as its section of docs/BENCHMARKS.md (that section only)")
    args = parser.parse_args(argv)
    base, noln = build_checkpoints("small", Path(args.cache))
    code = DRIVER.format(root=str(ROOT), app=str(ROOT / "app.py"), a=str(base), b=str(noln), requests=args.requests)
    env = {**os.environ, **LIMITS, "HF_HUB_OFFLINE": "1", "NOLN_HOSTED": "0"}
    started = time.time()
    print(f"driving {args.requests} requests (progress every 20)...", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if out.returncode:  # its error went to stderr, with the progress lines
        return 1
    samples = json.loads(out.stdout.strip().splitlines()[-1])
    lines = [
        f"### App server memory over {args.requests} distinct requests (hosted limits, 3 GPT-2-small-shaped models)", "",
        f"Attention page, texts of 32–256 tokens, run cache budget 256 MB; {time.time() - started:.0f} s in all.", "",
        "| after request | resident memory | run cache (own accounting) | cache entries |", "|---|---|---|---|",
    ]
    lines += [f"| {s['request']} | {s['rss_gb']:.2f} GB | {s['run_cache_mb']:.1f} MB | {s['runs_kept']} |"
              for s in samples]
    text = "\n".join(lines) + "\n"
    from bench.run import publish

    publish(text, args.out, args.update_docs, HEADING, INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
