"""The fine-tuning loop of LN removal and of its with-LN control, data-parallel on ``accelerate``.

One process or many (``accelerate launch -m noln_core remove-ln ...``: DDP on
several GPUs or nodes, FSDP for models that do not fit on one GPU, gloo on CPUs).
A run is defined by its global batch, never by how many processes share it:

* the global batch of ``batch`` sequences is cut into ``grad_accum`` micro-batches,
  each shared by the processes (``batch / (grad_accum * processes)`` rows each);
  row ``r`` of the run is chunk ``permutation_e[r mod n]`` of epoch ``e = r // n``,
  a seeded permutation, so every process count reads the same rows;
* the σ estimates (:class:`.model.FakeLayerNorm`) and the auxiliary loss's target
  are reduced over the processes on every forward, so every rank holds the same σ
  and it equals the one-process value;
* DDP averages gradients over processes, so the loss and its gradient are those of
  the whole micro-batch; accumulation sums the micro-batches, divided by their number.

Hence 2 processes equal 1 with the same ``batch`` and ``grad_accum`` (up to the
order of floating-point sums; the tests hold them to 1e-5).  Checkpoints
(``OUT/_training/checkpoint``: weights, σ buffers, flags, optimiser) are written
every ``checkpoint_every`` steps, at the end, and on Ctrl-C; rerunning resumes
and gives what an uninterrupted run gives.  Rank 0 alone shows the progress bar
and writes ``OUT/_training/loss_log.jsonl``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..corpus import Chunks, Corpus, prepare_chunks
from ..errors import InputError
from ..loading import accelerate_on_cpu
from ..tokenizer import load_tokenizer
from .model import STD_EPS, TrainableGPT2, all_reduce_sum
from .recipe import Recipe, Schedule

CHECKPOINT = "checkpoint"


@dataclass
class FinetuneResult:
    """What a fine-tuning run did (the model card and ``OUT/removal.json`` are written from it)."""

    out: Path
    control: bool
    recipe: Recipe
    schedule: Schedule | None
    processes: int
    steps: int
    tokens: int
    """Training tokens seen (every process, every step)."""
    final_loss: float
    """Mean training loss over the last 10 steps."""
    eval_loss: float | None
    """Held-out loss at the end."""
    initial_eval_loss: float | None
    """Held-out loss of the base model, before any step."""
    eval_sequences: int
    train_sequences: int
    seconds: float
    log_path: Path
    distributed: dict = field(default_factory=dict)
    """accelerate's distributed type, the number of sharded parameters, the mixed precision."""
    state_dict: dict | None = field(default=None, repr=False)
    """The trained weights and σ buffers, gathered (every rank; the export frees it)."""
    is_main: bool = True
    """True on rank 0, which writes the files."""


PRECISIONS = ("auto", "fp32", "bf16", "bf16-mixed")
"""``bf16``: weights, gradients and optimiser state in bfloat16, with bf16 autocast, as the released code
(``train.py`` lines 573-581: ``torch_dtype=torch.bfloat16``; line 948: ``bf16=True``); ``bf16-mixed``: bf16
autocast over float32 master weights; ``auto``: ``bf16`` where the device has it (a CUDA GPU with bfloat16), else
``fp32``."""


def resolve_precision(precision: str, device: str) -> str:
    """The precision a run uses: ``auto`` becomes ``bf16`` on a bf16-capable GPU and ``fp32`` elsewhere."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    cuda = not accelerate_on_cpu(device) and torch.cuda.is_available()
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def _accelerator(device: str, precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = "no" if precision == "fp32" else "bf16"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed) and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)  # one process, a second run with another precision
    try:
        return Accelerator(cpu=accelerate_on_cpu(device), mixed_precision=mixed)
    except RuntimeError as err:
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and "no available devices" in str(err):
            raise InputError("FSDP (--use_fsdp) needs accelerators (CUDA, XPU, ...) and none is here: on CPUs "
                             "launch with --multi_gpu (DDP, each process holding the whole model)") from None
        raise


def fsdp_fallback(distributed_type: str, env=None) -> str | None:
    """The line a run prints when ``accelerate launch --use_fsdp`` asked for FSDP and accelerate did not give it.

    accelerate enables FSDP only on accelerators: on CPUs it runs DDP (or one plain process), every process
    holding the whole model, parameters, gradients and optimiser state.  Silence would let a user believe
    the model is sharded."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or distributed_type.upper() == "FSDP":
        return None
    return (f"FSDP was asked for (--use_fsdp) but accelerate runs it only on accelerators: this run falls back to "
            f"{'DDP' if distributed_type.upper() == 'MULTI_CPU' else 'one plain process'}, each process holding "
            "the whole model")


def optimizer_groups(model: TrainableGPT2, weight_decay: float, ln_gains: bool = False) -> list[dict]:
    """Weight decay on the matrices and embeddings, and on the LN gains when ``ln_gains``; never on a bias.

    ``transformers``' Trainer, which the released code trains with, decays every parameter but biases and those
    of ``nn.LayerNorm`` modules; its ``FakeLayerNorm`` is not one, so the gains of the LNs being removed decay.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_ln = ".ln_" in f".{name}"
        (no_decay if p.ndim < 2 and not (ln_gains and is_ln and name.endswith("weight")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_event(model: TrainableGPT2, what: str, layer: int) -> None:
    if what == "ln_f":
        model.ln_f.remove("out")
    elif what == "ln_2":
        model.blocks[layer].ln_2.remove("out")
    elif what in ("ln_1.qk", "ln_1.v"):
        model.blocks[layer].ln_1.remove(what.split(".")[1])
    elif what == "eot-sigma-ends":
        for block in model.blocks:
            block.ln_1.eot_special.fill_(False)
    elif what == "bos-sigma-ends":
        for _, ln in model.layer_norms():
            ln.bos_special.fill_(False)
    else:
        raise ValueError(what)


def aux_loss(resid: torch.Tensor, tokens: torch.Tensor, eot: int, weight: float) -> torch.Tensor:
    """The papers' auxiliary loss: ``weight * mean over every position of (σ_pos - σ̂)²``.

    ``σ_pos`` is each position's σ of the residual entering ``ln_f`` (with gradient);
    ``σ̂`` is the mean σ of the current (global micro-)batch over the positions that
    are neither position 0 nor EOT, without gradient.  Position 0 and EOT are thus
    penalised too: the loss pulls them towards the common σ.
    """
    std = (resid.float().var(-1, unbiased=False) + STD_EPS).sqrt()
    with torch.no_grad():
        common = tokens != eot
        common[:, 0] = False
        stats = torch.stack([(std * common).sum(), common.sum().to(std.dtype)]).double()
        s, n = all_reduce_sum(stats).tolist()
        target = s / n if n else 1.0
    return weight * (std - target).pow(2).mean()


def _rows(step: int, micro: int, rank: int, recipe: Recipe, per_process: int, n_train: int) -> np.ndarray:
    """The training chunks this process reads in micro-batch ``micro`` of optimiser step ``step``."""
    first = step * recipe.batch + micro * (recipe.batch // recipe.grad_accum) + rank * per_process
    rows = np.arange(first, first + per_process)
    out = np.empty(per_process, dtype=np.int64)
    for epoch in np.unique(rows // n_train):
        mask = rows // n_train == epoch
        out[mask] = _permutation(recipe.seed, int(epoch), n_train)[rows[mask] % n_train]
    return out


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch``'s order of the ``n`` training chunks (made once, not on every micro-batch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _counted_targets(train_rows, mine: np.ndarray, step: int, micro: int, rank: int, recipe: Recipe,
                     per_process: int, n_train: int, processes: int, eot: int) -> int:
    """Targets counted in the loss over micro-batch ``micro`` of step ``step``, every process's rows together
    (``mine`` are this rank's)."""
    if recipe.eot_loss:
        return per_process * processes * (recipe.seq_len - 1)
    idx = np.concatenate([mine if r == rank else _rows(step, micro, r, recipe, per_process, n_train)
                          for r in range(processes)])
    return int((np.asarray(train_rows[idx])[:, 1:] != eot).sum())


def _chunks(corpus: Corpus, tokenizer, directory: Path, seq_len: int, accelerator, max_tokens=None) -> Chunks:
    if accelerator.is_main_process:
        chunks = prepare_chunks(corpus, tokenizer, directory, seq_len, max_tokens=max_tokens)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        chunks = Chunks.load(directory / "chunks.json")
    return chunks


def _evaluate(model, inner: TrainableGPT2, data: np.ndarray, rank: int, processes: int, per_process: int,
              device) -> float:
    """Mean next-token loss over every held-out sequence, each counted once.

    Rank ``p`` takes sequences ``p, p + P, ...``; every rank makes the same number
    of forwards (the last ones padded with a repeated row that counts for nothing),
    since DDP and FSDP forwards are collective.
    """
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = np.arange(rank, len(data), processes)
    rounds = math.ceil(math.ceil(len(data) / processes) / per_process)
    with torch.no_grad():
        for i in range(rounds):
            take = mine[i * per_process:(i + 1) * per_process]
            real = len(take)
            take = np.concatenate([take, np.full(per_process - real, len(data) - 1)]).astype(np.int64)
            rows = torch.from_numpy(np.asarray(data[take], dtype=np.int64)).to(device)
            losses = inner.token_losses(model(rows[:, :-1]), rows[:, 1:]).view(per_process, -1)[:real]
            total += torch.stack([losses.double().sum(), torch.tensor(float(losses.numel()), device=device)])
    model.train()
    s, n = all_reduce_sum(total).tolist()
    return s / n


def _catch_sigint(flag: torch.Tensor):
    """Ctrl-C sets ``flag``; the loop stops at the end of the step, saves, and raises KeyboardInterrupt."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(*_):
        if flag.item():  # a second Ctrl-C does not wait for the step to end
            raise KeyboardInterrupt
        flag.fill_(1)

    return signal.signal(signal.SIGINT, handler)


def _restore_sigint(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGINT, previous)


def held_out_count(n_chunks: int) -> int:
    """Chunks held out when no evaluation corpus is given: 1% of them, at least 1, at most 1000."""
    return max(1, min(1000, n_chunks // 100))


def run(base: Path, corpus: Corpus, out: Path, recipe: Recipe, *, control: bool = False,
        eval_corpus: Corpus | None = None, eval_every: int = 100, checkpoint_every: int = 50,
        device: str = "auto", precision: str = "auto", max_tokens: int | None = None, progress: bool = False,
        on_step: Callable[[int], None] | None = None, log: Callable[[str], None] = lambda m: None) -> FinetuneResult:
    """Fine-tune ``base`` (a local GPT-2 directory) on ``corpus`` with ``recipe``: remove LN, or (``control``) keep it.

    Returns on every rank; only rank 0 writes the log.  ``on_step(step)`` is called
    after each optimiser step (the tests interrupt a run through it).  The caller
    exports the model (:func:`noln_core.training.removal.export`).
    """
    started = time.time()
    requested, precision = precision, resolve_precision(precision, device)
    accelerator = _accelerator(device, precision)
    rank, processes = accelerator.process_index, accelerator.num_processes
    fallback = fsdp_fallback(str(accelerator.distributed_type.value))
    if fallback and rank == 0:
        log(fallback)
    if recipe.batch % (recipe.grad_accum * processes):
        raise InputError(f"--batch {recipe.batch} does not split into {recipe.grad_accum} micro-batch(es) over "
                         f"{processes} process(es): make it a multiple of {recipe.grad_accum * processes}")
    per_process = recipe.batch // (recipe.grad_accum * processes)
    work = Path(out) / "_training"
    model = TrainableGPT2.from_pretrained(base, momentum=recipe.momentum, special_sigma=recipe.special_sigma)
    if precision == "bf16":  # parameters only: the σ estimates (buffers) stay in float32 and float64
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    n_layers, n_ctx = len(model.blocks), int(model.config["n_positions"])
    if recipe.seq_len > n_ctx:
        raise InputError(f"--seq-len {recipe.seq_len} is longer than the model's context of {n_ctx}")
    schedule = None if control else recipe.schedule(n_layers)
    identity = {"base": str(base), "control": control, "corpus": corpus.identity(), "recipe": recipe.to_dict(),
                "eval_corpus": eval_corpus.identity() if eval_corpus else None, "max_tokens": max_tokens}
    identity = json.loads(json.dumps(identity, default=str))
    run_file = work / "run.json"
    if accelerator.is_main_process:
        if run_file.exists() and json.loads(run_file.read_text()) != identity:
            if (work / CHECKPOINT / "done").exists():
                raise InputError(f"{out} holds a different run (other base, data or settings): choose another --out, "
                                 "or delete it to start over")
            shutil.rmtree(work)  # an attempt that saved no step (bad data, say): its state is ours to replace
        work.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(identity, indent=2))
    accelerator.wait_for_everyone()

    tokenizer = load_tokenizer(Path(base), int(model.config["vocab_size"]), str(base))
    chunks = _chunks(corpus, tokenizer, work / "data", recipe.seq_len, accelerator, max_tokens).tokens()
    if eval_corpus is not None:
        held = _chunks(eval_corpus, tokenizer, work / "eval-data", recipe.seq_len, accelerator).tokens()
        train_rows = chunks
    else:
        if len(chunks) < 2:
            raise InputError(f"the data gives {len(chunks)} sequence(s) of {recipe.seq_len} tokens: at least 2 are "
                             "needed (one is held out); add text or lower --seq-len")
        k = held_out_count(len(chunks))
        train_rows, held = chunks[:-k], chunks[-k:]
    n_train = len(train_rows)

    dev = accelerator.device
    opt = torch.optim.AdamW(optimizer_groups(model, recipe.weight_decay, recipe.decays_ln_gains(control)),
                            lr=recipe.lr, betas=recipe.betas)
    model, opt = accelerator.prepare(model, opt)
    inner: TrainableGPT2 = accelerator.unwrap_model(model)
    events = schedule.events(n_layers, recipe.special_sigma) if schedule else {}
    state_file, ckpt = work / "state.json", work / CHECKPOINT
    start, initial_eval = 0, None
    if (ckpt / "done").exists() and state_file.exists():
        accelerator.load_state(str(ckpt))
        saved = json.loads(state_file.read_text())
        start, initial_eval = saved["step"], saved.get("initial_eval_loss")
        log(f"resuming at step {start} of {recipe.steps}")
    else:
        initial_eval = _evaluate(model, inner, held, rank, processes, per_process, dev)
    log_path = work / "loss_log.jsonl"
    if accelerator.is_main_process:
        kept = [line for line in (log_path.read_text().splitlines() if log_path.exists() else [])
                if json.loads(line)["step"] < start]
        log_path.write_text("".join(line + "\n" for line in kept))
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm import tqdm

        what = "fine-tune with LN" if control else "remove LN"
        bar = tqdm(total=recipe.steps, initial=start, unit="step", file=sys.stderr,
                   desc=what if processes == 1 else f"{what} ({processes} processes)")

    def save(step: int) -> None:
        partial = work / (CHECKPOINT + ".partial")
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / "done").write_text("")
            if ckpt.exists():
                shutil.rmtree(ckpt)
            partial.rename(ckpt)
            state_file.write_text(json.dumps({"step": step, "initial_eval_loss": initial_eval}))
        accelerator.wait_for_everyone()

    recent: list[float] = []
    eval_loss = None
    stop = torch.zeros(1, device=dev)
    previous = _catch_sigint(stop)
    model.train()
    try:
        for step in range(start, recipe.steps):
            removed = []
            for what, layer in events.get(step, []):
                apply_event(inner, what, layer)
                removed.append(f"{what}@{layer}" if layer >= 0 else what)
            lr = recipe.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            sums = torch.zeros(3, dtype=torch.float64, device=dev)
            for micro in range(recipe.grad_accum):
                idx = _rows(step, micro, rank, recipe, per_process, n_train)
                rows = torch.from_numpy(np.asarray(train_rows[idx], dtype=np.int64)).to(dev)
                # The loss is the mean over the whole micro-batch's counted targets (every process's rows, known
                # to all: the order is fixed), so that it does not depend on how the rows are shared out.
                counted = _counted_targets(train_rows, idx, step, micro, rank, recipe, per_process, n_train,
                                           processes, inner.eot)
                sync = contextlib.nullcontext() if micro == recipe.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    logits = model(rows[:, :-1])
                    mask = inner.loss_mask(rows[:, 1:], recipe.eot_loss).reshape(-1)
                    ce_sum = (inner.token_losses(logits, rows[:, 1:]) * mask).sum()
                    ce = ce_sum * processes / max(counted, 1)  # DDP averages gradients over the processes
                    aux = (aux_loss(inner.final_residual, rows[:, :-1], inner.eot, recipe.aux_lambda)
                           if recipe.aux_lambda > 0 else torch.zeros((), device=dev))
                    accelerator.backward((ce + aux) / recipe.grad_accum)
                sums += torch.stack([ce_sum.detach().double(), aux.detach().double(),
                                     mask.sum().double()])
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ce_total, aux_total, n_counted = all_reduce_sum(sums).tolist()
            loss, aux_value = ce_total / max(n_counted, 1), aux_total / (recipe.grad_accum * processes)
            recent = (recent + [loss])[-10:]
            last = step + 1 == recipe.steps
            entry = {"step": step, "loss": loss, "aux": aux_value, "lr": lr,
                     "tokens": (step + 1) * recipe.tokens_per_step(), "processes": processes,
                     "grad_norm": float(grad_norm), "removed": removed, "time": round(time.time() - started, 3)}
            if eval_every and ((step + 1) % eval_every == 0 or last):
                eval_loss = _evaluate(model, inner, held, rank, processes, per_process, dev)
                entry["eval_loss"] = eval_loss
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            if on_step is not None:
                try:
                    on_step(step)
                except KeyboardInterrupt:
                    stop.fill_(1)
            stopping = bool(all_reduce_sum(stop.clone()).item())  # every rank stops at the same step
            if (step + 1) % checkpoint_every == 0 or last or stopping:
                save(step + 1)
            if stopping:
                raise KeyboardInterrupt
    finally:
        _restore_sigint(previous)
        if bar is not None:
            bar.close()
    if eval_loss is None:
        eval_loss = _evaluate(model, inner, held, rank, processes, per_process, dev)
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    return FinetuneResult(
        out=Path(out), control=control, recipe=recipe, schedule=schedule, processes=processes, steps=recipe.steps,
        tokens=recipe.steps * recipe.tokens_per_step(), final_loss=float(np.mean(recent)) if recent else float("nan"),
        eval_loss=eval_loss, initial_eval_loss=initial_eval, eval_sequences=len(held), train_sequences=n_train,
        seconds=time.time() - started, log_path=log_path,
        distributed={"type": str(accelerator.distributed_type.value), "sharded_parameters": sharded,
                     "mixed_precision": str(accelerator.mixed_precision), "precision": precision,
                     "precision_requested": requested},
        state_dict=accelerator.get_state_dict(model), is_main=accelerator.is_main_process)
