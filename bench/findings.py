"""Benchmarks of the papers' other findings, each a ratio against one forward pass measured in the same run.

    python -m bench.findings                 # CPU, GPT-2 small shapes (random weights) -> stdout
    python -m bench.findings --update-docs   # and the "Findings" section of docs/BENCHMARKS.md

* the Entropy neurons page once the means are cached: the ablation of three neurons (each, then together, direct
  and through the final LN) on a 128-token text, against one forward pass of the same text;
* attribution patching (two forward passes and one backward) on a 16-token IOI pair, against one forward pass;
* activation patching of every resid_pre cell and head, for scale;
* the 480-prompt patching study: its throughput in prompt pairs per second per model, from a shorter run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.progress import say
from bench.run import build_checkpoints, publish

HEADING = "## Findings (`python -m bench.findings`)"
TARGETS = {"neurons": 1.5, "attribution": 3.5}


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(ours, floor, repeats: int) -> tuple[float, float]:
    """Medians of ``ours`` and ``floor``, timed alternately so that the machine's drift falls on both."""
    ours(), floor()
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        floor()
        b.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "medium"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8, help="prompt pairs of the timed patching study")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "noln-bench"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    from noln_core import load_model, tokenize
    from noln_core.findings.ioi import ioi_pairs
    from noln_core.findings.neurons import neuron_ablation, neuron_means
    from noln_core.findings.patching import attribution_patching, patching
    from noln_core.study.patching import patching_study

    say(f"GPT-2 {args.size} shapes: building or reading the random checkpoints")
    base, noln = build_checkpoints(args.size, Path(args.cache))
    rows = []
    pair = ioi_pairs(4, seed=0)[0]
    for label, directory in (("with LN", base), ("LN-free", noln)):
        model = load_model(str(directory), device="cpu")
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 50000, size=(4, 128))
        means = neuron_means(model, ids)
        text = torch.tensor(ids[:1])
        say(f"{label}: neuron ablation against one forward pass (128 tokens)")
        t_ab, t_fw = interleaved(lambda: neuron_ablation(model, ids[0].tolist(), (584, 2123, 2870), means),
                                 lambda: model.forward(text), args.repeats)
        rows.append((label, "Entropy neurons page: ablating 3 neurons (each and together, split), 128 tokens",
                     t_ab, t_fw, TARGETS["neurons"]))
        n = len(tokenize(model, pair.clean))
        prompt = torch.tensor([tokenize(model, pair.clean)])
        say(f"{label}: attribution and activation patching against one forward pass ({n} tokens)")
        t_at, t_fw = interleaved(lambda: attribution_patching(model, pair.clean, pair.corrupted, pair.answer,
                                                              pair.counterfactual),
                                 lambda: model.forward(prompt), args.repeats)
        rows.append((label, f"attribution patching (2 forward, 1 backward), {n} tokens", t_at, t_fw,
                     TARGETS["attribution"]))
        t_act = median_time(lambda: patching(model, pair.clean, pair.corrupted, pair.answer, pair.counterfactual),
                            max(1, args.repeats // 2))
        rows.append((label, f"activation and attribution patching, every cell and head, {n} tokens", t_act, t_fw,
                     None))
    say(f"the patching study on {args.prompts} IOI pairs, both models")
    models = [load_model(str(d), device="cpu") for d in (base, noln)]
    start = time.perf_counter()
    patching_study(models, args.prompts)
    per_pair = (time.perf_counter() - start) / (args.prompts * len(models))
    lines = [f"GPT-2 {args.size} shapes (random weights), CPU ({torch.get_num_threads()} threads), float32; medians "
             f"of {args.repeats} interleaved repeats; each ratio divides two numbers of this run.", "",
             "| model | what | time | one forward pass | ratio | target |", "|---|---|---|---|---|---|"]
    for label, what, t, floor, target in rows:
        mark = "" if target is None else f"≤ {target}" + (" ✓" if t / floor <= target else " ✗")
        lines.append(f"| {label} | {what} | {t * 1000:.0f} ms | {floor * 1000:.0f} ms | {t / floor:.2f}× | {mark} |")
    lines += ["", f"The patching study (activation and attribution patching of every cell and head, per pair and "
                  f"model): **{1 / per_pair:.2f} prompt pairs per second** per model here, so the papers' 480 pairs on "
                  f"their three models take about {480 * 3 * per_pair / 60:.0f} minutes on this CPU "
                  "(`accelerate launch` divides it by the processes)."]
    publish("\n".join(lines) + "\n", args.out, args.update_docs, HEADING)


if __name__ == "__main__":
    main()
