"""The embedded offline demo trio: a small GPT-2 trained on the King James Bible, its fine-tune *with* LayerNorm
(the control) and its LN-free fine-tune.

``python -m noln_core make-demo`` rebuilds all three from scratch, seeded:

1. the text of the King James Version (public domain) from Debian's
   ``bible-kjv`` / ``bible-kjv-text`` packages (``apt-get install bible-kjv``),
   one document per chapter (its heading, then one verse a line); every 20th
   chapter is held out;
2. GPT-2's own tokenizer (shipped as ``noln_core/data/gpt2-tokenizer``), the
   papers' data convention (documents joined with EOT, consecutive chunks of
   the full 256-token context, shuffled, no BOS);
3. a 6-layer, d=56 GPT-2 trained from scratch with every LayerNorm live.  Only
   the ~10k tokens the Bible uses get trained embedding rows; the others are
   zero, which gives them a logit of exactly 0, so the loss is the exact
   full-vocabulary loss at a fifth of the cost (see ``TrainableGPT2``);
4. from it, two fine-tunes of the same steps, batch, data order and learning
   rate (:func:`noln_core.training.removal.finetune`): one removing every
   LayerNorm with the papers' method, one keeping them (the control);
5. each model's card (``README.md``) with the papers' three-column table,
   measured on the shipped files through :func:`noln_core.load_model`, and samples.

All three are float32 and together stay under 40 MB (:data:`MAX_DEMO_BYTES`).
The shipped copies live in ``noln_core/data/demo/``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..corpus import Corpus, documents, prepare_chunks
from ..loading import load_model
from ..paths import DEMO_DIR
from ..tokenizer import gpt2_tokenizer, tokenize
from .model import TrainableGPT2
from .recipe import recipe
from .removal import finetune

BASE_NAME, NOLN_NAME, CONTROL_NAME = "gpt2-kjv", "gpt2-kjv-noLN", "gpt2-kjv-ft"
NAMES = (BASE_NAME, CONTROL_NAME, NOLN_NAME)
"""The papers' column order: original, fine-tuned with LN, LN-free."""
DEMO_CONFIG = dict(vocab_size=50257, n_positions=256, n_embd=56, n_layer=6, n_head=4, layer_norm_epsilon=1e-5,
                   eos_token_id=50256, bos_token_id=50256)
HOLDOUT_EVERY = 20
HELDOUT_FILE = "heldout.jsonl"
MAX_DEMO_BYTES = 40_000_000
"""The three shipped checkpoints together (float32) stay under this."""
COLUMNS = {
    BASE_NAME: "original (with LN)",
    CONTROL_NAME: "fine-tuned with LN",
    NOLN_NAME: "LN-free",
}


def demo_paths(root: Path = DEMO_DIR) -> tuple[Path, Path, Path]:
    """``(original, control, LN-free)`` directories."""
    return root / BASE_NAME, root / CONTROL_NAME, root / NOLN_NAME


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


def write_documents(chapters, held_out: bool, path: Path) -> int:
    """One JSON line per chapter (``{"text": heading + verses}``); returns the number of chapters."""
    chosen = [c for i, c in enumerate(chapters) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == held_out]
    with open(path, "w") as f:
        for heading, verses in chosen:
            f.write(json.dumps({"text": f"{heading}\n" + "\n".join(verses) + "\n"}) + "\n")
    return len(chosen)


def heldout_loss(directory: Path, chunks: np.ndarray, bos: bool = False, batch: int = 16) -> float:
    """Mean next-token loss of a shipped checkpoint (through ``load_model``) over held-out chunks.

    ``bos=False`` is the papers' convention (the chunk as it is); ``bos=True``
    puts EOT first and drops the chunk's last token, as the app's "prepend BOS"
    does, scoring the same tokens.
    """
    return float(token_losses(directory, chunks, bos, batch).mean())


def token_losses(directory: Path, chunks: np.ndarray, bos: bool = False, batch: int = 16) -> np.ndarray:
    """``(n_chunks, seq_len - 1)`` per-token losses (float64), exact over the full vocabulary, computed fast.

    The ~40k tokens the corpus never used have a zero unembedding row and a
    zero bias, so their logit is exactly 0 and they enter the softmax together
    as ``log(n_zero)`` (the tests check this against the study engine's full
    softmax).
    """
    model = load_model(str(directory), device="cpu")
    w = model.weights
    live = ((w.W_U_rows != 0).any(-1) | (w.b_U != 0)).nonzero()[:, 0]
    n_zero = model.info.d_vocab - len(live)
    column = torch.full((model.info.d_vocab,), -1, dtype=torch.long)
    column[live] = torch.arange(len(live))
    final = f"blocks.{model.info.n_layers - 1}.hook_resid_post"
    rows = torch.from_numpy(np.asarray(chunks, dtype=np.int64))
    if bos:
        rows = torch.cat([torch.full((len(rows), 1), model.info.bos_token_id), rows[:, :-1]], 1)
    out = []
    for part in rows.split(batch):
        seen = {}
        model.forward(part, observer=seen.__setitem__, wants=final.__eq__, return_logits=False)
        logits = model.unembed(seen[final][:, :-1], vocab=live)
        lse = torch.logsumexp(logits, -1)
        if n_zero:
            lse = torch.logaddexp(lse, torch.tensor(float(np.log(n_zero))))
        target = column[part[:, 1:]]
        nll = lse - logits.gather(-1, target.clamp_min(0)[..., None])[..., 0] * (target >= 0)
        out.append((nll[:, 1:] if bos else nll).double().numpy())  # with BOS, EOT's own prediction is not scored
    return np.concatenate(out)


def heldout_chunks(root: Path = DEMO_DIR, seq_len: int = 256, work: Path | None = None) -> np.ndarray:
    """The shipped held-out chapters in the papers' convention: EOT-joined, consecutive ``seq_len`` chunks."""
    import tempfile

    corpus = Corpus("jsonl", str(root / HELDOUT_FILE), field="text")
    with tempfile.TemporaryDirectory() as tmp:
        chunks = prepare_chunks(corpus, gpt2_tokenizer(), Path(work or tmp) / "heldout", seq_len)
        return np.array(chunks.tokens())


def sample(directory: Path, prompt: str, n: int = 40, seed: int = 0, temperature: float = 0.8) -> str:
    """Text sampled from the shipped checkpoint (temperature ``temperature``, seeded)."""
    model = load_model(str(directory), device="cpu")
    ids = tokenize(model, prompt)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits = model.forward(torch.tensor([ids[-model.info.n_ctx:]]))[0, -1] / temperature
        ids.append(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
    return model.tokenizer.decode(ids[1:])


def table(metrics: dict) -> list[str]:
    """The papers' three-column table for the demo (Markdown lines)."""
    losses = metrics["losses"]
    cells = lambda key: " | ".join(f"{losses[name][key]:.4f}" for name in NAMES)  # noqa: E731
    gap = lambda key: losses[NOLN_NAME][key] - losses[CONTROL_NAME][key]  # noqa: E731
    return [
        "| held-out chapters, nats per token | original | fine-tuned with LN | LN-free | LN-free − fine-tuned |",
        "|---|---|---|---|---|",
        f"| no BOS (the papers' convention) | {cells('no_bos')} | {gap('no_bos'):+.4f} |",
        f"| BOS first (the app's default) | {cells('bos')} | {gap('bos'):+.4f} |",
    ]


def explain(metrics: dict, key: str = "no_bos") -> list[str]:
    """What each gap of the table means, with this build's numbers and signs (Markdown bullets)."""
    losses = metrics["losses"]
    base, control, free = (losses[name][key] for name in NAMES)
    cost = free - control
    lines = [
        f"* **original → fine-tuned with LN** ({control - base:+.4f}) is what the extra training steps alone do: the "
        "fine-tunes see the training chapters again, so the loss falls;",
        f"* **fine-tuned with LN → LN-free** ({cost:+.4f}) is the cost of removing LayerNorm, the gap the papers "
        "report (+0.025 to +0.067 nats on OpenWebText for GPT-2 small to XL)"
        + (";" if cost > 0 else ". In this small demo model removing LN costs nothing measurable: the LN-free "
                                 "fine-tune even ends slightly ahead of the control, unlike GPT-2, so do not read "
                                 "the demo as evidence about LN's cost;"),
        f"* **original → LN-free** ({free - base:+.4f}) mixes the two, which is why an LN-free model can beat its "
        "original without the control beside it.",
    ]
    return lines


def shipped_metrics(root: Path = DEMO_DIR) -> dict | None:
    """The metrics the shipped trio was built with (``metrics.json``), or None if the demo is not there."""
    path = root / NOLN_NAME / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _card(name: str, metrics: dict, samples: dict[str, str]) -> str:
    kind = {BASE_NAME: "A GPT-2 with LayerNorm, trained from scratch.",
            CONTROL_NAME: f"{BASE_NAME} fine-tuned *with* LayerNorm: the control of {NOLN_NAME} (same data, steps, "
                          "batch, data order and learning rate).",
            NOLN_NAME: f"The LN-free fine-tune of {BASE_NAME}."}[name]
    r = metrics["finetune_recipe"]
    lines = [
        f"# {name}", "",
        f"{kind} A demo model of noLN Explorer, small enough to ship in the repository and run offline.", "",
        "## Data", "",
        "The King James Version of the Bible (1611/1769), in the **public domain**, as packaged by Debian "
        "(`bible-kjv-text`): one document per chapter (its heading, then one verse a line), documents joined with "
        f"`<|endoftext|>` and cut into chunks of {DEMO_CONFIG['n_positions']} tokens, no BOS, as the papers do. Every "
        f"{HOLDOUT_EVERY}th chapter ({metrics['heldout_chapters']} chapters, {metrics['heldout_tokens']:,} tokens) is "
        f"held out (`noln_core/data/demo/{HELDOUT_FILE}`); training uses the other {metrics['train_tokens']:,} tokens.",
        "",
        "## Model", "",
        f"GPT-2 architecture (`GPT2LMHeadModel`), {DEMO_CONFIG['n_layer']} layers, d_model {DEMO_CONFIG['n_embd']}, "
        f"{DEMO_CONFIG['n_head']} heads, context {DEMO_CONFIG['n_positions']} (trained on full "
        f"{DEMO_CONFIG['n_positions']}-token windows), GPT-2's own tokenizer (50,257 tokens; the "
        f"{metrics['kept_tokens']:,} tokens the corpus uses have trained embeddings, the others are zero). float32.", "",
        "## Training", "",
        f"* From scratch: {metrics['base_steps']} steps of {metrics['batch']} × {DEMO_CONFIG['n_positions']} tokens, "
        f"AdamW, lr {metrics['base_lr']}, cosine decay, seed {metrics['seed']}.",
        f"* Then two fine-tunes of {r['steps']} steps × {r['batch']} sequences, lr {r['lr']:g} → {r['min_lr']:g}, "
        "the same data order: the LN-free one with the papers' removal method (fake LNs with frozen σ, removed "
        "ln_2 → ln_1 Q/K → ln_1 V → ln_f, EOT's and position 0's own σ until shortly after, the auxiliary loss on "
        "the final σ; `noln_core/training/removal.py`), the control with every LN kept.",
        f"* Removal schedule: {metrics['schedule']}.",
        f"* Built with `python -m noln_core make-demo --seed {metrics['seed']}` in {metrics['build_minutes']:.0f} "
        "minutes on 2 CPU cores.", "",
        "## Held-out loss: the papers' three columns", "",
        *table(metrics), "",
        "Measured on the shipped files through `noln_core.load_model`, over "
        f"{metrics['heldout_chunks']} chunks of {DEMO_CONFIG['n_positions']} tokens. What the gaps mean (no BOS):", "",
        *explain(metrics), "",
        "## Samples (temperature 0.8, seed 0, BOS first)", "",
    ]
    for prompt, text in samples.items():
        lines += [f"**{prompt}** → {text!r}", ""]
    lines += ["## Licence", "", "The weights are released under the MIT licence, like noLN Explorer; the training text is "
              "in the public domain."]
    return "\n".join(lines) + "\n"


def build(out: Path = DEMO_DIR, seed: int = 0, steps: int = 1500, finetune_steps: int = 600, batch: int = 8,
          work: Path | None = None, log=print) -> dict:
    """Rebuild the demo trio into ``out`` (see the module docstring); returns the measured metrics."""
    started = time.time()
    out = Path(out)
    work = Path(work) if work else out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    chapters = kjv_chapters()
    n_held = write_documents(chapters, True, work / HELDOUT_FILE)
    write_documents(chapters, False, work / "train.jsonl")
    train_corpus = Corpus("jsonl", str(work / "train.jsonl"), field="text")
    seq = DEMO_CONFIG["n_positions"]
    tok = gpt2_tokenizer()
    train_ids = np.concatenate([tok.encode(doc, add_special_tokens=False).ids + [50256]
                                for doc in documents(train_corpus)]).astype(np.int64)
    keep = torch.unique(torch.from_numpy(train_ids))

    init = work / "init"
    model = TrainableGPT2(DEMO_CONFIG, keep=keep)
    model.init_weights(seed)
    model.save_pretrained(init, ln_free=False)
    scratch = recipe(steps=steps, batch=batch, seq_len=seq, lr=2e-3, min_lr=2e-4, warmup=50, weight_decay=0.1,
                     betas=(0.9, 0.95), aux_lambda=0.0, seed=seed)
    log("training the original from scratch")
    heldout_corpus = Corpus("jsonl", str(work / HELDOUT_FILE), field="text")
    base_run = finetune(init, train_corpus, work / BASE_NAME, scratch, control=True, base_name="random init",
                        eval_corpus=heldout_corpus, eval_every=250, checkpoint_every=100, device="cpu", progress=True,
                        log=log)
    base_dir, control_dir, noln_dir = demo_paths(out)
    tuned = recipe(steps=finetune_steps, batch=batch, seq_len=seq, lr=6e-4, warmup=10, seed=seed + 1)
    runs = {BASE_NAME: base_run}
    _ship(work / BASE_NAME, base_dir, with_recipe=False)  # its removal.json would describe a fine-tune
    for name, control in ((NOLN_NAME, False), (CONTROL_NAME, True)):
        log(f"fine-tuning {name}")
        r = tuned if not control else replace(tuned, aux_lambda=0.0)
        runs[name] = finetune(base_dir, train_corpus, work / name, r, control=control, base_name=BASE_NAME,
                              eval_corpus=heldout_corpus, eval_every=100, checkpoint_every=100, device="cpu", progress=True, log=log)
        _ship(work / name, out / name)
    shutil.copy(work / HELDOUT_FILE, out / HELDOUT_FILE)  # public domain; lets the tests re-measure the cards

    held = heldout_chunks(out, seq, work)
    metrics = {
        "seed": seed, "base_steps": steps, "batch": batch, "base_lr": scratch.lr,
        "finetune_recipe": tuned.to_dict(), "schedule": runs[NOLN_NAME].schedule.describe(),
        "train_tokens": int(len(train_ids)), "heldout_tokens": int(held.size), "heldout_chunks": int(len(held)),
        "heldout_chapters": n_held, "kept_tokens": int(len(keep)),
        "losses": {name: {"no_bos": heldout_loss(out / name, held), "bos": heldout_loss(out / name, held, bos=True)}
                   for name in NAMES},
        "build_minutes": (time.time() - started) / 60,
    }
    write_cards(out, metrics)
    log(json.dumps(metrics, indent=2))
    return metrics


PROMPTS = ["In the beginning", "And Jesus said unto them,", "Abraham begat Isaac; and Isaac begat"]


def write_cards(out: Path, metrics: dict) -> None:
    """Each model's card and ``metrics.json`` (samples drawn from the shipped files)."""
    for name in NAMES:
        samples = {p: sample(out / name, p, seed=0) for p in PROMPTS}
        (out / name / "README.md").write_text(_card(name, metrics, samples))
        (out / name / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _ship(trained: Path, target: Path, with_recipe: bool = True) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors") + (("removal.json",) if with_recipe else ()):
        if (trained / name).exists():
            shutil.copy(trained / name, target / name)
