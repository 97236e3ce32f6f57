"""The command line of the papers' other findings: ``compare --neurons`` and ``patch``.

``compare ... --neurons [N,N,...|marked]`` adds each model's entropy-neuron signature and the mean ablation of
those neurons on the text to the JSON report (and a line each to the summary); the means come from ``--means-data``
(default: the bundled held-out sample).  ``patch`` runs activation against attribution patching on one clean and
corrupted prompt, or, with ``--ioi N``, the papers' study over N IOI pairs (data-parallel under
``accelerate launch``, process 0 prints and writes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError
from .findings.neurons import (
    NeuronAblation, NeuronSignature, ablation_summary, corpus_means, neuron_ablation, neuron_signature,
    parse_neurons,
)
from .findings.patching import Patching
from .model import DTYPES, LoadedModel
from .study.results import json_safe


def new_directory(value: str | None) -> Path | None:
    """``--out``: a new or empty directory (nothing a user had there is overwritten), or None when not given."""
    out = Path(os.path.expanduser(value)) if value else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {value!r} is not a new or empty directory")
    return out


def add_neuron_arguments(cmp: argparse.ArgumentParser) -> None:
    cmp.add_argument("--neurons", nargs="?", const="marked", default=None, metavar="N,N,...|marked",
                     help="also mean-ablate these last-layer neurons on the text, split into the direct part and the "
                          "part through the final LN's scale (exactly 0 without LN); 'marked' (the default when the "
                          "flag is given alone): the papers' entropy neurons for GPT-2 small and medium, else the "
                          "top three by their weight signature")
    cmp.add_argument("--means-data", default="demo", metavar="PATH_OR_DATASET",
                     help="the corpus the ablation means come from (default: the bundled held-out sample; the papers "
                          "used lucabaroni/apollo-pile-filtered-10k)")
    cmp.add_argument("--means-sequences", type=int, default=250,
                     help="sequences of 512 tokens (or the context) averaged for the means (default 250, the papers')")


def signature_json(sig: NeuronSignature, neurons: Sequence[int]) -> dict[str, Any]:
    rank = {int(n): i + 1 for i, n in enumerate(sig.ranking)}
    return {"layer": sig.layer, "marked": list(sig.marked), "marked_source": sig.marked_source, "null_k": sig.null_k,
            "neurons": [{"neuron": int(n), "w_out_norm": sig.w_out_norm[n], "logit_var": sig.logit_var[n],
                         "ratio_rank": rank[int(n)], "null_share": sig.null_share[n]} for n in neurons]}


def ablation_json(ab: NeuronAblation) -> dict[str, Any]:
    return {"neurons": list(ab.neurons), "labels": list(ab.labels), "loss": ab.loss, "entropy": ab.entropy,
            "loss_total": ab.loss_total, "loss_direct": ab.loss_direct, "loss_via_ln": ab.loss_via_ln,
            "entropy_total": ab.entropy_total, "entropy_direct": ab.entropy_direct,
            "entropy_via_ln": ab.entropy_via_ln, "scale_change": ab.scale_change, "means": ab.means,
            "means_source": ab.means_source,
            "summary": [{"label": s.label, "loss_median": s.loss_median, "loss_quartiles": list(s.loss_quartiles),
                         "loss_mean": s.loss_mean, "entropy_median": s.entropy_median,
                         "entropy_quartiles": list(s.entropy_quartiles), "entropy_mean": s.entropy_mean,
                         "via_ln_share": s.via_ln_share} for s in ablation_summary(ab)]}


def neurons_entries(models: Sequence[LoadedModel], token_ids: Sequence[int], value: str, means_data: str,
                    means_sequences: int) -> list[dict[str, Any]]:
    """The ``neurons`` field of each model's entry in ``compare --json``."""
    from .corpus import parse_corpus

    chosen = parse_neurons(value)
    corpus = parse_corpus(means_data)
    out = []
    for m in models:
        sig = neuron_signature(m)
        neurons = sig.marked if chosen is None else chosen
        means = corpus_means(m, corpus, sequences=means_sequences)
        ab = neuron_ablation(m, token_ids, neurons, means)
        out.append(json_safe({"signature": signature_json(sig, ab.neurons), "ablation": ablation_json(ab),
                              "means_tokens": means.tokens}))
    return out


def neurons_summary(entry: dict[str, Any]) -> list[str]:
    lines = []
    for s in entry["ablation"]["summary"]:
        lines.append(f"  ablating {s['label']}: |Δloss| median {s['loss_median']:.2e}, mean {s['loss_mean']:.2e}; "
                     f"|Δentropy| mean {s['entropy_mean']:.2e}; through the final LN {s['via_ln_share']:.1%}")
    return lines


def add_patch_parser(sub) -> None:
    pa = sub.add_parser(
        "patch", help="activation against attribution patching (one prompt pair, or the papers' IOI study)",
        description=(
            "Patch a clean prompt's activations into a corrupted one of the same token length: activation patching "
            "(one run per cell) against attribution patching (grad x difference), over layer x position of resid_pre "
            "and the final stream, and per head (z), for the logit difference answer - counterfactual at the last "
            "position, normalised by clean - corrupted as the papers do. With --ioi N, the papers' study over N IOI "
            "pairs (their templates, seeded): the agreement per model with 95%% intervals; accelerate-ready."),
    )
    pa.add_argument("--model", action="append", metavar="SRC[@REV]", help="repeat for each model (default: the pair)")
    pa.add_argument("--clean", help="the clean prompt, e.g. 'When Mary and John went to the store, John gave a drink to'")
    pa.add_argument("--corrupted", help="the corrupted prompt, same token length, e.g. the second name swapped")
    pa.add_argument("--answer", help="the clean prompt's answer token, e.g. ' Mary'")
    pa.add_argument("--counterfactual", help="the competing token, e.g. ' John'")
    pa.add_argument("--no-bos", action="store_true", help="do not prepend <|endoftext|>")
    pa.add_argument("--ioi", type=int, default=None, metavar="N",
                    help="the papers' study over N IOI prompt pairs (a multiple of 4; the papers used 480)")
    pa.add_argument("--seed", type=int, default=0, help="the IOI draw's seed (default 0)")
    pa.add_argument("--templates", type=int, default=1, help="IOI templates to draw from (default 1, the papers')")
    pa.add_argument("--out", default=None, metavar="DIR", help="write patching.json and patching.md into this new "
                                                               "or empty directory")
    pa.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    pa.add_argument("--dtype", default="float32", choices=list(DTYPES))
    pa.add_argument("--json", action="store_true", help="print the full JSON result instead of a summary")


def patching_json(p: Patching) -> dict[str, Any]:
    return json_safe({
        "name": p.name, "ln_free": p.ln_free, "clean_ids": p.clean_ids, "corrupted_ids": p.corrupted_ids,
        "answer_id": p.answer_id, "counterfactual_id": p.counterfactual_id, "clean_metric": p.clean_metric,
        "corrupted_metric": p.corrupted_metric, "normaliser": p.normaliser, "resid_labels": list(p.resid_labels),
        "resid_act": p.resid_act, "resid_attr": p.resid_attr, "z_act": p.z_act, "z_attr": p.z_attr,
        "resid_agreement": vars(p.resid_agreement), "z_agreement": vars(p.z_agreement)})


def _est(e) -> str:
    return f"{e.mean:.4f} [{e.low:.4f}, {e.high:.4f}]" if e.n > 1 else f"{e.mean:.4f}"


def study_markdown(study) -> str:
    lines = [f"# Activation against attribution patching: {study.prompts} IOI pairs", "",
             f"Seed {study.seed}, {study.templates} template(s), {study.processes} process(es). Agreement of "
             "attribution patching with activation patching per prompt (mean, 95% t-interval over prompts); NMAE = "
             "mean |attr - act| / mean |act|.", "",
             "| model | resid_pre NMAE | resid_pre correlation | head (z) NMAE | head (z) correlation | "
             "final-stream gap | mean maps NMAE |", "|---|---|---|---|---|---|---|"]
    for m in study.models:
        mean = f"{m.mean_agreement.nmae:.4f}" if m.mean_agreement else "—"
        lines.append(f"| {m.name} ({'LN-free' if m.ln_free else 'with LN'}) | {_est(m.resid_nmae)} | "
                     f"{_est(m.resid_correlation)} | {_est(m.z_nmae)} | {_est(m.z_correlation)} | "
                     f"{m.final_error:.1e} | {mean} |")
    lines += ["", "The final-stream gap is the largest |attribution - activation| (in logits) at the last position of "
              "the stream entering the unembedding: float noise without LN (the readout is affine), not with LN."]
    return "\n".join(lines) + "\n"


def study_json(study) -> dict[str, Any]:
    from dataclasses import asdict

    return json_safe(asdict(study))


def run_patch(args: argparse.Namespace, load: callable) -> int:
    """``patch``: ``load(spec, device, dtype)`` gives each model (the CLI's own loader)."""
    from .registry import default_pair

    specs = args.model or list(default_pair())
    out = new_directory(args.out)
    if args.ioi is None:
        missing = [f"--{k}" for k in ("clean", "corrupted", "answer", "counterfactual") if not getattr(args, k)]
        if missing:
            raise InputError(f"patch needs {', '.join(missing)} (or --ioi N for the papers' IOI study)")
        from .findings.patching import patch_models

        models = [load(spec, args.device, args.dtype) for spec in specs]
        results = patch_models(models, args.clean, args.corrupted, args.answer, args.counterfactual,
                               prepend_bos=not args.no_bos)
        doc = {"clean": args.clean, "corrupted": args.corrupted, "answer": args.answer,
               "counterfactual": args.counterfactual, "models": [patching_json(p) for p in results]}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "patching.json").write_text(json.dumps(doc))
        if args.json:
            print(json.dumps(doc, ensure_ascii=False))
        else:
            for p in results:
                print(f"{p.name} ({'LN-free' if p.ln_free else 'with LayerNorm'}): logit diff clean "
                      f"{p.clean_metric:+.4f}, corrupted {p.corrupted_metric:+.4f}; attribution against activation "
                      f"patching: resid_pre NMAE {p.resid_agreement.nmae:.2%} (r = {p.resid_agreement.correlation:.3f}),"
                      f" heads NMAE {p.z_agreement.nmae:.2%}; final stream {p.resid_attr[-1, -1]:+.5f} against "
                      f"{p.resid_act[-1, -1]:+.5f}")
        return 0
    from .study.engine import accelerate_world
    from .study.patching import patching_study

    world, device = accelerate_world(args.device)
    models = [load(spec, device, args.dtype) for spec in specs]

    def progress(done: int, total: int) -> None:
        if world.rank == 0 and (done == total or done % 10 == 0):
            print(f"patching: {done}/{total} prompt pairs on this process", file=sys.stderr)

    study = patching_study(models, args.ioi, args.seed, args.templates, world, progress)
    if study is None:
        return 0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "patching.json").write_text(json.dumps(study_json(study)))
        (out / "patching.md").write_text(study_markdown(study))
    print(json.dumps(study_json(study), ensure_ascii=False) if args.json else study_markdown(study), end="")
    return 0


def add_benchmark_parser(sub) -> None:
    be = sub.add_parser(
        "benchmark", help="benchmark accuracy through lm-evaluation-harness, models side by side (accelerate-ready)",
        description=(
            "Each model, loaded exactly, goes to EleutherAI's lm-evaluation-harness as an ordinary transformers "
            "module (to_transformers) in the harness's HF model class; the harness runs its tasks and scores them. "
            "Writes a side-by-side table with the harness's standard errors. hellaswag_completion is the "
            "nanoGPT-style HellaSwag scoring (Heimersheim 2024's table is likely of that kind), labelled as such."),
    )
    be.add_argument("--model", action="append", metavar="SRC[@REV]", help="repeat for each model (default: the pair)")
    be.add_argument("--tasks", required=True, help="comma list of the harness's tasks (hellaswag, mmlu, "
                                                   "lambada_openai...) and/or hellaswag_completion")
    be.add_argument("--limit", type=int, default=None, help="at most this many items per task (default: all)")
    be.add_argument("--include", default=None, metavar="DIR",
                    help="a folder of task YAMLs of your own (the harness's --include_path), e.g. on local data")
    be.add_argument("--hellaswag-data", default="Rowan/hellaswag", metavar="PATH_OR_DATASET",
                    help="hellaswag_completion: HellaSwag's validation items (raw format: ctx, endings, label)")
    be.add_argument("--batch", type=int, default=8, help="requests per forward pass (1: identical across processes)")
    be.add_argument("--seed", type=int, default=1234, help="the harness's seeds (few-shot sampling)")
    be.add_argument("--out", default=None, metavar="DIR",
                    help="write benchmark.json, benchmark.csv and benchmark.md into this new or empty directory")
    be.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    be.add_argument("--dtype", default="float32", choices=list(DTYPES))
    be.add_argument("--json", action="store_true", help="print the JSON result instead of the table")


def run_benchmark_cli(args: argparse.Namespace, load: callable) -> int:
    import csv

    from .registry import default_pair
    from .study.benchmark import benchmark_csv_rows, benchmark_json, benchmark_markdown, run_benchmark
    from .study.engine import accelerate_world

    out = new_directory(args.out)
    if args.include and not Path(os.path.expanduser(args.include)).is_dir():
        raise InputError(f"--include {args.include!r} is not a directory of task YAMLs")
    if args.batch < 1:
        raise InputError(f"--batch {args.batch} must be at least 1")
    world, device = accelerate_world(args.device)
    models = [load(spec, device, args.dtype) for spec in (args.model or list(default_pair()))]
    result = run_benchmark(models, args.tasks.split(","), args.limit,
                           os.path.expanduser(args.include) if args.include else None, args.batch, args.seed, world,
                           args.hellaswag_data)
    if result is None:
        return 0
    doc = benchmark_json(result)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(doc, indent=1))
        (out / "benchmark.md").write_text(benchmark_markdown(result))
        rows = benchmark_csv_rows(result)
        with open(out / "benchmark.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["task"])
            writer.writeheader()
            writer.writerows(rows)
    print(json.dumps(doc, ensure_ascii=False) if args.json else benchmark_markdown(result), end="")
    return 0
