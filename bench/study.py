"""Study benchmark: throughput against plain batched transformers forwards, and peak memory against corpus size.

    python -m bench.study [--device cpu|cuda] [--size small|medium] [--batch 8] [--seq-len 1024] [--batches 2]

* CE-only study throughput (``--metrics ce``) and the full metric set, each
  against plain batched ``GPT2LMHeadModel`` forward passes of the same two
  models on the same sequences (the floor: logits only, nothing reduced),
  interleaved so both run under the same load; ratios of tokens per second
  (targets: >= 0.9 CE-only, >= 0.5 full).
* Peak memory of a full study at ``batch x seq-len``, in a fresh process that
  imports only noln_core, for a corpus of ``--batches`` batches and for four
  times as many: the peak above the models' weights (target <= 1.5 GB) must
  not grow with the corpus.

Checkpoints are random-weight GPT-2 shapes (bench.run builds and caches them).
Times are noisy on a shared machine: the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.run import ROOT, build_checkpoints, interleaved

TARGETS = {"ce": 0.9, "full": 0.5, "memory_gb": 1.5}


def corpus_file(path: Path, n_tokens: int) -> Path:
    """A JSONL file of pre-tokenised random rows (``n_tokens`` ids): cut into chunks as they are."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50256, size=n_tokens)
    with open(path, "w") as fh:
        for start in range(0, n_tokens, 4096):
            fh.write(json.dumps({"input_ids": ids[start:start + 4096].tolist()}) + "\n")
    return path


def memory(base: Path, noln: Path, corpus: Path, args, n_sequences: int) -> dict:
    """Peak resident memory (VmHWM) of a full study over ``n_sequences`` sequences, in a fresh process."""
    code = f"""
import json, sys, tempfile
from pathlib import Path
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1e6
sys.path.insert(0, {str(ROOT)!r})
import noln_core
from noln_core.study import Settings, parse_corpus, run_study
assert "transformers" not in sys.modules and "streamlit" not in sys.modules
models = [noln_core.load_model(p, device={args.device!r}) for p in ({str(base)!r}, {str(noln)!r})]
weights = sum(t.numel() * t.element_size() for m in models for t in {{id(t): t for t in m.weights.tensors()}}.values())
ready = status("VmHWM")
r = run_study(models, parse_corpus({str(corpus)!r}, field="input_ids"), seq_len={args.seq_len}, batch={args.batch},
              max_tokens={n_sequences * args.seq_len}, state_dir=Path(tempfile.mkdtemp()))
print(json.dumps({{"weights_gb": weights / 1e9, "ready_gb": ready, "peak_gb": status("VmHWM"),
                  "sequences": r.n_sequences}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


STUDY_HEADING = "## Study (`python -m bench.study`)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="small", choices=["small", "medium"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=2, help="batches per timed study")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "noln-bench"))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--update-docs", action="store_true", help="write the table as the Study section of "
                        "docs/BENCHMARKS.md (that section only)")
    args = parser.parse_args(argv)

    from transformers import GPT2LMHeadModel

    from noln_core import load_model
    from noln_core.study import Settings, parse_corpus, run_study

    from bench.progress import say

    say(f"building or reading the random-weight GPT-2 {args.size} checkpoints")
    base, noln = build_checkpoints(args.size, Path(args.cache))
    work = Path(tempfile.mkdtemp(prefix="noln-bench-study-"))
    n_seq = args.batch * args.batches
    corpus = corpus_file(work / "corpus.jsonl", 4 * n_seq * args.seq_len)
    say("loading both models, ours and transformers'")
    models = [load_model(str(p), device=args.device) for p in (base, noln)]
    hf = [GPT2LMHeadModel.from_pretrained(p, attn_implementation="sdpa").to(args.device).eval() for p in (base, noln)]
    stream = np.concatenate([json.loads(line)["input_ids"] for line in open(corpus)])
    ids = torch.from_numpy(stream[: n_seq * args.seq_len].reshape(n_seq, args.seq_len).astype(np.int64)).to(args.device)

    def floor():
        with torch.no_grad():
            for m in hf:
                for start in range(0, n_seq, args.batch):
                    m(ids[start:start + args.batch]).logits  # noqa: B018  plain forward: logits, nothing reduced

    runs = iter(range(10**6))

    def study(metrics):
        def go():
            run_study(models, parse_corpus(str(corpus), field="input_ids"), seq_len=args.seq_len, batch=args.batch,
                      max_tokens=n_seq * args.seq_len, settings=Settings(metrics=metrics),
                      state_dir=work / f"state{next(runs)}")  # a fresh state: every run computes
        return go

    rows = []
    n_tok = n_seq * args.seq_len
    for label, metrics, target in () if args.no_timing else (("CE only", ("ce",), TARGETS["ce"]),
                                                             ("full metric set", Settings().metrics, TARGETS["full"])):
        say(f"timing the study ({label}) against plain forwards, {args.repeats} rounds of {n_seq} sequences each")
        t_ours, t_floor, ratio = interleaved(study(metrics), floor, args.repeats, args.device)
        say(f"  {label}: {1 / ratio:.2f}x the plain forwards' throughput")
        rows.append((f"study throughput, {label}, 2 models, {n_seq}×{args.seq_len}", f"{n_tok * 2 / t_ours:,.0f} tok/s",
                     f"HF forwards {n_tok * 2 / t_floor:,.0f} tok/s", 1 / ratio, f"≥ {target}×", 1 / ratio >= target))
    if not args.no_memory:
        say(f"peak memory of a full study on {n_seq} sequences (a fresh process)")
        small = memory(base, noln, corpus, args, n_seq)
        say(f"peak memory of a full study on {4 * n_seq} sequences (a fresh process)")
        large = memory(base, noln, corpus, args, 4 * n_seq)
        for m, n in ((small, n_seq), (large, 4 * n_seq)):
            above = m["peak_gb"] - m["weights_gb"]
            rows.append((f"peak resident memory (imports included) above the weights, full study, "
                         f"batch {args.batch}×{args.seq_len}, {n} sequences", f"{m['peak_gb']:.2f} GB",
                         f"weights {m['weights_gb']:.2f} GB; ready {m['ready_gb']:.2f} GB", above,
                         f"≤ {TARGETS['memory_gb']} GB", above <= TARGETS["memory_gb"]))
    lines = [f"| measure ({args.size}, {args.device}) | ours | reference | ratio | target | met |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {ours} | {ref} | {ratio:.2f} | {target} | {'yes' if met else 'no'} |"
              for name, ours, ref, ratio, target, met in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.update_docs:
        from bench.run import update_docs

        say(f"wrote {update_docs(STUDY_HEADING, f'torch {torch.__version__}, {args.device}.' + chr(10) * 2 + text)}")


if __name__ == "__main__":
    main()
