"""Command line: ``python -m noln_core compare ... --json`` and ``python -m noln_core models``.

Bad input ends with one line on stderr (``error: ...``) and exit status 2;
warnings (truncated text, a multi-token answer) go to stderr as
``warning: ...`` and the run goes on.  stdout carries only the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from . import __version__
from .analyses import (
    attention, direct_logit_attribution, head_direct_effects, logit_difference, next_token, residual_norms,
)
from .analyses.attribution import VALUE_BIAS
from .cli_findings import (
    add_benchmark_parser, add_neuron_arguments, add_patch_parser, neurons_entries, neurons_summary, run_benchmark_cli,
    run_patch,
)
from .compare import RunResult, compare
from .errors import InputError, NolnError
from .loading import load_model
from .model import DTYPES
from .corpus import SAMPLINGS
from .study.measure import METRICS, NMAE_TARGETS
from .study.results import json_safe
from .notebook import VIEWS as NOTEBOOK_VIEWS
from .training.recipe import PRESETS as PRESET_NAMES
from .registry import DEFAULT_PAIR, DEMO_PAIR, REGISTRY, default_pair, parse_spec
from .tokenizer import decode_utf8

EXIT_BAD_INPUT = 2
TOP_NEURONS = 10


def report(result: RunResult, value_bias: str = "head") -> dict[str, Any]:
    """The JSON document for a run: every analysis, one entry per model (documented in the README).

    ``value_bias``: where the per-head numbers count each head's value bias (``head`` or ``b_O``).
    """
    nt = next_token(result)
    norms = residual_norms(result)
    attn = attention(result)
    dla = direct_logit_attribution(result, value_bias)
    de = head_direct_effects(result, value_bias)
    lens = logit_difference(result)
    p = result.position
    models = []
    for i, run in enumerate(result.runs):
        info = run.info
        entry: dict[str, Any] = {
            "name": info.name, "source": info.source, "revision": info.revision, "commit": info.commit,
            "ln_free": info.ln_free, "device": info.device, "dtype": info.dtype,
            "n_layers": info.n_layers, "n_heads": info.n_heads, "d_model": info.d_model,
            "next_token_logprobs": run.next_logprobs, "mean_loss": nt.models[i].mean_loss,
            "entropy": run.entropy,
            "top_k": [
                {"id": int(t), "token": s, "prob": float(np.exp(lp))}
                for t, s, lp in zip(run.top_ids, run.top_tokens, run.top_logprobs)
            ],
            "logit_diff": None, "logit_lens": None, "dla": None, "dla_heads": None, "dla_attn_bias": None,
            "top_neurons": None, "direct_effect_heads": None, "direct_effect_nmae": None,
            "resid_norms": norms[i].hidden,
            "resid_norms_detail": {"resid_pre": norms[i].resid_pre, "resid_mid": norms[i].resid_mid,
                                   "resid_post": norms[i].resid_post},
            "ln_scales": None if info.ln_free else {
                "ln1": norms[i].ln1_scale, "ln2": norms[i].ln2_scale, "ln_final": norms[i].ln_final_scale},
            "attn_to_first": attn[i].to_first,
            "sink_rate": attn[i].sink_rate,
            "sink_rate_papers": attn[i].sink_rate_papers,
            "hf_deviation": run.hf_deviation,
        }
        if dla is not None and de is not None and lens is not None:
            d = dla[i]
            entry.update({
                "logit_diff": d.logit_diff,
                "logit_lens": {"labels": lens.models[i].lens_labels, "values": lens.models[i].lens},
                "dla": {"labels": d.labels, "values": d.values, "constant": d.constant, "error": d.error,
                        "exact": d.exact, "scale": d.scale, "method": d.method, "value_bias": d.value_bias,
                        "value_bias_definition": VALUE_BIAS[d.value_bias]},
                "dla_heads": d.heads, "dla_attn_bias": d.attn_bias,
                "top_neurons": [{"layer": l, "neuron": n, "value": v} for l, n, v in d.top_neurons(TOP_NEURONS)],
                "direct_effect_heads": de[i].direct_effect, "direct_effect_nmae": de[i].nmae,
            })
        models.append(entry)
    target = result.target
    doc = {
        "noln_core_version": __version__,
        "text": result.text, "token_ids": result.token_ids, "tokens": result.tokens, "pieces": result.pieces,
        "prepend_bos": result.prepend_bos, "position": p, "truncated": result.truncated,
        "target": None if target is None else {
            "answer": target.answer, "answer_id": target.answer_id, "answer_pieces": target.answer_pieces,
            "counterfactual": target.counterfactual, "counterfactual_id": target.counterfactual_id,
            "counterfactual_pieces": target.counterfactual_pieces,
        },
        "warnings": result.warnings,
        "models": models,
        "pairs": [
            {"a": idx.a, "b": idx.b, "kl_ab": pr.kl_ab, "kl_ba": pr.kl_ba, "js": pr.js, "top1_agree": pr.top1_agree,
             "agreement": pr.agreement, "loss_diff": pr.loss_diff}
            for idx, pr in zip(result.pairs, nt.pairs)
        ],
    }
    return json_safe(doc)


def _summary(doc: dict[str, Any]) -> str:
    """A short human-readable report for the terminal."""
    lines = [f"{len(doc['token_ids'])} tokens; analysed position {doc['position']} ({doc['tokens'][doc['position']]!r})"]
    if doc["target"]:
        t = doc["target"]
        lines.append(f"logit difference: {t['answer']!r} - {t['counterfactual']!r}")
    for m in doc["models"]:
        lines.append(f"\n{m['name']}  ({'LN-free' if m['ln_free'] else 'with LayerNorm'}, {m['device']}, {m['dtype']})")
        lines.append(f"  mean loss {m['mean_loss']:.4f} nats; attention-sink rate {m['sink_rate']:.1%}"
                     if m["mean_loss"] is not None and m["sink_rate"] is not None else "  (one token: no loss)")
        top = ", ".join(f"{k['token']!r} {k['prob']:.3f}" for k in m["top_k"][:5])
        lines.append(f"  top next tokens: {top}")
        if m["logit_diff"] is not None:
            d = m["dla"]
            lines.append(f"  logit diff {m['logit_diff']:+.4f} = components {sum(d['values']):+.4f} "
                         f"+ constant {d['constant']:+.4f}  (error {d['error']:.2e}, {'exact' if d['exact'] else 'cached LN scale'})")
            lines.append(f"  DLA vs direct effect over heads: NMAE {m['direct_effect_nmae']:.2%}")
        if m.get("neurons"):
            lines += neurons_summary(m["neurons"])
    for pr in doc["pairs"]:
        a, b = doc["models"][pr["a"]]["name"], doc["models"][pr["b"]]["name"]
        lines.append(f"\n{a} vs {b}: top-1 agreement {pr['agreement']:.1%}, mean JS {np.mean(pr['js']):.4f} nats")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m noln_core",
        description="Compare GPT-2 with its LayerNorm-free fine-tunes on the same token ids.",
    )
    parser.add_argument("--version", action="version", version=f"noln_core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser(
        "compare",
        help="run models side by side on a text and report every analysis",
        description=(
            "Run each model once on the same token ids and report next-token log-probs, the logit difference and its "
            "lens, residual norms, direct logit attribution (with its constant term; exact for LN-free models), per-head "
            "DLA against the true direct effect, and attention-sink rates. With --json, one JSON document goes to stdout "
            "(schema in the README); otherwise a short summary. Errors: one line on stderr, exit status 2."
        ),
        epilog=(f"Default models: {DEFAULT_PAIR[0]} and {DEFAULT_PAIR[1]} when the hub is reachable or they are cached, "
                f"else the shipped offline demo pair {DEMO_PAIR[0]} and {DEMO_PAIR[1]}. `python -m noln_core models` lists known ones."),
    )
    cmp.add_argument("--model", action="append", metavar="SRC[@REV]",
                     help="hub repo id or local directory, optionally @revision (repeat for each model; default: the pair above)")
    cmp.add_argument("--text", required=True, help="the prompt; '-' reads it from stdin")
    cmp.add_argument("--answer", help="answer token, e.g. ' Mary' (mind the leading space); with --counterfactual")
    cmp.add_argument("--counterfactual", help="counterfactual token, e.g. ' John'")
    cmp.add_argument("--position", type=int, default=-1, help="token position analysed (default -1, the last)")
    cmp.add_argument("--no-bos", action="store_true", help="do not prepend <|endoftext|>")
    cmp.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    cmp.add_argument("--dtype", default="float32", choices=list(DTYPES))
    cmp.add_argument("--value-bias", default="head", choices=list(VALUE_BIAS),
                     help="where the per-head DLA and direct effects count each head's value bias b_V: in the head "
                          "(default) or in the layer's b_O (TransformerLens' fold_value_biases, as the papers)")
    cmp.add_argument("--json", action="store_true", help="print the full JSON report instead of a summary")
    add_neuron_arguments(cmp)
    add_patch_parser(sub)
    add_benchmark_parser(sub)
    sub.add_parser("models", help="list the registry of known models")
    rm = sub.add_parser(
        "remove-ln", help="remove LayerNorm from a GPT-2 by fine-tuning (the papers' method; accelerate-ready)",
        description=(
            "Fine-tune a GPT-2 while its LayerNorms are replaced, one by one, by fake LNs that divide by a measured, "
            "then frozen, sigma (ln_2 per layer, then ln_1 Q/K, then ln_1 V, then ln_f), and write the result in the "
            "published LN-free format (LN weight x1e6/sigma, eps 1e12). --control fine-tunes the same way with every "
            "LN kept (the papers' 'vanilla' model). Run under `accelerate launch -m noln_core remove-ln ...` for "
            "several GPUs or nodes (DDP, or FSDP); --batch is the global batch. Loss log in "
            "OUT/_training/loss_log.jsonl; checkpoints there: rerunning the same command resumes."
        ),
    )
    rm.add_argument("--base", required=True, metavar="SRC[@REV]",
                    help="the GPT-2 to fine-tune: a local directory, a hub repo id (gpt2, openai-community/gpt2-xl) or "
                         "demo:gpt2-kjv")
    rm.add_argument("--data", required=True, metavar="PATH_OR_DATASET",
                    help="training text: a .txt file, a directory, a .jsonl file, 'demo', or a Hugging Face dataset "
                         "name[:config] (e.g. openwebtext)")
    rm.add_argument("--field", default=None, help="JSONL field or dataset column (default text; input_ids if present)")
    rm.add_argument("--split", default="train", help="dataset split (default train)")
    rm.add_argument("--eval-data", default=None, metavar="PATH_OR_DATASET",
                    help="held-out text (default: the last 1%% of the training sequences, at most 1000, held out)")
    rm.add_argument("--out", required=True, metavar="DIR",
                    help="where the fine-tuned checkpoint is written: a new or empty directory, or one holding this "
                         "run's state (it resumes); never the base model's")
    rm.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --out that is not a run of this tool, replacing the files it writes")
    rm.add_argument("--preset", choices=list(PRESET_NAMES), default=None,
                    help="the papers' recipe for this GPT-2 size: schedule, lambda, learning rate, batch and steps")
    rm.add_argument("--control", action="store_true",
                    help="fine-tune with every LayerNorm kept (same data, steps, batch and learning rate)")
    rm.add_argument("--steps", type=int, default=None, help="optimiser steps (default 300, or the preset's)")
    rm.add_argument("--batch", type=int, default=None,
                    help="global batch: sequences per step over all processes (default 16, or the preset's)")
    rm.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 1, or the preset's)")
    rm.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per forward per process; sets --grad-accum to batch / (micro-batch x processes)")
    rm.add_argument("--seq-len", "--block", dest="seq_len", type=int, default=None,
                    help="tokens per sequence (default 1024, or the model's context if shorter)")
    rm.add_argument("--lr", type=float, default=None, help="peak learning rate (default 6e-4, or the preset's)")
    rm.add_argument("--min-lr", type=float, default=None, help="final learning rate of the cosine decay")
    rm.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    rm.add_argument("--weight-decay", type=float, default=None,
                    help="AdamW weight decay on matrices and embeddings (default 0.01; the original used 0.1)")
    rm.add_argument("--aux-lambda", type=float, default=None,
                    help="weight of the auxiliary loss on the final sigma (default 0.1, or the preset's; 0 for --control)")
    rm.add_argument("--momentum", type=float, default=None, help="of the sigma moving average (default 0.9)")
    rm.add_argument("--start", type=int, default=None, help="step at which layer 0's ln_2 is removed")
    rm.add_argument("--gaps", default=None, metavar="LN2,QK,V", help="steps between layers in each phase, e.g. 2,2,3")
    rm.add_argument("--max-tokens", type=int, default=None, help="read at most this many training tokens")
    rm.add_argument("--eval-every", type=int, default=100, help="held-out evaluation every N steps (0: at the end only)")
    rm.add_argument("--checkpoint-every", type=int, default=50)
    rm.add_argument("--seed", type=int, default=None)
    rm.add_argument("--device", default="auto", help="auto, cpu, cuda (accelerate chooses when it launches)")
    rm.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "bf16-mixed"],
                    help="auto (the released code's): bfloat16 weights and autocast where the device has them (a GPU "
                         "with bf16), float32 elsewhere; bf16-mixed: bf16 autocast over float32 master weights")
    rm.add_argument("--special-sigma", action="store_true", default=None,
                    help="position 0 (every LN) and EOT tokens (ln_1's V path) divide by a sigma of their own until "
                         "ln_f + 12 / + 2: this project's option, after the Apollo fork; the released code has none")
    rm.add_argument("--no-ln-decay", dest="ln_decay", action="store_false", default=None,
                    help="no weight decay on the LN gains (the released code decays them when removing LN)")
    rm.add_argument("--eot-loss", action="store_true", default=None,
                    help="count positions whose target is EOT in the loss (the released code masks them)")
    st = sub.add_parser(
        "study", help="the papers' corpus metrics for several models, with 95%% intervals (accelerate-ready)",
        description="One pass over a corpus computes, per model: mean CE with a 95% interval over sequences, the "
                    "per-token median, loss by position, entropy, calibration, DLA-vs-direct-effect NMAE, the "
                    "first token's residual norm, attention-sink rates and exploding tokens; per pair: KL both "
                    "ways, JS, top-1 agreement and where the losses part. Run it under `accelerate launch -m "
                    "noln_core study ...` to shard the sequences over processes. Rerunning resumes.")
    st.add_argument("--reproduce", default=None, metavar="NAME",
                    help="set everything as one of the papers' figures did (models, dataset, sampling, length, rows, "
                         "metrics, definitions); `--reproduce list` names them. Other flags override a setting, and "
                         "the report then says that the published numbers no longer apply")
    st.add_argument("--model", action="append", default=None, metavar="SRC[@REV]",
                    help="a model (repeat: 1 to about 12); the first is the reference of --pairs first")
    st.add_argument("--data", default=None, metavar="PATH_OR_DATASET",
                    help="a .txt file (one document), a directory (a document per file), a .jsonl file, 'demo' "
                         "(the bundled held-out sample), or a Hugging Face dataset name[:config]")
    st.add_argument("--field", default=None, help="JSONL field or dataset column (default text; input_ids if present)")
    st.add_argument("--split", default=None, help="dataset split (default train)")
    st.add_argument("--sampling", default=None, choices=list(SAMPLINGS),
                    help="how rows become sequences (default stream: joined and cut into chunks; first-tokens: each "
                         "row's first --seq-len tokens; pile-eval and owt-eval: as the papers' CE scripts; README)")
    st.add_argument("--rows", type=int, default=None, help="read only the first R rows (after --shuffle-seed)")
    st.add_argument("--shuffle-seed", type=int, default=None,
                    help="shuffle the rows first with this seed (the datasets library's own shuffles)")
    st.add_argument("--chunk", type=int, default=None,
                    help="cut the joined stream into chunks of this length and analyse the first --seq-len tokens of "
                         "each (sink_rate.py analyses 512 of 1024)")
    st.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024, or the context)")
    st.add_argument("--max-tokens", type=int, default=None, help="budget: analyse at most this many tokens")
    st.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default 8)")
    st.add_argument("--positions", type=int, default=16, metavar="K",
                    help="loss by position: the first K positions one by one, then doubling ranges (default 16)")
    st.add_argument("--bos", action="store_true", default=None,
                    help="prepend <|endoftext|> to every sequence (the papers do not; see the README)")
    st.add_argument("--metrics", default=None,
                    help="comma list of " + ",".join(METRICS) + " (default all; ce is always measured)")
    st.add_argument("--neurons", nargs="?", const="marked", default=None, metavar="N,N,...|marked",
                    help="also mean-ablate these last-layer neurons over the same sequences (ablate_all_models.py): "
                         "mean |Δloss| and |Δentropy| with intervals, split into direct and through-the-final-LN "
                         "parts; 'marked' (alone): the papers' neurons for GPT-2 small and medium, else the top three")
    st.add_argument("--nmae-target", default=None, choices=list(NMAE_TARGETS),
                    help="last-token: the papers' definition (default); logit-diff: this app's")
    st.add_argument("--pairs", default="all", choices=["all", "first"], help="compare all pairs, or each with the first")
    st.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for ECE and NMAE intervals")
    st.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    st.add_argument("--explode-loss", type=float, default=20.0, help="loss (nats) that marks an exploding token")
    st.add_argument("--explode-norm", type=float, default=5.0,
                    help="multiple of the sequence's median last-layer norm that marks an exploding token")
    st.add_argument("--out", default=None, metavar="DIR",
                    help="write study.json, study.csv and study.md into this new or empty directory")
    st.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing its study files")
    st.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    st.add_argument("--state-dir", default=None, help="where resumable state is kept (default ~/.cache/noln-explorer/studies)")
    st.add_argument("--restart", action="store_true", help="discard saved state and start over")
    st.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (accelerate chooses when it launches)")
    st.add_argument("--dtype", default="float32", choices=list(DTYPES))
    nb = sub.add_parser(
        "notebook", help="write a Jupyter notebook (or .py script) that reproduces a view with noln_core",
        description="The notebook loads the models, runs the text as the app does, calls the page's analyses, draws "
                    "its figures and prints the view's numbers as JSON (the names `compare --json` uses).")
    nb.add_argument("--model", action="append", metavar="SRC[@REV]", help="a model (repeat; default: the default pair)")
    nb.add_argument("--text", required=True)
    nb.add_argument("--answer", default=None)
    nb.add_argument("--counterfactual", default=None)
    nb.add_argument("--position", type=int, default=None, help="token index (default: the last)")
    nb.add_argument("--no-bos", action="store_true", help="do not prepend <|endoftext|>")
    nb.add_argument("--page", default="overview", choices=list(NOTEBOOK_VIEWS), help="the view (default overview)")
    nb.add_argument("--layer", type=int, default=0, help="attribution: the layer of the head x source heatmap")
    nb.add_argument("--neurons", default="marked", help="neurons: the last-layer neurons ablated (default marked)")
    nb.add_argument("--means-sequences", type=int, default=250, help="neurons: sequences for the means")
    nb.add_argument("--corrupted", default=None,
                    help="patching: the corrupted prompt (default: the text with answer and counterfactual swapped)")
    nb.add_argument("--device", default="cpu")
    nb.add_argument("--dtype", default="float32", choices=list(DTYPES))
    nb.add_argument("--out", required=True, metavar="FILE.ipynb|FILE.py")
    nb.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    demo = sub.add_parser("make-demo", help="rebuild the offline demo trio (GPT-2 on the King James Bible, its fine-tune "
                                            "with LN and its LN-free fine-tune)",
                          description="Seeded rebuild of noln_core/data/demo (needs Debian's bible-kjv for the text): "
                                      "the original, then two fine-tunes of the same steps and data, one with LN (the "
                                      "control), one removing it; the cards get the papers' three-column table.")
    demo.add_argument("--out", default=None, help="output directory (default: the shipped noln_core/data/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=1500, help="training steps from scratch")
    demo.add_argument("--finetune-steps", "--removal-steps", dest="finetune_steps", type=int, default=600,
                      help="steps of each fine-tune (LN removal, and the control with LN)")
    return parser


def _gaps(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        gaps = tuple(int(x) for x in text.split(","))
    except ValueError:
        gaps = ()
    if len(gaps) != 3 or min(gaps) < 1:
        raise InputError(f"--gaps {text!r} must be three positive integers, e.g. 2,2,3")
    return gaps  # type: ignore[return-value]


def removal_recipe(args: argparse.Namespace, config, processes: int):
    """The recipe ``remove-ln`` runs: the preset (or the defaults) with every flag given, the accumulation derived from
    ``--micro-batch`` over ``processes``, checked against the base model's ``config`` (context, layers). Raises
    InputError, in the flags' own words, for a run that cannot be made."""
    from dataclasses import replace

    from .training.recipe import recipe

    overrides = dict(steps=args.steps, batch=args.batch, grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr,
                     warmup=args.warmup, weight_decay=args.weight_decay, aux_lambda=args.aux_lambda,
                     momentum=args.momentum, start_ln2=args.start, gaps=_gaps(args.gaps), seed=args.seed,
                     seq_len=args.seq_len, special_sigma=args.special_sigma, ln_gain_decay=args.ln_decay,
                     eot_loss=args.eot_loss)
    if args.control and args.aux_lambda is None:
        overrides["aux_lambda"] = 0.0
    if overrides["seq_len"] is None and not args.preset:
        overrides["seq_len"] = min(1024, config.n_positions)
    try:
        r = recipe(args.preset, **overrides)
        if args.micro_batch is not None:
            if r.batch % (args.micro_batch * processes):
                raise ValueError(f"--batch {r.batch} is not a multiple of --micro-batch {args.micro_batch} x "
                                 f"{processes} process(es)")
            r = replace(r, grad_accum=r.batch // (args.micro_batch * processes))
        if r.seq_len > config.n_positions:
            raise ValueError(f"--seq-len {r.seq_len} is longer than {args.base}'s context of {config.n_positions}")
        if r.seq_len < 2:
            raise ValueError(f"--seq-len {r.seq_len} is too short")
        if not args.control:
            r.schedule(config.n_layer)
    except ValueError as err:
        raise InputError(str(err)) from err
    return r


def _run_remove_ln(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import read_config
    from .corpus import parse_corpus
    from .loading import locate
    from .training.recipe import size_of
    from .training.removal import finetune

    for flag in ("steps", "batch", "grad_accum", "micro_batch", "seq_len", "warmup", "max_tokens", "checkpoint_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} {value} must be at least 1")
    for flag in ("lr", "min_lr", "weight_decay", "aux_lambda"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise InputError(f"--{flag.replace('_', '-')} {value} must not be negative")
    if args.momentum is not None and not 0 <= args.momentum < 1:
        raise InputError(f"--momentum {args.momentum} must be in [0, 1)")
    source, revision = (args.base, None) if os.path.exists(os.path.expanduser(args.base)) else parse_spec(args.base)
    base = locate(source, revision)
    config = read_config(base, args.base)
    if config.ln_free:
        raise InputError(f"{args.base} is already LN-free")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    size = size_of(config.n_layer, config.n_embd)
    if size and not args.preset:
        print(f"note: {args.base} has GPT-2 {size}'s shape; --preset {size} runs the papers' recipe", file=sys.stderr)
    r = removal_recipe(args, config, processes)
    corpus = parse_corpus(args.data, args.field, args.split)
    eval_corpus = parse_corpus(args.eval_data, args.field, args.split) if args.eval_data else None
    result = finetune(base, corpus, Path(os.path.expanduser(args.out)), r, control=args.control, base_name=args.base,
                      overwrite=args.overwrite,
                      eval_corpus=eval_corpus, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                      device=args.device, precision=args.precision, max_tokens=args.max_tokens, progress=True,
                      log=lambda m: print(m, file=sys.stderr))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": str(result.out), "kind": "ln_control" if args.control else "ln_free",
                          "preset": r.preset, "steps": result.steps, "tokens": result.tokens,
                          "processes": result.processes, "base_eval_loss": result.initial_eval_loss,
                          "eval_loss": result.eval_loss}))
    return 0


def _study_plan(args: argparse.Namespace):
    """The study the flags ask for: a figure's settings (``--reproduce``), each overridden by any flag given."""
    from dataclasses import replace

    from .corpus import Sampling, parse_corpus
    from .study.published import resolve

    figure = resolve(args.reproduce) if args.reproduce else None
    if figure is None and (not args.model or not args.data):
        raise InputError("a study needs --model (one or more) and --data, or --reproduce NAME (`--reproduce list`)")

    def pick(given, from_figure, default):
        return given if given is not None else (from_figure if figure is not None else default)

    sampling = figure.sampling if figure else Sampling()
    changes = {k: v for k, v in (("method", args.sampling), ("rows", args.rows), ("seed", args.shuffle_seed),
                                 ("chunk", args.chunk)) if v is not None}
    if changes:
        sampling = replace(Sampling() if args.sampling and args.sampling != sampling.method else sampling, **changes)
    data = pick(args.data, figure and figure.dataset, None)
    field = pick(args.field, figure and figure.column, None)
    corpus = parse_corpus(data, field, pick(args.split, figure and figure.split, "train"), sampling=sampling)
    metrics = (tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics
               else (figure.metrics if figure else tuple(METRICS)))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)}")
    return dict(
        models=list(args.model) if args.model else list(figure.models), corpus=corpus,
        seq_len=pick(args.seq_len, figure and figure.seq_len, None),
        max_tokens=pick(args.max_tokens, figure and figure.max_tokens, None), bos=pick(args.bos, figure and figure.bos,
                                                                                     False),
        metrics=tuple(sorted(set(metrics) | {"ce"}, key=METRICS.index)),
        nmae_target=pick(args.nmae_target, figure and figure.nmae_target, "last-token"),
        neurons=pick(args.neurons, figure and figure.neurons, None))


def _run_study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .study import Settings, run_study
    from .study.engine import accelerate_world
    from .study.published import listing
    from .study.report import markdown, write_outputs
    from .study.results import to_json

    if args.reproduce == "list":
        print(listing())
        return 0
    for flag, value, least in (("--batch", args.batch, 1), ("--positions", args.positions, 1),
                               ("--bootstrap", args.bootstrap, 0)):
        if value < least:
            raise InputError(f"{flag} {value} must be at least {least}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InputError(f"--max-tokens {args.max_tokens} must be positive")
    out = Path(os.path.expanduser(args.out)) if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise InputError(f"--out {args.out!r} is not a new or empty directory (a study there is kept): choose "
                         "another, or pass --overwrite to replace its study files")
    plan = _study_plan(args)
    corpus = plan["corpus"]
    world, device = accelerate_world(args.device)
    models = []
    for spec in plan["models"]:
        source, revision = (spec, None) if os.path.exists(os.path.expanduser(spec)) else parse_spec(spec)
        models.append(load_model(source, revision, device=device, dtype=args.dtype, name=spec))
    settings = Settings(metrics=plan["metrics"], nmae_target=plan["nmae_target"], explode_loss=args.explode_loss,
                        explode_norm=args.explode_norm, bootstrap=args.bootstrap, seed=args.seed, pairs=args.pairs)
    bar = None

    def progress(p) -> None:
        nonlocal bar
        if world.rank != 0:
            return
        if bar is None:
            from tqdm import tqdm

            desc = "study" if world.processes == 1 else f"study (rank 0 of {world.processes})"
            bar = tqdm(total=p.total, initial=p.resumed_from, desc=desc, unit="seq", file=sys.stderr)
        bar.update(p.done - bar.n)

    result = run_study(models, corpus, seq_len=plan["seq_len"], batch=args.batch, max_tokens=plan["max_tokens"],
                       bos=plan["bos"], settings=settings, world=world,
                       state_dir=Path(os.path.expanduser(args.state_dir)) if args.state_dir else None,
                       restart=args.restart, progress=progress, log=lambda m: print(m, file=sys.stderr))
    if bar is not None:
        bar.close()
    neurons = None
    if plan["neurons"] is not None and (result is None or result.complete):  # every process takes part
        neurons = _neuron_study(models, plan, world)
    if result is None:  # not rank 0
        return 0
    # A stopped study writes no files: the same command resumes it, into the same --out.
    doc = (write_outputs(result, out, positions=args.positions) if out is not None and result.complete
           else to_json(result, positions=args.positions))
    text = markdown(doc)
    if neurons is not None:
        from dataclasses import asdict

        from .study.neurons import neuron_markdown

        doc["neurons"] = json_safe(asdict(neurons))
        text += neuron_markdown(neurons)
        if out is not None:
            (out / "study.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1))
            (out / "study.md").write_text(text)
    print(json.dumps(doc, ensure_ascii=False) if args.json else text)
    if not result.complete:
        print(f"error: stopped after {result.n_sequences} sequences; what was done is saved: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    return 0


def _neuron_study(models, plan: dict, world):
    """The study's neuron ablations, over the study's own sequences (tokenised again, the same way, here)."""
    import tempfile
    from pathlib import Path

    from .corpus import prepare_chunks
    from .findings.neurons import parse_neurons
    from .study.engine import default_seq_len
    from .study.neurons import neuron_study

    chosen = parse_neurons(plan["neurons"])
    seq_len = plan["seq_len"] or default_seq_len(models)
    ref = models[0]
    with tempfile.TemporaryDirectory(prefix="noln-neurons-") as tmp:
        chunks = prepare_chunks(plan["corpus"], ref.tokenizer, Path(tmp), seq_len, bos=plan["bos"],
                                max_tokens=plan["max_tokens"], eot_id=ref.info.bos_token_id, d_vocab=ref.info.d_vocab)
        sequences = np.array(chunks.tokens(), dtype=np.int64)
    return neuron_study(models, sequences, chosen, world)


def _run_notebook(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .findings.patching import swapped_prompt
    from .notebook import View, notebook_json, view_script

    out = Path(os.path.expanduser(args.out))
    if out.is_dir():
        raise InputError(f"--out {args.out!r} is a directory: give a file name ending in .ipynb or .py")
    if out.exists() and not args.overwrite:
        raise InputError(f"--out {args.out!r} exists: choose another name, or pass --overwrite to replace it")
    if out.suffix not in (".ipynb", ".py"):
        raise InputError(f"--out {args.out!r} must end in .ipynb (a notebook) or .py (a script)")
    if not args.text:
        raise InputError("the text is empty: pass --text 'some words'")
    view = View(models=tuple(args.model or default_pair()), text=args.text, answer=args.answer,
                counterfactual=args.counterfactual, position=args.position, bos=not args.no_bos, page=args.page,
                device=args.device, dtype=args.dtype,
                options={"layer": args.layer, "neurons": args.neurons, "means_sequences": args.means_sequences,
                         "corrupted": args.corrupted if args.corrupted is not None else swapped_prompt(
                             args.text, args.answer or "", args.counterfactual or "")})
    try:
        content = notebook_json(view) if out.suffix == ".ipynb" else view_script(view)
    except ValueError as err:
        raise InputError(str(err)) from err
    if not out.parent.is_dir():
        raise InputError(f"no directory {str(out.parent)!r} to write {out.name} into")
    out.write_text(content)
    print(str(out))
    return 0


def _run_make_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .paths import DEMO_DIR
    from .training import demo

    try:
        demo.build(Path(args.out) if args.out else DEMO_DIR, seed=args.seed, steps=args.steps,
                   finetune_steps=args.finetune_steps, log=lambda m: print(m, file=sys.stderr))
    except RuntimeError as err:
        raise InputError(str(err)) from err
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    text = decode_utf8(sys.stdin.buffer.read(), "the text on stdin") if args.text == "-" else args.text
    if text == "" or text is None:
        raise InputError("the text is empty: pass --text 'some words' (or --text - to read stdin)")
    specs = args.model or list(default_pair())
    models = [_load(spec, args.device, args.dtype) for spec in specs]
    result = compare(models, text, args.answer, args.counterfactual, args.position, prepend_bos=not args.no_bos)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    doc = report(result, args.value_bias)
    if args.neurons is not None:
        for entry, neurons in zip(doc["models"], neurons_entries(models, result.token_ids, args.neurons,
                                                                  args.means_data, args.means_sequences)):
            entry["neurons"] = neurons
    print(json.dumps(doc, ensure_ascii=False) if args.json else _summary(doc))
    return 0


def _load(spec: str, device: str, dtype: str):
    """A model from a CLI spec: an existing local path, or a hub id / registry name with an optional @revision."""
    source, revision = (spec, None) if os.path.exists(os.path.expanduser(spec)) else parse_spec(spec)
    return load_model(source, revision, device=device, dtype=dtype, name=spec)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            for spec, m in REGISTRY.items():
                print(f"{spec:45s} {m.kind:10s} {m.description}")
            return 0
        if args.command == "remove-ln":
            return _run_remove_ln(args)
        if args.command == "notebook":
            return _run_notebook(args)
        if args.command == "make-demo":
            return _run_make_demo(args)
        if args.command == "study":
            return _run_study(args)
        if args.command == "patch":
            return run_patch(args, _load)
        if args.command == "benchmark":
            return run_benchmark_cli(args, _load)
        return _run_compare(args)
    except NolnError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if args.command == "remove-ln":
            print("error: interrupted; the finished steps are saved in OUT/_training: run the same command again to "
                  "resume", file=sys.stderr)
        else:
            print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory: use a smaller model, shorter text, or --dtype bfloat16", file=sys.stderr)
        return 1
    except Exception as err:  # the one-line promise holds for our own bugs too; NOLN_DEBUG=1 shows them whole
        if os.environ.get("NOLN_DEBUG"):
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"error: unexpected {type(err).__name__}: {first} (set NOLN_DEBUG=1 for details)", file=sys.stderr)
        return 1
