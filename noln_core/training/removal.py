"""Remove LayerNorm from a GPT-2 checkpoint by fine-tuning, as the papers did; or fine-tune it with LN, as their control.

Method (Heimersheim 2024, arXiv:2409.13710; Baroni et al. 2025, arXiv:2507.02559), point by point as the
released code does it by default (``submarat/removing-layer-norm`` at 583a9e6: ``train.py``, ``config.py``,
run as its README says, ``python train.py --mode without_ln --config NAME``, with no ``EXP_*`` flags):

* **Fake LNs.**  Every LayerNorm keeps mean-centring and its affine weight and
  bias.  While live it normalises; once removed it divides by a σ measured on
  the data (:class:`.model.FakeLayerNorm`).  LNs go in the papers' order, one
  layer at a time: ``ln_2``, then ``ln_1`` on Q/K, then ``ln_1`` on V, then ``ln_f``
  (``train.py`` lines 808-812).
* **Schedule.**  Each phase has its own gap (small/medium 2/2/3 steps, large/XL
  4/4/6) and each size its own start (:data:`.recipe.PRESETS`, from ``config.py``).
* **σ estimate.**  A moving average of the batch's mean per-token σ (``train.py``
  lines 357-362: every position, position 0 and EOT included), advanced on every
  call (``ln_1`` three times a forward: Q/K, V, and V again for EOT tokens, lines
  494-501); a removed path divides by the value last copied while a path of that
  LN was live, so ``ln_1``'s keeps moving until its V path goes.
* **No special σ.**  ``FakeLayerNorm``'s ``bos_special_treatment`` defaults to False
  and no caller sets it (lines 189, 401-437): EOT tokens' extra V call divides by
  the same σ, and no position has a σ of its own.  (The Apollo fork,
  ``ApolloResearch/gpt2_noLN`` ``model.py`` lines 29-31 and 137-146, gave EOT tokens
  position 0's σ on the V path until ``ln_f`` + 20; its "position 0" σ was set on
  feature 0 of a per-feature vector, not on position 0.)
* **Auxiliary loss.**  ``λ · mean over every position of (σ_pos − σ̂)²`` on the
  residual entering ``ln_f``, σ̂ the current batch's mean over positions other
  than 0 and EOT (``train.py`` lines 82-184; :func:`.trainer.aux_loss`), for the
  whole run.
* **Loss.**  Positions whose target is EOT are left out: the collator's padding
  token is EOS (``prepare_dataset.py`` line 55, ``DataCollatorForLanguageModeling``),
  so their labels are -100.  The mean is over the counted targets of the whole
  micro-batch.
* **Optimiser.**  AdamW (β 0.9/0.999, ``transformers``' Trainer), weight decay 0.01
  (``config.py`` line 23) on matrices, embeddings *and the fake LNs' gains*: the
  Trainer exempts biases and ``nn.LayerNorm`` parameters only, and ``FakeLayerNorm``
  is not an ``nn.LayerNorm``.  Linear warm-up from 0, ``cosine_with_min_lr`` to the
  papers' minimum; gradients clipped at 1 (line 959).
* **Precision.**  bfloat16 weights and bf16 autocast where the device has them
  (lines 573-581 ``torch_dtype=torch.bfloat16``; line 948 ``bf16=True``);
  float32 elsewhere.
* **Data.**  Documents joined with EOT, cut into consecutive ``seq_len`` chunks,
  shuffled; no BOS (:mod:`noln_core.corpus`).
* **Export.**  LN weight ``× 1e6 / σ``, bias kept, ``layer_norm_epsilon = 1e12``:
  the published checkpoints' format, so :func:`noln_core.load_model` and
  ``transformers`` treat the result exactly like ``apollo-research/gpt2_noLN``.

This project's own choices, each a named option recorded in ``removal.json`` and the card:

* ``--special-sigma``: position 0 divides by its own σ (the average at position 0) in every removed LN
  until ``ln_f`` + 12, and EOT tokens by it on ``ln_1``'s V path until ``ln_f`` + 2 (the Apollo fork's EOT
  treatment, and what its position-0 σ and ``train.py``'s ``EXP_CORRECT_BOS`` meant to do);
* ``--no-ln-decay``: no weight decay on the LN gains (Heimersheim 2024's nanoGPT fork decays only matrices);
* ``--eot-loss``: positions whose target is EOT count in the loss;
* ``--precision bf16-mixed`` (bf16 autocast over float32 master weights) or ``fp32``.

Where this differs from the released code in every run:

* the first σ comes from the first batch (the released code starts from a table measured beforehand,
  ``std_dicts.py``, and without ``EXP_RECOMPUTE_STD_ON_REAL=1``, which ``train_lora.py`` sets by default
  (line 424), keeps dividing by that table: the paper describes the re-estimated σ that is implemented here);
* σ and the auxiliary loss's σ̂ are reduced over all processes (the papers ran one GPU), so the number of
  processes does not change the result;
* evaluation forwards leave σ alone (the papers' also update it);
* micro-batch losses are averaged over the accumulation steps (``transformers`` ≥ 4.46 with the released
  ``compute_loss`` override sums them instead, which AdamW and clipping at 1 mostly absorb).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from ..corpus import Corpus
from ..errors import InputError
from .model import TrainableGPT2
from .recipe import Recipe
from .trainer import FinetuneResult, run


def check_out(base: Path, out: Path, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that would overwrite what the user had: the base model's own directory, always; an
    existing non-empty directory, unless it holds a run of this tool (``_training``) or ``overwrite`` says so."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file, not a directory")
    if out.resolve() == Path(base).resolve():
        raise InputError("--out is the base model's own directory: choose another, the base stays as it is")
    if out.is_dir() and any(out.iterdir()) and not (out / "_training" / "run.json").is_file() and not overwrite:
        raise InputError(f"--out {str(out)!r} already holds files that are not a run of this tool: choose an empty "
                         "or new directory, or pass --overwrite to replace what a run writes there")


def finetune(base: Path, corpus: Corpus, out: Path, recipe: Recipe, *, control: bool = False, base_name: str | None = None,
             overwrite: bool = False, **kwargs) -> FinetuneResult:
    """Run :func:`.trainer.run`, then (rank 0) write the checkpoint, ``removal.json`` and the model card to ``out``.

    ``out`` is checked first (:func:`check_out`); the files are written beside it and moved in at the end, so an
    interrupted export leaves no half-written model where the user looks for one.
    """
    from accelerate import PartialState

    check_out(Path(base), Path(out), overwrite)
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
    staging = out / "_training" / "export"  # written here whole, then moved into out
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, ln_free=not result.control, tokenizer_from=base)
    choices = choices_of(result.recipe, result.control, result.distributed.get("precision", "fp32"))
    released = released_code(result.control)
    requested = result.distributed.get("precision_requested", "auto")
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
        "choices": choices, "released_code": released,
        "differs_from_released_code": [CHOICES[k] for k, v in choices.items() if v != released[k]
                                       and not (k == "precision" and requested == "auto")],
        "command": shlex.join(["python", "-m", "noln_core", *sys.argv[1:]]) if sys.argv[1:2] == ["remove-ln"] else None,
    }
    (staging / "removal.json").write_text(json.dumps(info, indent=2) + "\n")
    (staging / "README.md").write_text(card(info))
    for path in staging.iterdir():
        os.replace(path, out / path.name)
    staging.rmdir()
    return out


def released_code(control: bool) -> dict:
    """The released code's choices for a run (its with-LN control keeps ``nn.LayerNorm``s, whose gains the Trainer
    does not decay); ``precision`` is bf16 where the device has it (``auto`` picks it there, fp32 elsewhere)."""
    return {"special_sigma": False, "ln_gain_decay": not control, "eot_targets_masked": True, "precision": "bf16"}



CHOICES = {
    "special_sigma": "position 0 and EOT had a σ of their own (--special-sigma; the released code has none)",
    "ln_gain_decay": "LN gains decay as --ln-decay/--no-ln-decay chose (the released code decays them when removing "
                     "LN, not in the control)",
    "eot_targets_masked": "positions whose target is EOT counted in the loss (--eot-loss; the released code masks them)",
    "precision": "a precision other than the released code's bf16 asked for (--precision)",
}


def choices_of(recipe: Recipe, control: bool, precision: str) -> dict:
    """The run's choices on the points where the released code has a default (``RELEASED_CODE``)."""
    return {"special_sigma": recipe.special_sigma and not control, "ln_gain_decay": recipe.decays_ln_gains(control),
            "eot_targets_masked": not recipe.eot_loss, "precision": precision}


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
    choices = info.get("choices")
    if choices:
        lines.append(f"* Choices: special σ {'on' if choices['special_sigma'] else 'off'}, LN gains "
                     f"{'decayed' if choices['ln_gain_decay'] else 'not decayed'}, EOT targets "
                     f"{'masked' if choices['eot_targets_masked'] else 'counted'} in the loss, {choices['precision']}; "
                     + ("as the released code (submarat/removing-layer-norm) does."
                        if not info["differs_from_released_code"] else
                        "unlike the released code: " + "; ".join(info["differs_from_released_code"]) + "."))
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
