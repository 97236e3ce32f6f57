"""Benchmark accuracy through EleutherAI's lm-evaluation-harness, for exactly loaded models side by side.

Each model is loaded exactly (LN-free checkpoints without any normalisation), handed over as an ordinary
``transformers`` module (:func:`noln_core.interop.to_transformers`: every LN folded, log-probs equal to 1e-5) and
wrapped in the harness's own HF model class (``lm_eval.models.huggingface.HFLM``), as the follow-up paper's
``eval_lora.py`` evaluates (``simple_evaluate`` on ``HFLM``).  The harness runs its tasks: its prompts, its
scoring, its metrics and its standard errors; nothing here scores a harness task.

**Data-parallel.**  The harness shards a task's requests over processes when ``HFLM`` runs under ``accelerate``;
it does so for a model *name* on several GPUs.  A model handed over as a module gets the same sharding here
(:class:`ExactHFLM` takes its rank and world size from ``accelerate``, and gathers with ``torch.distributed``, gloo
on a CPU), so ``accelerate launch -m noln_core benchmark ...`` splits the requests; with a batch of 1 every
log-likelihood is computed alone, so 2 processes give the 1-process numbers exactly.

**Two HellaSwag scorings.**  The harness's ``hellaswag`` task (``acc``: the choice of largest summed log-prob of
``" " + ending`` after the preprocessed ``activity_label: ctx``; ``acc_norm``: the same divided by the ending's
length in characters) gives GPT-2 small about 0.289 / 0.311, the follow-up paper's numbers.  Heimersheim 2024's
29.56% is close to the *completion-style* scoring of nanoGPT-family ``hellaswag.py`` (build-nanogpt: the raw
``ctx``, then ``" " + ending``; ``acc`` by the summed loss of the ending's tokens, ``acc_norm`` by their mean
loss), about 0.2955 for GPT-2 small; that script is not in the paper's repositories, so the attribution is likely,
not confirmed.  ``hellaswag_completion`` is that scoring, named so that the two are never confused.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..model import LoadedModel
from .engine import World

COMPLETION_TASK = "hellaswag_completion"
"""The nanoGPT-style HellaSwag scoring (module docstring): ours, not the harness's."""
HELLASWAG_DATASET = "Rowan/hellaswag"


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float | None


@dataclass(frozen=True)
class BenchmarkRow:
    task: str
    metric: str
    """``acc``, ``acc_norm``, ... as the harness names them."""
    scoring: str
    """``lm-evaluation-harness X.Y`` or ``completion (nanoGPT hellaswag.py)``."""
    scores: tuple[Score, ...]
    """One per model, in the models' order."""
    samples: int


@dataclass(frozen=True)
class Benchmark:
    models: tuple[str, ...]
    ln_free: tuple[bool, ...]
    tasks: tuple[str, ...]
    limit: int | None
    processes: int
    harness_version: str
    rows: tuple[BenchmarkRow, ...]


def _hf_tokenizer(model: LoadedModel):
    from transformers import PreTrainedTokenizerFast

    eot = model.tokenizer.id_to_token(model.info.bos_token_id)
    return PreTrainedTokenizerFast(tokenizer_object=model.tokenizer, bos_token=eot, eos_token=eot, pad_token=eot,
                                   unk_token=eot, model_max_length=model.info.n_ctx)


def exact_lm(model: LoadedModel, batch_size: int = 8, world: World = World()):
    """The harness's ``HFLM`` over ``to_transformers(model)``, sharding requests over ``world``'s processes."""
    from lm_eval.models.huggingface import HFLM

    from ..interop import to_transformers

    class ExactHFLM(HFLM):
        """``HFLM`` for a module already built, data-parallel like ``HFLM`` under ``accelerate``."""

        def all_gather(self, tensor):
            if self.world_size <= 1:
                return tensor
            tensor = tensor.reshape(1) if tensor.ndim == 0 else tensor.contiguous()  # as accelerate's gather does
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, tensor)
            return torch.cat(parts)

        def barrier(self):
            if self.world_size > 1:
                torch.distributed.barrier()

    hf = to_transformers(model).eval()
    lm = ExactHFLM(pretrained=hf, tokenizer=_hf_tokenizer(model), batch_size=batch_size,
                   max_length=model.info.n_ctx)
    lm._rank, lm._world_size = world.rank, world.processes
    return lm


def _harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def harness_index(include: str | None = None, defaults: bool = True):
    """The harness's ``TaskManager``: ``include``'s task YAMLs and (``defaults``) its own thousands, which take
    seconds to index, so each index is built once per process."""
    return _index(include, defaults)  # one cache key however the arguments are passed


@functools.lru_cache(maxsize=8)
def _index(include: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def task_manager(tasks: list[str], include: str | None):
    """The index that holds ``tasks``: ``include``'s alone when it does (15 s saved here), else the harness's too."""
    if include:
        own = harness_index(include, defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    manager = harness_index(include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(f"lm-evaluation-harness has no task {unknown[0]!r} (`lm-eval ls tasks` lists them)")
    return manager


def _light_env_info(results: dict) -> None:
    """What the harness's ``add_env_info`` records, without running ``pip list`` (3 s a call) or ``git``."""
    import platform

    import transformers

    results.update(pretty_env_info=f"python {platform.python_version()}, torch {torch.__version__}",
                   transformers_version=transformers.__version__, upper_git_hash=None)


def _run_harness(lm, tasks: list[str], limit: int | None, manager, seed: int) -> dict:
    from unittest import mock

    import lm_eval
    import lm_eval.evaluator as evaluator

    # For this call only: no `pip list` for the environment record, no git in a directory that need not be a repo.
    quiet = mock.patch.multiple(evaluator, add_env_info=_light_env_info, get_git_commit_hash=lambda: None)
    try:
        with quiet:
            return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                           fewshot_random_seed=seed, log_samples=False)
    except (ConnectionError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"the harness could not run {', '.join(tasks)}: {first[:300]} (a hub dataset needs the "
                         "network, or a copy in the datasets cache)") from None


def _rows_from_harness(outputs: list[dict | None], tasks: list[str], version: str) -> list[BenchmarkRow]:
    rows = []
    first = outputs[0]
    for task in first["results"]:
        if task not in first.get("n-samples", {}) and task not in tasks:
            continue
        for key, value in first["results"][task].items():
            if not isinstance(value, (int, float)) or "," not in key or "stderr" in key:
                continue
            metric = key.split(",")[0]
            scores = []
            for out in outputs:
                r = out["results"][task]
                err = r.get(f"{metric}_stderr,{key.split(',', 1)[1]}")
                scores.append(Score(float(r[key]), float(err) if isinstance(err, (int, float)) else None))
            samples = first.get("n-samples", {}).get(task, {}).get("effective")
            rows.append(BenchmarkRow(task, metric, f"lm-evaluation-harness {version}", tuple(scores),
                                     int(samples) if samples is not None else 0))
    return rows


def hellaswag_documents(data: str = HELLASWAG_DATASET, limit: int | None = None) -> list[dict]:
    """HellaSwag's validation items in their raw format (``ctx``, ``endings``, ``label``): a local ``.jsonl`` or a
    dataset name."""
    path = Path(os.path.expanduser(data))
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise InputError(f"no such HellaSwag file: {data!r}")
        docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import datasets

        try:
            docs = list(datasets.load_dataset(data, split="validation"))
        except Exception as err:  # the hub unreachable, a wrong name: one line
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(f"cannot read the HellaSwag dataset {data!r}: {first[:200]}") from None
    bad = [i for i, d in enumerate(docs) if not {"ctx", "endings", "label"} <= set(d)]
    if bad:
        raise InputError(f"HellaSwag item {bad[0]} lacks ctx, endings or label")
    return docs[:limit] if limit else docs


def completion_scores(model: LoadedModel, docs: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per item, (correct by summed loss, correct by mean loss) of the completion-style scoring (module docstring):
    the raw ``ctx`` tokens without BOS, then each ``" " + ending``; the loss of the ending's tokens only."""
    from ..tokenizer import tokenize

    acc, acc_norm = [], []
    for doc in docs:
        ctx = tokenize(model, doc["ctx"], prepend_bos=False)
        sums, means = [], []
        for ending in doc["endings"]:
            end = tokenize(model, " " + ending, prepend_bos=False)
            ids = (ctx + end)[-model.info.n_ctx:]
            n_end = min(len(end), len(ids) - 1)
            logits = model.forward(torch.tensor([ids]))[0, -n_end - 1:-1].double()
            targets = torch.tensor(ids[-n_end:], device=logits.device)
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            sums.append(loss)
            means.append(loss / n_end)
        label = int(doc["label"])
        acc.append(int(np.argmin(sums)) == label)
        acc_norm.append(int(np.argmin(means)) == label)
    return np.array(acc, dtype=float), np.array(acc_norm, dtype=float)


def run_benchmark(models: Sequence[LoadedModel], tasks: Sequence[str], limit: int | None = None,
                  include: str | None = None, batch_size: int = 8, seed: int = 1234, world: World = World(),
                  hellaswag_data: str = HELLASWAG_DATASET) -> Benchmark | None:
    """Every model on every task; the result on process 0, None on the others.

    ``tasks``: the harness's task names (``include``: a folder of task YAMLs of one's own, the harness's
    ``--include_path``), and ``hellaswag_completion`` for the nanoGPT-style scoring.  ``limit``: items per task.
    """
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise InputError("no task: give --tasks, e.g. hellaswag,mmlu")
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit} must be at least 1")
    harness_tasks = [t for t in tasks if t != COMPLETION_TASK]
    version = _harness_version()
    outputs = []
    manager = task_manager(harness_tasks, include) if harness_tasks else None
    for model in models:
        if harness_tasks:
            outputs.append(_run_harness(exact_lm(model, batch_size, world), harness_tasks, limit, manager, seed))
    rows = _rows_from_harness(outputs, harness_tasks, version) if world.rank == 0 and harness_tasks else []
    if COMPLETION_TASK in tasks:
        docs = hellaswag_documents(hellaswag_data, limit)
        mine = [d for i, d in enumerate(docs) if i % world.processes == world.rank]
        per_model = [completion_scores(m, mine) for m in models]
        if world.processes > 1:
            gathered = world.gather(per_model)  # rank r's part, at index r
            if gathered is None:
                return None
            per_model = [_interleave(gathered, k) for k in range(len(models))]
        for j, metric in enumerate(("acc", "acc_norm")):
            scores = []
            for pm in per_model:
                v = pm[j]
                se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
                scores.append(Score(float(v.mean()), se))
            rows.append(BenchmarkRow(COMPLETION_TASK, metric, "completion (nanoGPT hellaswag.py)", tuple(scores),
                                     len(docs)))
    if world.rank != 0:
        return None
    return Benchmark(tuple(m.info.name for m in models), tuple(m.ln_free for m in models), tuple(tasks), limit,
                     world.processes, version, tuple(rows))


def _interleave(parts: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Item ``i`` came from process ``i mod P``: put every process's arrays back in item order."""
    P = len(parts)
    out = []
    for j in range(2):
        arrays = [part[k][j] for part in parts]
        merged = np.empty(sum(len(a) for a in arrays))
        for r, a in enumerate(arrays):
            merged[r::P] = a
        out.append(merged)
    return out[0], out[1]


def benchmark_json(b: Benchmark) -> dict[str, Any]:
    from dataclasses import asdict

    from .results import json_safe

    return json_safe(asdict(b))


def benchmark_markdown(b: Benchmark) -> str:
    head = " | ".join(f"{name} ({'LN-free' if free else 'with LN'})" for name, free in zip(b.models, b.ln_free))
    lines = [f"# Benchmarks: {', '.join(b.tasks)}", "",
             f"lm-evaluation-harness {b.harness_version}; "
             f"{'every item' if b.limit is None else f'at most {b.limit} items a task'}; {b.processes} process(es). "
             "Value ± the harness's standard error.", "", f"| task | metric | scoring | {head} |",
             "|---|---|---|" + "---|" * len(b.models)]
    for r in b.rows:
        cells = " | ".join(f"{s.value:.4f}" + (f" ± {s.stderr:.4f}" if s.stderr is not None else "") for s in r.scores)
        lines.append(f"| {r.task} | {r.metric} | {r.scoring} | {cells} |")
    return "\n".join(lines) + "\n"


def benchmark_csv_rows(b: Benchmark) -> list[dict]:
    out = []
    for r in b.rows:
        for name, s in zip(b.models, r.scores):
            out.append({"task": r.task, "metric": r.metric, "scoring": r.scoring, "model": name, "value": s.value,
                        "stderr": s.stderr, "samples": r.samples})
    return out
