"""Run a study: the corpus's sequences through every model, one pass, reduced as it goes, resumable.

The same function runs on one CPU, one GPU, or data-parallel under
``accelerate launch`` (over GPUs or nodes; ``--cpu`` with gloo): batch ``i``
goes to process ``i mod P``, each process adds its sequences to its own exact
totals (:class:`~.stats.Totals`), and process 0 merges them.  Because the
totals are exact integer sums and each batch holds the same sequences whatever
``P``, the result is the one-process result.

State lives in a directory named by a hash of everything that decides the
numbers (models, corpus, sequence length, BOS, budget, batch, settings): the
chunked corpus (``chunks.u32``), and one file per process and shard
(``shard-R-of-P.pt``, its totals stored compactly) saved every ``save_every``
seconds and when stopped.  Running the same study again resumes each shard
where it stopped.  A finished study keeps only its result (``result.pt``: the
merged totals and the few contexts its report quotes); the chunks and shards
go, and asking again answers from the result without a forward pass.
:func:`prune_cache` keeps the directory of studies within a byte budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import InputError, TokenizerMismatchError
from ..loading import accelerate_on_cpu
from ..model import LoadedModel
from ..corpus import Chunks, Corpus, prepare_chunks
from .measure import ROWS_CAP, Settings, measure_batch
from .results import StudyResult, build_result
from .stats import Totals

FORMAT = 2
"""Version of the saved state; a change discards old state."""
RESULT = "result.pt"
"""A finished study's file: all that stays of it."""
PROBE = "Tokenizers agree on this: naïve café, 1234, \t tabs and ünïcödé — done."


def bound_heap() -> bool:
    """Serve allocations of 1 MB and more from ``mmap`` (glibc), so that freed blocks go back to the system.

    A study allocates the same large, short-lived blocks batch after batch (logits of a block of
    rows, MLP activations).  glibc's default raises its mmap threshold as blocks are freed, after
    which such blocks come from the heap and fragment it: resident memory then grew by about
    0.5 GB a batch at 8 x 1024 tokens (GPT-2 small, two models), against none with the threshold
    fixed (bench/NOTES.md).  A no-op where glibc's ``mallopt`` is missing; True when it applied.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def cache_root() -> Path:
    """Where studies keep their state: ``$NOLN_STUDY_CACHE``, else ``~/.cache/noln-explorer/studies``."""
    return Path(os.environ.get("NOLN_STUDY_CACHE") or Path.home() / ".cache" / "noln-explorer" / "studies")


@dataclass(frozen=True)
class Progress:
    """How far a study is: sequences done of the total (this process's share under ``accelerate``)."""

    done: int
    total: int
    elapsed_s: float
    resumed_from: int

    @property
    def eta_s(self) -> float | None:
        if self.done >= self.total:
            return 0.0
        fresh = self.done - self.resumed_from  # resumed sequences took no time in this run
        return self.elapsed_s / fresh * (self.total - self.done) if fresh > 0 else None


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    processes: int = 1
    gather: Callable[[object], list | None] | None = None
    """Sends an object to rank 0: the list of every rank's object there, None elsewhere."""


def check_tokenizers(models: list[LoadedModel]) -> None:
    """Refuse models whose tokenizers disagree: a study compares them on the same token ids."""
    ref = models[0]
    ref_ids = ref.tokenizer.encode(PROBE, add_special_tokens=False).ids
    for other in models[1:]:
        same = (other.info.d_vocab == ref.info.d_vocab and other.info.bos_token_id == ref.info.bos_token_id
                and other.tokenizer.encode(PROBE, add_special_tokens=False).ids == ref_ids)
        if not same:
            raise TokenizerMismatchError(f"{other.info.name} and {ref.info.name} use different tokenizers: "
                                         "a study compares models on the same token ids")


def _model_identity(model: LoadedModel) -> dict:
    info = model.info
    ident = {"name": info.name, "source": info.source, "revision": info.revision, "commit": info.commit,
             "dtype": info.dtype}
    path = Path(info.source)
    if path.is_dir():
        ident["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    return ident


def study_key(models: list[LoadedModel], corpus: Corpus, seq_len: int, bos: bool, max_tokens: int | None,
              batch: int, settings: Settings) -> str:
    """A hash of everything that decides a study's numbers."""
    doc = {"format": FORMAT, "models": [_model_identity(m) for m in models], "corpus": corpus.identity(),
           "seq_len": seq_len, "bos": bos, "max_tokens": max_tokens, "batch": batch,
           "settings": {k: v for k, v in asdict(settings).items() if k != "row_bytes"}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class RunEstimate:
    """How long a study will take, from a quick timing of one batch on these models with these settings."""

    seconds: float
    """The whole study: ``batches`` times the timed batch (the first batch of a run costs about the same)."""
    batch_seconds: float
    """One batch of ``batch`` sequences, every metric asked for, all models."""
    batches: int


def estimate_run(models: list[LoadedModel], seq_len: int, batch: int, max_tokens: int, settings: Settings,
                 timed_batches: int = 1) -> RunEstimate:
    """Time ``timed_batches`` batches of random tokens through :func:`measure_batch` (the study's own work per
    batch), then scale to the batches ``max_tokens`` allows.  Reading and tokenising the corpus is not timed."""
    if seq_len < 2 or batch < 1 or max_tokens < seq_len:
        raise InputError(f"nothing to time: the budget of {max_tokens} tokens holds no sequence of {seq_len}")
    n_seq = max_tokens // seq_len
    size = min(batch, n_seq)
    vocab = min(m.info.d_vocab for m in models)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, (size, seq_len), dtype=np.int64))
    measure_batch(models, ids, 0, settings, Totals())  # warm-up: first-call allocations and kernels
    start = time.perf_counter()
    for _ in range(timed_batches):
        measure_batch(models, ids, 0, settings, Totals())
    per_batch = (time.perf_counter() - start) / timed_batches
    batches = -(-n_seq // size)
    return RunEstimate(seconds=per_batch * batches, batch_seconds=per_batch, batches=batches)


def default_seq_len(models: list[LoadedModel]) -> int:
    """The papers' 1024 tokens, or the shortest context of the models when that is smaller."""
    return min([1024] + [m.info.n_ctx for m in models])


def _save(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` through a temporary file of this writer's own, then rename: two writers (a
    session stopping, another resuming) never write into one file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _finish(directory: Path, totals: Totals, contexts: dict[int, str], meta: dict) -> None:
    """Keep a finished study as its result alone: the merged totals, the contexts it quotes, what it was."""
    _save(directory / RESULT, {"totals": _to_torch(totals.to_state()), "contexts": contexts, "meta": meta})
    for path in directory.iterdir():
        if path.name != RESULT and not path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prune_cache(root: Path, max_bytes: int, keep: set[str] = frozenset()) -> list[str]:
    """Delete the least recently used studies under ``root`` until it holds at most ``max_bytes``.

    A study's directory is touched whenever it is used, so its modification time says when it was last used.
    ``keep`` names directories never deleted (studies running now).  Returns the names deleted.
    """
    if not root.is_dir():
        return []
    studies = [(p.stat().st_mtime, p, directory_bytes(p)) for p in root.iterdir() if p.is_dir()]
    total = sum(size for _, _, size in studies)
    deleted = []
    for _, path, size in sorted(studies, key=lambda x: x[0]):
        if total <= max_bytes:
            break
        if path.name in keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= size
        deleted.append(path.name)
    return deleted


def _to_torch(obj):
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    return obj


def _to_numpy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    return obj


def run_study(
    models: list[LoadedModel],
    corpus: Corpus,
    *,
    seq_len: int | None = None,
    batch: int = 8,
    max_tokens: int | None = None,
    bos: bool = False,
    settings: Settings = Settings(),
    world: World = World(),
    state_dir: Path | None = None,
    restart: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    save_every: float = 60.0,
    log: Callable[[str], None] | None = None,
) -> StudyResult | None:
    """Run (or resume) a study; the result on rank 0, None on the other ranks.

    ``cancel()`` is asked between batches; when it says yes, or on Ctrl-C, the
    shard's state is saved and the result so far is returned with
    ``complete=False`` (one process; under ``accelerate`` each rank saves, and
    Ctrl-C propagates).
    """
    if not models:
        raise InputError("a study needs at least one model")
    if batch < 1:
        raise InputError(f"--batch {batch} must be at least 1")
    check_tokenizers(models)
    if settings.nmae_target not in ("last-token", "logit-diff"):
        raise InputError(f"unknown NMAE target {settings.nmae_target!r}: last-token (the papers') or logit-diff")
    seq_len = seq_len or default_seq_len(models)
    too_long = [m.info.name for m in models if m.info.n_ctx < seq_len]
    if too_long:
        raise InputError(f"--seq-len {seq_len} exceeds the context of {', '.join(too_long)}")
    if seq_len < 3:
        raise InputError(f"--seq-len {seq_len} is too short: a study needs at least 3 tokens per sequence")
    key = study_key(models, corpus, seq_len, bos, max_tokens, batch, settings)
    bound_heap()
    directory = (state_dir or cache_root()) / key
    ref = models[0]
    error = None
    if world.rank == 0 and restart and directory.exists():
        shutil.rmtree(directory)
    if (directory / RESULT).exists():  # finished: answered from its result
        os.utime(directory)
        if world.rank != 0:
            return None
        saved = torch.load(directory / RESULT, weights_only=True)
        meta, contexts = saved["meta"], saved["contexts"]
        if progress is not None:
            progress(Progress(meta["n"], meta["n"], 0.0, meta["n"]))
        return build_result(Totals.from_state(_to_numpy(saved["totals"])), models, settings, seq_len=seq_len,
                            bos=bos, processes=meta["processes"], corpus=corpus.describe(), complete=True,
                            context=lambda where: contexts.get(int(where), ""), corpus_spec=_spec(corpus),
                            max_tokens=max_tokens, skipped_rows=meta["skipped"])
    if world.rank == 0:
        try:
            chunks = prepare_chunks(corpus, ref.tokenizer, directory, seq_len, bos=bos, max_tokens=max_tokens,
                                    eot_id=ref.info.bos_token_id, d_vocab=ref.info.d_vocab)
        except InputError as err:
            if world.gather is None:
                raise
            error = str(err)
    if world.gather is not None:  # the others wait for rank 0's chunks, or its error
        from torch import distributed as dist

        message = [error]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise InputError(message[0])
    if world.rank != 0:
        chunks = Chunks.load(directory / "chunks.json")
    tokens = chunks.tokens()
    heads = max(m.info.n_layers * m.info.n_heads for m in models)
    keep_rows = bool(settings.wants("nmae") and settings.bootstrap and chunks.n * heads <= ROWS_CAP)
    n_batches = -(-chunks.n // batch)
    mine = list(range(world.rank, n_batches, world.processes))
    my_total = sum(min(batch, chunks.n - i * batch) for i in mine)
    os.utime(directory)  # used now: the least recently used studies are pruned first
    shard = directory / f"shard-{world.rank}-of-{world.processes}.pt"
    totals, position = Totals(), 0
    if shard.exists():
        state = torch.load(shard, weights_only=True)
        totals, position = Totals.from_state(_to_numpy(state["totals"])), int(state["position"])
    loaded = position
    done = sum(min(batch, chunks.n - i * batch) for i in mine[:position])
    resumed = done
    if log and resumed:
        log(f"resuming: {done} of {my_total} sequences already done")
    start = last_save = time.monotonic()
    stopped = interrupted = False

    def save() -> None:
        if position != loaded:  # nothing ran: the shard on disk (another writer's, perhaps) stays as it is
            _save(shard, {"totals": _to_torch(totals.to_state()), "position": position, "key": key})

    try:
        while position < len(mine):
            if cancel is not None and cancel():
                stopped = True
                break
            b = mine[position]
            ids = torch.from_numpy(np.asarray(tokens[b * batch:(b + 1) * batch], dtype=np.int64))
            measure_batch(models, ids, b * batch, settings, totals, keep_rows)
            position += 1
            done += len(ids)
            if progress is not None:
                progress(Progress(done, my_total, time.monotonic() - start, resumed))
            if time.monotonic() - last_save > save_every:
                save()
                last_save = time.monotonic()
    except KeyboardInterrupt:  # Ctrl-C: keep what is done, and say so (the result is marked incomplete)
        stopped = interrupted = True
    except BaseException:  # anything else that stops the loop (an app's rerun, an error): keep what is done
        save()
        raise
    save()
    if stopped and world.processes > 1:
        if interrupted:
            raise KeyboardInterrupt
        return None
    if world.gather is not None:
        parts = world.gather(totals.to_state())
        if world.rank != 0:
            return None
        totals = Totals()
        for part in parts or []:
            totals.merge(Totals.from_state(part))
    decode = models[0].tokenizer.decode
    quoted: dict[int, str] = {}

    def context(where: int, width: int = 12) -> str:
        s_, p_ = divmod(int(where), seq_len)
        quoted[int(where)] = decode(tokens[s_, max(0, p_ - width):p_ + 1].tolist())
        return quoted[int(where)]

    result = build_result(totals, models, settings, seq_len=seq_len, bos=bos, processes=world.processes,
                          corpus=corpus.describe(), complete=not stopped, context=context, corpus_spec=_spec(corpus),
                          max_tokens=max_tokens, skipped_rows=chunks.skipped)
    if not stopped:
        del tokens  # the memory map, before its file goes
        _finish(directory, totals, quoted, {"n": result.n_sequences, "processes": world.processes,
                                            "skipped": chunks.skipped})
    return result


def _spec(corpus: Corpus) -> dict:
    """What a study's JSON says of its corpus: where it came from and how it was sampled (not pasted text)."""
    return {k: v for k, v in asdict(corpus).items() if k != "text"}


def accelerate_world(device: str = "auto") -> tuple[World, str]:
    """This process's :class:`World` and device under ``accelerate launch`` (or ``torchrun``).

    One process (rank 0 of 1, on ``device``) unless the launcher started several
    (``WORLD_SIZE`` > 1).  Without CUDA, or with ``device="cpu"``, the processes
    talk over gloo on the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(), ("cpu" if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") else device)
    from accelerate import PartialState
    from torch import distributed as dist

    state = PartialState(cpu=accelerate_on_cpu(device))

    def gather(obj):
        out = [None] * state.num_processes if state.is_main_process else None
        dist.gather_object(obj, out, dst=0)
        return out

    return World(state.process_index, state.num_processes, gather), str(state.device)
