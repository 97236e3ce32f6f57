"""Remove LayerNorm from a GPT-2 checkpoint by fine-tuning, as the papers did; or fine-tune it with LN, as their control.

Method (Heimersheim 2024, arXiv:2409.13710; Baroni et al. 2025, arXiv:2507.02559,
code ``submarat/removing-layer-norm``, ``train.py`` and ``config.py``), point by point:

* **Fake LNs.**  Every LayerNorm keeps mean-centring and its affine weight and
  bias.  While live it normalises; once removed it divides by a σ measured on
  the data (:class:`.model.FakeLayerNorm`).  LNs go in the papers' order, one
  layer at a time: ``ln_2``, then ``ln_1`` on Q/K, then ``ln_1`` on V, then ``ln_f``.
* **Schedule.**  Each phase has its own gap (small/medium 2/2/3 steps, large/XL
  4/4/6) and each size its own start (:data:`.recipe.PRESETS`).
* **σ estimate.**  A moving average of the batch's mean per-token σ, updated on
  every micro-batch forward (``ln_1`` three times a forward, once per call as in
  the papers' code), position 0 and EOT included; a removed path divides by the
  value last copied while a path of that LN was live, so ``ln_1``'s keeps moving
  until its V path goes.  Forwards made for evaluation do not move it.
* **Special σ.**  Position 0 divides by its own σ (the average at position 0) in
  every removed LN until ``ln_f``'s removal + 12; EOT tokens divide by it on
  ``ln_1``'s V path only, until ``ln_f``'s removal + 2.  (The Apollo original used
  +20 and +120.)
* **Auxiliary loss.**  ``λ · mean over every position of (σ_pos − σ̂)²`` on the
  residual entering ``ln_f``, σ̂ the current batch's mean over positions other
  than 0 and EOT (:func:`.trainer.aux_loss`), for the whole run.
* **Optimiser.**  AdamW (β 0.9/0.999, as ``transformers``' Trainer), weight decay
  0.01 on matrices and embeddings, never on LN gains or biases; linear warm-up
  from 0, cosine decay to the papers' minimum learning rate; gradients clipped at 1.
* **Data.**  Documents joined with EOT, cut into consecutive ``seq_len`` chunks,
  shuffled; no BOS (:mod:`noln_core.corpus`).
* **Export.**  LN weight ``× 1e6 / σ``, bias kept, ``layer_norm_epsilon = 1e12``:
  the published checkpoints' format, so :func:`noln_core.load_model` and
  ``transformers`` treat the result exactly like ``apollo-research/gpt2_noLN``.

Where this differs from the papers' code, on purpose:

* the first σ comes from the first batch (the papers start from a table of σ
  measured beforehand, ``std_dicts.py``);
* position 0's σ ends in every LN (the papers' code ends it in ``ln_1`` only, and
  a checkpoint holds one σ per LN);
* σ and the auxiliary loss's σ̂ are reduced over all processes (the papers ran
  one GPU), so the number of processes does not change the result;
* evaluation forwards leave σ alone (the papers' also update it).
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from ..corpus import Corpus
from .model import TrainableGPT2
from .recipe import Recipe
from .trainer import FinetuneResult, run


def finetune(base: Path, corpus: Corpus, out: Path, recipe: Recipe, *, control: bool = False, base_name: str | None = None,
             **kwargs) -> FinetuneResult:
    """Run :func:`.trainer.run`, then (rank 0) write the checkpoint, ``removal.json`` and the model card to ``out``."""
    from accelerate import PartialState

    result = run(Path(base), corpus, Path(out), recipe, control=control, **kwargs)
    state, result.state_dict = result.state_dict, None
    if result.is_main:
        export(Path(base), state, result, base_name or str(base), corpus)
    PartialState().wait_for_everyone()
    return result


def export(base: Path, state: dict, result: FinetuneResult, base_name: str, corpus: Corpus) -> Path:
    """Write the trained model in the Hugging Face GPT-2 layout (float32), with its recipe and card."""
    model = TrainableGPT2.from_pretrained(base)
    model.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    if not result.control:
        left = [f"{name}.{p}" for name, ln in model.layer_norms() for p in ln.paths if not ln.is_fake(p)]
        if left:
            raise RuntimeError(f"the run ended before every LayerNorm was removed ({', '.join(left)} still live)")
    out = result.out
    model.save_pretrained(out, ln_free=not result.control, tokenizer_from=base)
    info = {
        "kind": "ln_control" if result.control else "ln_free",
        "base": base_name,
        "data": corpus.describe(),
        "recipe": result.recipe.to_dict(),
        "schedule": asdict(result.schedule) if result.schedule else None,
        "sigma": {name: {"sigma": float(ln.sigma), "sigma_bos": float(ln.sigma_bos)} for name, ln in model.layer_norms()}
        if not result.control else None,
        "processes": result.processes, "distributed": result.distributed, "steps": result.steps, "tokens": result.tokens,
        "train_sequences": result.train_sequences, "eval_sequences": result.eval_sequences,
        "final_train_loss": result.final_loss, "eval_loss": result.eval_loss,
        "base_eval_loss": result.initial_eval_loss, "seconds": round(result.seconds, 1),
        "command": shlex.join(["python", "-m", "noln_core", *sys.argv[1:]]) if sys.argv[1:2] == ["remove-ln"] else None,
    }
    (out / "removal.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(card(info))
    return out


def card(info: dict) -> str:
    """The model card saved with a result: what was done, with which recipe, and what it measured."""
    r = info["recipe"]
    free = info["kind"] == "ln_free"
    title = "LN-free fine-tune" if free else "Fine-tuned with LayerNorm (the control)"
    preset = f"the papers' **{r['preset']}** preset" if r.get("preset") else "no preset (explicit settings)"
    lines = [
        f"# {title} of {info['base']}", "",
        ("Every LayerNorm of this GPT-2 was removed by fine-tuning with the schedule of Heimersheim (2024) and "
         "Baroni et al. (2025). The checkpoint uses the published LN-free format: each LN weight is multiplied by "
         "1e6/σ and `layer_norm_epsilon` is 1e12, so the LNs divide by a constant and the model is linear from the "
         "residual stream to the logits. Load it with `transformers` or noLN Explorer like "
         "`apollo-research/gpt2_noLN`." if free else
         "This is the papers' \"vanilla\" control: the same base, data, steps, batch and learning rate as the LN-free "
         "fine-tune, with every LayerNorm kept. It separates the effect of removing LN from the effect of training "
         "longer."), "",
        "## Recipe", "",
        f"* Recipe: {preset}.",
        f"* Data: {info['data']}; {info['train_sequences']:,} training sequences of {r['seq_len']} tokens, "
        f"{info['eval_sequences']:,} held out; no BOS.",
        f"* {info['steps']} steps × {r['batch']} sequences ({r['grad_accum']} micro-batch(es) a step) = "
        f"{info['tokens']:,} tokens, on {info['processes']} process(es).",
        f"* AdamW, learning rate {r['lr']:g} → {r['min_lr']:g} (cosine over {r['decay_steps'] or r['steps']} steps, "
        f"{r['warmup']} warm-up), weight decay {r['weight_decay']:g} (not on LN or biases), gradients clipped at "
        f"{r['max_grad_norm']:g}, seed {r['seed']}.",
    ]
    if free:
        s = info["schedule"]
        lines += [
            f"* Schedule: ln_2 from step {s['start_ln2']} every {s['gap_ln2']}, ln_1 Q/K from {s['start_qk']} every "
            f"{s['gap_qk']}, ln_1 V from {s['start_v']} every {s['gap_v']}, ln_f at {s['start_lnf']}; EOT's own σ "
            f"ends at {s['end_eot']}, position 0's at {s['end_bos']}.",
            f"* Auxiliary loss weight λ = {r['aux_lambda']:g}; σ moving-average momentum {r['momentum']:.4g}.",
        ]
    elif r["aux_lambda"]:
        lines.append(f"* Auxiliary loss weight λ = {r['aux_lambda']:g}.")
    if info.get("command"):
        lines.append(f"* Command: `{info['command']}`.")
    lines += ["", "## Held-out loss (nats per token)", "", "| model | loss |", "|---|---|",
              f"| {info['base']} (before) | {_num(info['base_eval_loss'])} |",
              f"| this model | {_num(info['eval_loss'])} |", "",
              "The full recipe, the frozen σ of every LN and the losses are in `removal.json`; the per-step log is in "
              "`_training/loss_log.jsonl` where the run was made."]
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "—" if x is None else f"{x:.4f}"
