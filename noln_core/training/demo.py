"""The embedded offline demo pair: a small GPT-2 trained on the King James Bible, and its LN-free fine-tune.

``python -m noln_core make-demo`` rebuilds both from scratch, seeded:

1. the text of the King James Version (public domain) from Debian's
   ``bible-kjv`` / ``bible-kjv-text`` packages (``apt-get install bible-kjv``),
   one verse a line, chapter headings kept; every 20th chapter is held out;
2. GPT-2's own tokenizer (shipped as ``noln_core/data/gpt2-tokenizer``);
3. a 6-layer, d=96 GPT-2 trained from scratch with every LayerNorm live.  Only
   the ~10k tokens the Bible uses get trained embedding rows; the others are
   zero, which gives them a logit of exactly 0, so the loss is the exact
   full-vocabulary loss at a fifth of the cost (see ``TrainableGPT2``);
4. its LN-free fine-tune with :func:`noln_core.training.removal.remove_layernorm`;
5. each model's card (``README.md``) with both held-out losses, measured on the
   shipped files through :func:`noln_core.load_model`, and sample text.

The shipped copies live in ``noln_core/data/demo/``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..loading import load_model
from ..paths import DEMO_DIR
from ..tokenizer import gpt2_tokenizer, tokenize
from .removal import Schedule, TrainableGPT2, TrainConfig, remove_layernorm, train

BASE_NAME, NOLN_NAME = "gpt2-kjv", "gpt2-kjv-noLN"
DEMO_CONFIG = dict(vocab_size=50257, n_positions=256, n_embd=96, n_layer=6, n_head=4, layer_norm_epsilon=1e-5,
                   eos_token_id=50256, bos_token_id=50256)
HOLDOUT_EVERY = 20


def demo_paths(root: Path = DEMO_DIR) -> tuple[Path, Path]:
    return root / BASE_NAME, root / NOLN_NAME


def kjv_chapters() -> list[tuple[str, list[str]]]:
    """``(heading, verses)`` for all 1,189 chapters, read with Debian's ``bible`` program."""
    try:
        raw = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError("the King James text comes from Debian's bible-kjv: apt-get install bible-kjv") from err
    chapters: list[tuple[str, list[str]]] = []
    verse = None
    for line in raw.splitlines():
        if not line.strip():
            continue
        numbered = re.match(r"^\s+(\d+) (.*)$", line)
        if numbered:
            if verse is not None:
                chapters[-1][1].append(verse)
            verse = numbered.group(2).strip()
        elif not line.startswith(" ") and re.match(r"^\S.* \d+$", line):
            if verse is not None:
                chapters[-1][1].append(verse)
                verse = None
            chapters.append((line.strip(), []))
        elif verse is not None:
            verse += " " + line.strip()
    if verse is not None:
        chapters[-1][1].append(verse)
    return chapters


def corpus_text(chapters, held_out: bool) -> str:
    chosen = [c for i, c in enumerate(chapters) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == held_out]
    return "\n".join(f"{heading}\n" + "\n".join(verses) for heading, verses in chosen) + "\n"


def tokenize_file(path: Path, tokenizer) -> np.ndarray:
    return np.array(tokenizer.encode(Path(path).read_text(), add_special_tokens=False).ids, dtype=np.int64)


def heldout_loss(directory: Path, tokens: np.ndarray, block: int = 128, max_windows: int = 400) -> float:
    """Mean next-token loss of the shipped checkpoint (through ``load_model``) on held-out windows, BOS first."""
    model = load_model(str(directory), device="cpu")
    bos = model.info.bos_token_id
    starts = range(0, min(len(tokens) - block, max_windows * (block - 1)), block - 1)
    rows = torch.tensor(np.stack([np.concatenate([[bos], tokens[s:s + block - 1]]) for s in starts]))
    losses = []
    for chunk in rows.split(32):
        logits = model.forward(chunk)
        lp = logits[:, :-1].log_softmax(-1)
        losses.append(-lp.gather(-1, chunk[:, 1:, None])[..., 0].mean(-1))
    return float(torch.cat(losses).mean())


def sample(directory: Path, prompt: str, n: int = 40, seed: int = 0, temperature: float = 0.8) -> str:
    """Text sampled from the shipped checkpoint (temperature ``temperature``, seeded)."""
    model = load_model(str(directory), device="cpu")
    ids = tokenize(model, prompt)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits = model.forward(torch.tensor([ids[-model.info.n_ctx:]]))[0, -1] / temperature
        ids.append(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
    return model.tokenizer.decode(ids[1:])


def _card(name: str, kind: str, metrics: dict, samples: dict[str, str], schedule: dict | None) -> str:
    lines = [
        f"# {name}", "",
        f"{kind} A demo model of noLN Explorer, small enough to ship in the repository and run offline.", "",
        "## Data", "",
        "The King James Version of the Bible (1611/1769), in the **public domain**, as packaged by Debian "
        "(`bible-kjv-text`), one verse a line with chapter headings. Every "
        f"{HOLDOUT_EVERY}th chapter ({metrics['heldout_chapters']} chapters, {metrics['heldout_tokens']:,} tokens) is held "
        f"out; training uses the other {metrics['train_tokens']:,} tokens.", "",
        "## Model", "",
        f"GPT-2 architecture (`GPT2LMHeadModel`), {DEMO_CONFIG['n_layer']} layers, d_model {DEMO_CONFIG['n_embd']}, "
        f"{DEMO_CONFIG['n_head']} heads, context {DEMO_CONFIG['n_positions']}, GPT-2's own tokenizer (50,257 tokens; "
        f"the {metrics['kept_tokens']:,} tokens the corpus uses have trained embeddings, the others are zero). "
        "Large matrices are stored in float16.", "",
        "## Training", "",
        f"* From scratch: {metrics['base_steps']} steps of {metrics['batch']} × {metrics['block']} tokens, AdamW, lr "
        f"{metrics['base_lr']}, cosine decay, seed {metrics['seed']}.",
        f"* LayerNorm removal: {metrics['removal_steps']} further steps with the papers' schedule (fake LNs with frozen "
        "standard deviations, removed ln_2 → ln_1 Q/K → ln_1 V → ln_f, position 0 and EOT on their own σ until late, "
        "an auxiliary loss on the final σ) — see `noln_core/training/removal.py`.",
    ]
    if schedule:
        lines.append(f"* Schedule: `{json.dumps(schedule)}`.")
    lines += [
        f"* Built with `python -m noln_core make-demo --seed {metrics['seed']}` in {metrics['build_minutes']:.0f} "
        "minutes on 2 CPU cores.", "",
        "## Held-out loss (nats per token, measured on the shipped files)", "",
        "| model | held-out loss |", "|---|---|",
        f"| {BASE_NAME} (with LayerNorm) | {metrics['base_loss']:.4f} |",
        f"| {NOLN_NAME} (LN-free) | {metrics['noln_loss']:.4f} |",
        f"| gap (LN-free − with LN) | {metrics['noln_loss'] - metrics['base_loss']:+.4f} |", "",
        f"The LN-free model trained {metrics['removal_steps']} steps more than the base model (the removal fine-tune), "
        "which is why it can come out ahead; the papers separate that effect with a control fine-tuned with LN for the "
        "same steps.", "",
        "## Samples (temperature 0.8, seed 0)", "",
    ]
    for prompt, text in samples.items():
        lines += [f"**{prompt}** → {text!r}", ""]
    lines += ["## Licence", "", "The weights are released under the MIT licence, like noLN Explorer; the training text is "
              "in the public domain."]
    return "\n".join(lines) + "\n"


def build(out: Path = DEMO_DIR, seed: int = 0, steps: int = 1500, removal_steps: int = 600, batch: int = 16,
          block: int = 128, work: Path | None = None, progress=None, log=print) -> dict:
    """Rebuild the demo pair into ``out`` (see the module docstring); returns the measured metrics."""
    started = time.time()
    out = Path(out)
    work = Path(work) if work else out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    chapters = kjv_chapters()
    (work / "train.txt").write_text(corpus_text(chapters, held_out=False))
    (work / "heldout.txt").write_text(corpus_text(chapters, held_out=True))
    tok = gpt2_tokenizer()
    train_tokens, heldout_tokens = tokenize_file(work / "train.txt", tok), tokenize_file(work / "heldout.txt", tok)
    log(f"corpus: {len(train_tokens):,} training tokens, {len(heldout_tokens):,} held out")

    base_dir, noln_dir = demo_paths(out)
    keep = torch.unique(torch.cat([torch.from_numpy(train_tokens), torch.tensor([DEMO_CONFIG["eos_token_id"]])]))
    model = TrainableGPT2(DEMO_CONFIG, keep=keep)
    model.init_weights(seed)
    cfg = TrainConfig(steps=steps, batch=batch, block=block, lr=2e-3, warmup=50, seed=seed, checkpoint_every=100)
    train(model, train_tokens, cfg, work / "base", progress=progress(steps, "train from scratch") if progress else None)
    model.save_pretrained(base_dir, ln_free=False)  # no tokenizer files: load_model uses the bundled GPT-2 one
    log(f"base model written to {base_dir}")

    removal_cfg = TrainConfig(steps=removal_steps, batch=batch, block=block, lr=6e-4, warmup=10, seed=seed + 1,
                              checkpoint_every=100)
    schedule = Schedule.for_model(DEMO_CONFIG["n_layer"], removal_steps)
    remove_layernorm(base_dir, train_tokens, work / "noln", schedule=schedule, cfg=removal_cfg,
                     progress=progress(removal_steps, "remove LayerNorm") if progress else None)
    if noln_dir.exists():
        shutil.rmtree(noln_dir)
    noln_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "removal_schedule.json"):
        shutil.copy(work / "noln" / name, noln_dir / name)
    shutil.copy(work / "heldout.txt", out / "heldout.txt")  # public domain; lets the tests re-measure the cards
    log(f"LN-free model written to {noln_dir}")

    metrics = {
        "seed": seed, "base_steps": steps, "removal_steps": removal_steps, "batch": batch, "block": block,
        "base_lr": cfg.lr, "train_tokens": int(len(train_tokens)), "heldout_tokens": int(len(heldout_tokens)),
        "heldout_chapters": sum(1 for i in range(len(chapters)) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1),
        "kept_tokens": int(len(keep)),
        "base_loss": heldout_loss(base_dir, heldout_tokens, block), "noln_loss": heldout_loss(noln_dir, heldout_tokens, block),
        "build_minutes": (time.time() - started) / 60,
    }
    prompts = ["In the beginning", "And Jesus said unto them,", "Abraham begat Isaac; and Isaac begat"]
    for directory, name, kind, sched in ((base_dir, BASE_NAME, "A GPT-2 with LayerNorm.", None),
                                         (noln_dir, NOLN_NAME, f"The LN-free fine-tune of {BASE_NAME}.", asdict(schedule))):
        samples = {p: sample(directory, p, seed=0) for p in prompts}
        (directory / "README.md").write_text(_card(name, kind, metrics, samples, sched))
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(json.dumps(metrics, indent=2))
    return metrics
