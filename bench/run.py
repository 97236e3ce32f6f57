"""Benchmarks: every cost as a ratio against its floor, measured in the same run.

    python -m bench.run                                  # CPU, float32, small and medium -> docs/BENCHMARKS.md
    python -m bench.run --device cuda --dtype bfloat16 --out results.md

Checkpoints are GPT-2-small- and GPT-2-medium-shaped with random weights (built
offline, once, under ``--cache``): their shapes, and so their cost, are the real
models'.  Model B carries the LN-free trick, as gpt2_noLN does.  Times are
medians over repeats; each ratio divides two numbers measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"small": dict(n_embd=768, n_layer=12, n_head=12), "medium": dict(n_embd=1024, n_layer=24, n_head=16)}
LENGTHS = (16, 128, 512, 1024)
TARGETS = {"analysis_128": 1.3, "analysis_1024": 1.5, "direct_effect": 0.25, "cache_hit_ms": 50.0, "load_ready": 1.0,
           "peak_gb": 1.4}
CREEP_RUNS = 200


def build_checkpoints(size: str, cache: Path) -> tuple[Path, Path]:
    """A random GPT-2 of the real shape, and the same neutralised like gpt2_noLN (weights x1e6, eps 1e12)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base, noln = cache / f"{size}-ln", cache / f"{size}-noln"
    if (base / "model.safetensors").exists() and (noln / "model.safetensors").exists():
        return base, noln
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPES[size])).eval()
    from noln_core.paths import TOKENIZER_DIR as vocab

    for directory in (base, noln):
        directory.mkdir(parents=True, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            (directory / f).write_bytes((vocab / f).read_bytes())
    model.save_pretrained(base)
    with torch.no_grad():
        for block in model.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.mul_(1e6)
                ln.bias.zero_()
        model.transformer.ln_f.weight.mul_(1e6)
    model.config.layer_norm_epsilon = 1e12
    model.save_pretrained(noln)
    return base, noln


def timed(fn, repeats: int, device: str, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(ours, floor, repeats: int, device: str) -> tuple[float, float, float]:
    """``(ours, floor, ratio)``: medians over ``repeats`` rounds, each round timing the floor then ours.

    Interleaving puts both under the same machine load; the ratio is the median of the per-round ratios.
    """
    ours(), floor()  # warm both
    a, b, ratios = [], [], []
    for _ in range(repeats):
        b.append(timed(floor, 1, device, warmup=0))
        a.append(timed(ours, 1, device, warmup=0))
        ratios.append(a[-1] / b[-1])
    return statistics.median(a), statistics.median(b), statistics.median(ratios)


def full_analysis(models, text_ids, answer, counterfactual):
    """Everything the app computes for a text: one run, then every analysis behind every page."""
    from noln_core import ANALYSES, compare

    result = compare(models, text_ids, answer, counterfactual)
    return result, tuple(fn(result) for fn in ANALYSES)


def text_of(model, n_tokens: int, seed: int = 0) -> str:
    """A text that tokenises to ``n_tokens`` tokens (BOS included) with GPT-2's tokenizer."""
    from noln_core import tokenize

    rng = np.random.default_rng(seed)
    words = [" the", " a", " model", " norm", " layer", " of", " and", " is", " to", " in"]
    text = "".join(rng.choice(words, size=n_tokens - 1))
    assert len(tokenize(model, text)) == n_tokens
    return text


def memory_probe(base: Path, noln: Path, device: str, dtype: str) -> dict:
    """A fresh process that imports only noln_core: peak resident memory with both models loaded and in use
    (at about 128 tokens, what the app computes: a run without full patterns, every analysis, one head's pattern),
    then resident memory across ``CREEP_RUNS`` runs of distinct texts."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across fork and exec.
    code = f"""
import json, sys
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1e6
sys.path.insert(0, {str(ROOT)!r})
import noln_core, torch
assert "transformers" not in sys.modules and "streamlit" not in sys.modules
imports = status("VmHWM")
a = noln_core.load_model({str(base)!r}, device={device!r}, dtype={dtype!r})
b = noln_core.load_model({str(noln)!r}, device={device!r}, dtype={dtype!r})
ready = status("VmHWM")
weights = sum(t.numel() * t.element_size() for m in (a, b) for t in {{id(t): t for t in m.weights.tensors()}}.values())
words = ["the", "a", "model", "norm", "layer", "of", "and", "is", "to", "in"]
def text(i, n):
    return " ".join(words[(i * 7 + j * j) % 10] + str((i + j) % 97) for j in range(n))
from noln_core.compare import head_pattern
def app_run(t):  # what the app computes for a text: a lean run, every analysis, one head's pattern per model
    r = noln_core.compare([a, b], t, " the", " a", keep_patterns=False)
    [fn(r) for fn in noln_core.ANALYSES]
    [head_pattern(m, r.token_ids, 0, 0) for m in (a, b)]
for i in range(3):
    app_run(text(i, 60))
in_use = status("VmHWM")
rss = []
for i in range({CREEP_RUNS}):
    app_run(text(1000 + i, 12))
    if i in (19, {CREEP_RUNS} - 1):
        rss.append(status("VmRSS"))
print(json.dumps({{"imports_gb": imports, "ready_gb": ready, "peak_gb": in_use, "weights_gb": weights / 1e9,
                  "rss_after_20_gb": rss[0], "rss_after_all_gb": rss[1], "tokens": len(noln_core.tokenize(a, text(0, 60)))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def cache_hit_ms(models, text: str) -> float:
    """A page switch in the app: the cached run and every cached analysis, measured as the app calls them."""
    import logging

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    from pages.shell import cache as app

    key = app.run_key(tuple(models), text, " the", " a", -1, True)
    from noln_core import ANALYSES, compare

    app.run_cache().put([key], compare(models, text, " the", " a"))

    def hit():
        entry = app.run_cache().get(key)
        for fn in ANALYSES:
            app.analysis(fn, key, entry.result)

    hit()
    return timed(hit, 20, "cpu") * 1000


def run(args) -> tuple[str, dict]:
    from transformers import GPT2LMHeadModel

    from noln_core import head_direct_effects, load_model, tokenize

    device, dtype = args.device, args.dtype
    torch_dtype = getattr(torch, dtype)
    rows, raw = [], {}
    from bench.progress import say

    for size in args.sizes:
        say(f"GPT-2 {size}: building or reading the random-weight checkpoints")
        base, noln = build_checkpoints(size, Path(args.cache))
        reps = 1 if args.quick else 5
        # Loading: ready for analysis, against HF ready to run (from_pretrained, then one short forward pass).
        probe = torch.tensor([[50256] * 16], device=device)

        def hf_ready(directory: Path) -> None:  # from_pretrained maps weights lazily; a forward pass pages them in
            with torch.no_grad():
                GPT2LMHeadModel.from_pretrained(directory, torch_dtype=torch_dtype).to(device)(probe)

        for name, directory in (("with LN", base), ("LN-free", noln)):
            say(f"GPT-2 {size}: cold load ({name}) against transformers, 5 rounds")
            t_ours, t_hf_ready, ratio = interleaved(lambda: load_model(str(directory), device=device, dtype=dtype),
                                                    lambda: hf_ready(directory), 5, device)
            rows.append((size, f"cold load ({name}), ready for analysis", f"{t_ours:.2f} s",
                         f"HF from_pretrained + one forward {t_hf_ready:.2f} s", ratio, TARGETS["load_ready"], "≤"))
            raw[f"{size}_load_{name}"] = ratio
        models = [load_model(str(base), device=device, dtype=dtype), load_model(str(noln), device=device, dtype=dtype)]
        hf = [GPT2LMHeadModel.from_pretrained(d, torch_dtype=torch_dtype, attn_implementation="sdpa").to(device).eval()
              for d in (base, noln)]
        for n in LENGTHS if not args.quick else (16, 128):
            say(f"GPT-2 {size}: the side-by-side analysis at {n} tokens against two plain forwards")
            text = text_of(models[0], n)
            ids = torch.tensor([tokenize(models[0], text)], device=device)

            def two_forwards():
                with torch.no_grad():
                    for m in hf:
                        m(ids)

            r = 3 if (n == 1024 and size == "medium" and device == "cpu") else reps
            t_full, t_floor, ratio = interleaved(lambda: full_analysis(models, text, " the", " a"), two_forwards, r,
                                                 device)
            target = {128: TARGETS["analysis_128"], 1024: TARGETS["analysis_1024"]}.get(n)
            rows.append((size, f"full side-by-side analysis, {n} tokens", f"{t_full * 1000:.0f} ms",
                         f"two HF forwards {t_floor * 1000:.0f} ms", ratio, target, "≤"))
            raw[f"{size}_analysis_{n}"] = ratio
            if n == 128:
                result, _ = full_analysis(models, text, " the", " a")
                t_de = timed(lambda: head_direct_effects(result), 20, "cpu")
                t_one = timed(lambda: two_forwards(), reps, device) / 2
                rows.append((size, "direct effect of all heads (from the cached run)", f"{t_de * 1000:.1f} ms",
                             f"one HF forward {t_one * 1000:.0f} ms", t_de / t_one, TARGETS["direct_effect"], "≤"))
                if device == "cpu" and not args.no_app:
                    ms = cache_hit_ms(models, text)
                    rows.append((size, "cache hit in the app (page switch, same text)", f"{ms:.2f} ms", "target 50 ms",
                                 ms / TARGETS["cache_hit_ms"], 1.0, "≤"))
        # Corpus throughput and memory: python -m bench.study.
        del models, hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if size == "small" and device == "cpu":
            say(f"GPT-2 {size}: peak and resident memory over {CREEP_RUNS} runs (a fresh process)")
            mem = memory_probe(base, noln, device, dtype)
            floor = mem["imports_gb"] + mem["weights_gb"]
            rows.append((size, "peak resident memory, both models ready", f"{mem['ready_gb']:.2f} GB",
                         f"imports {mem['imports_gb']:.2f} + weights {mem['weights_gb']:.2f} = {floor:.2f} GB",
                         mem["ready_gb"] / floor, None, ""))
            rows.append((size, f"peak resident memory, both models in use as the app uses them ({mem['tokens']} tokens)",
                         f"{mem['peak_gb']:.2f} GB", "target 1.4 GB", mem["peak_gb"] / TARGETS["peak_gb"], 1.0, "≤"))
            rows.append((size, f"resident memory after {CREEP_RUNS} runs of distinct texts", f"{mem['rss_after_all_gb']:.3f} GB",
                         f"after 20 runs {mem['rss_after_20_gb']:.3f} GB", mem["rss_after_all_gb"] / mem["rss_after_20_gb"],
                         None, ""))
    return table(rows, args), raw


def table(rows, args) -> str:
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    head = [
        f"### {args.device} · {args.dtype}" + (f" · {gpu}" if gpu else f" · {os.cpu_count()} CPU cores"),
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. "
        "Ratio = measured / floor (same run); target met: ✅, missed: ❌.",
        "",
        "| shape | what | measured | floor | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for size, what, measured, floor, ratio, target, sense in rows:
        ok = "" if target is None else (" ✅" if (ratio <= target if sense == "≤" else ratio >= target) else " ❌")
        tgt = "" if target is None else f"{sense} {target:g}×{ok}"
        shown = f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3f}"
        head.append(f"| {size} | {what} | {measured} | {floor} | {shown}× | {tgt} |")
    return "\n".join(head) + "\n"


HEADER = """# Benchmarks

Each section is written by its own command and only that section: `python -m bench.run` (CPU),
`python -m bench.study`, `bench/gpu_check.sh` where a GPU is lent, `python -m bench.hosted_memory`
and `python -m bench.hosted_mixed --update-docs`. Each ratio divides two numbers
measured in alternation in the same process (the floor, then ours, repeated; the ratio is the
median of the per-round ratios, the times are medians): two plain `transformers` forward
passes for the analysis, one for the direct effects, `transformers` "ready to run"
(`from_pretrained` and one 16-token forward) for loading, plain batched forwards for the
study, imports plus weights for memory. Checkpoints are random-weight GPT-2 small and
medium shapes built offline; model B carries the LN-free trick, as gpt2_noLN does. A 2-core
machine is noisy, so read ratios, not seconds.

"""


CPU_HEADING = "## CPU"


def replace_section(document: str, heading: str, body: str) -> str:
    """``document`` with the section under ``heading`` (up to the next ``## `` heading) replaced by ``body``.

    Only this benchmark's section changes: the others (study, GPU, hosted server, notes) are written by their
    own commands and stay as they are.  A document without the section gets it after its header."""
    section = f"{heading}\n\n{body.rstrip()}\n\n"
    lines = document.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == heading]
    if not starts:
        cut = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
        return "".join(lines[:cut]) + section + "".join(lines[cut:])
    begin = starts[0]
    end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[:begin]) + section + "".join(lines[end:])


def update_docs(heading: str, body: str) -> Path:
    """Write ``body`` as the section ``heading`` of docs/BENCHMARKS.md, leaving every other section as it is."""
    path = ROOT / "docs" / "BENCHMARKS.md"
    path.write_text(replace_section(path.read_text() if path.exists() else HEADER, heading, body))
    return path


def publish(text: str, out: str | None, update: bool, heading: str, intro: str = "") -> None:
    """A benchmark's Markdown: to ``out`` if given, as its own section of BENCHMARKS.md if ``update``, and to stdout."""
    if out:
        Path(out).write_text(text)
    if update:
        update_docs(heading, intro + text)
    print(text)


def document(cpu_table: str, existing: str | None = None) -> str:
    """BENCHMARKS.md with this run's CPU table in its section, everything else as it was."""
    return replace_section(existing if existing is not None else HEADER, CPU_HEADING, cpu_table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    from noln_core.model import DTYPES

    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--sizes", default="small,medium", type=lambda s: s.split(","))
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "noln-bench"))
    parser.add_argument("--out", default=None,
                        help="where to write (default: docs/BENCHMARKS.md for the CPU run; a bare table otherwise)")
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repeats (a smoke run)")
    parser.add_argument("--no-app", action="store_true", help="skip the app cache measurement (no Streamlit)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    text, _ = run(args)
    if args.out:
        Path(args.out).write_text(text)
    elif args.device == "cpu" and not args.quick:
        update_docs(CPU_HEADING, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
