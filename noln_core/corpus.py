"""A study's corpus: where the text comes from, and how it becomes fixed-length sequences.

Sources: a ``.txt`` file (one document), a directory (one document per file),
a ``.jsonl`` file (one document per line, the text in ``field``), pasted text,
the bundled held-out sample (``demo``), or a Hugging Face dataset
(``name[:config]``, a split and a column) read through ``datasets``: streamed
when online, from the local cache when offline.  A column of token ids (a
pre-tokenised dataset, such as the papers' ``apollo-research/monology-pile-
uncopyrighted-tokenizer-gpt2``) is used as it is.

The papers' convention is the default (``pile_eval.py``, ``prepare_dataset.py``
in ``submarat/removing-layer-norm``): every text document is followed by
``<|endoftext|>``, the documents form one token stream (pre-tokenised rows are
concatenated as they are), and the stream is cut into consecutive chunks of
``seq_len`` tokens, the rest dropped; no BOS.  With ``bos`` every chunk is
``<|endoftext|>`` followed by ``seq_len - 1`` tokens of the stream instead.

How rows become sequences is a :class:`Sampling`, one per script of the papers
(``submarat/removing-layer-norm``, commit 583a9e6), each using ``datasets``' own
shuffles so that the same rows come out in the same order:

* ``stream`` (the default): every row in order, joined, cut into chunks.  With
  ``rows`` the first R rows; with ``seed`` a buffered shuffle first
  (``IterableDataset.shuffle(seed, buffer_size=1000)``).
* ``first-tokens`` (``mech_interp/load_dataset.py``, lines 59-60 and 72-82, behind
  ``run_analysis.py``, ``run_inference.py`` and ``residual_norms.py``): the
  stream shuffled with ``seed`` (buffer 1000), its first R rows, each row's
  *first* ``seq_len`` tokens; no EOT, no joining.  A row shorter than that is
  skipped and counted (the papers' collate would fail on it).
* ``pile-eval`` (``pile_eval.py``, ``preprocess_pile_dataset``, lines 31-89, behind
  the CE tables and ``sink_rate.py``): a dataset read whole is permuted
  (``Dataset.shuffle(seed).select(range(R))`` when R is below its size, then
  ``shuffle(seed)`` again), a streamed one cut to its first R rows then shuffled
  with a buffer; the rows are joined (text rows end with EOT, token rows as
  they are) and cut into ``chunk``-token chunks, at most R of them, of which the
  first ``seq_len`` tokens are analysed (``sink_rate.py``, line 189: 512 of 1024).
* ``owt-eval`` (``prepare_dataset.py``, lines 16-50, the OpenWebText column):
  ``train_test_split(test_size=0.0005, seed=2357)``'s test split, mapped in
  ``shards`` contiguous shards (their ``num_proc=32``) of batches of 512 rows;
  each batch's texts, each followed by EOT, joined and cut into 1024-token
  chunks, its remainder dropped.

Offline, a dataset comes from ``datasets``' local cache as one shard; the papers
streamed from the hub, which for a dataset of several data files also shuffles
the order of the files.  The two agree for datasets of one file.

The chunks are written once to a file of token ids (memory-mapped, so memory
stays bounded whatever the corpus), which every process of a study then reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError
from .paths import DEMO_DIR
from .tokenizer import check_text, decode_utf8

SAMPLINGS = ("stream", "first-tokens", "pile-eval", "owt-eval")
"""How a corpus becomes sequences (see the module docstring)."""
SHUFFLE_BUFFER = 1000
"""``datasets``' default buffer for shuffling a streamed dataset, as the papers' scripts used it."""


@dataclass(frozen=True)
class Sampling:
    """How rows become sequences; each method follows one of the papers' scripts (the module docstring)."""

    method: str = "stream"
    rows: int | None = None
    """Read only the first R rows (after the shuffle; ``pile-eval`` also keeps at most R chunks)."""
    seed: int | None = None
    """Shuffle the rows with this seed first (``datasets``' own algorithms); None keeps the corpus's order."""
    chunk: int | None = None
    """``stream``/``pile-eval``/``owt-eval``: cut the stream at this length, then analyse each chunk's first
    ``seq_len`` tokens (default: ``seq_len``)."""
    streaming: bool = True
    """``pile-eval``: the dataset is read as a stream (first R rows, then a buffered shuffle) or whole
    (a permutation of every row)."""
    test_size: float = 0.0005
    """``owt-eval``: the held-out share of ``train_test_split``."""
    split_seed: int = 2357
    """``owt-eval``: the seed of ``train_test_split``."""
    shards: int = 32
    """``owt-eval``: the ``num_proc`` of ``prepare_dataset.py``'s map (its contiguous shards)."""
    batch_rows: int = 512
    """``owt-eval``: the map's batch size: rows joined together before chunking."""
    skip_sets: tuple[str, ...] = ()
    """``pile-eval``: rows whose ``meta.pile_set_name`` is one of these are left out (``pile_eval.py``, lines 61-66,
    for text datasets: OpenWebText2, Books3 and BookCorpus2)."""

    def __post_init__(self) -> None:
        if self.method not in SAMPLINGS:
            raise InputError(f"unknown sampling {self.method!r}: one of {', '.join(SAMPLINGS)}")
        for name in ("rows", "chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"--{name} {value} must be a positive integer")
        if self.method == "first-tokens" and self.chunk is not None:
            raise InputError("--chunk applies to joined streams, not to first-tokens sampling")
        if self.method == "owt-eval" and not (0 < self.test_size < 1 and self.shards >= 1 and self.batch_rows >= 1):
            raise InputError("owt-eval needs 0 < test size < 1, at least one shard and one row per batch")

    def describe(self, seq_len: int | None = None) -> str:
        """One line: what the method reads, for reports."""
        shuffle = "" if self.seed is None else f" after a seeded shuffle (seed {self.seed})"
        first = f"the first {self.rows:,} rows" if self.rows else "every row"
        cut = f"chunks of {self.chunk}" if self.chunk else "chunks"
        keep = f", the first {seq_len} tokens of each" if self.chunk and seq_len and seq_len < self.chunk else ""
        if self.method == "first-tokens":
            return f"the first {seq_len or 'N'} tokens of each of {first}{shuffle} (load_dataset.py)"
        if self.method == "pile-eval":
            how = "streamed" if self.streaming else "read whole"
            skip = f", without {', '.join(self.skip_sets)}" if self.skip_sets else ""
            return f"{first}{shuffle} ({how}){skip}, joined, cut into {cut}{keep} (pile_eval.py)"
        if self.method == "owt-eval":
            return (f"the {self.test_size:g} test split (seed {self.split_seed}), {self.shards} shards of batches of "
                    f"{self.batch_rows} rows, each joined and cut into {cut}{keep} (prepare_dataset.py)")
        return f"{first}{shuffle}, joined, cut into {cut}{keep}"


DEMO_CORPUS = "demo"
"""The name of the bundled held-out sample (chapters of the King James Bible the demo models never saw)."""
KINDS = ("file", "dir", "jsonl", "text", "demo", "dataset")


@dataclass(frozen=True)
class Corpus:
    """Where a study's text comes from (see the module docstring for each ``kind``)."""

    kind: str
    source: str
    """A path, a dataset name, ``demo``, or ``pasted text``."""
    field: str | None = None
    """The JSONL field or dataset column (default ``text``; a dataset with ``input_ids`` uses those)."""
    config: str | None = None
    split: str = "train"
    text: str | None = None
    """The text itself, for ``kind == "text"``; for ``jsonl``, an uploaded file's content held in memory (``source``
    is then its name, never a path on the server)."""
    sampling: Sampling = Sampling()
    """How its rows become sequences."""

    def describe(self) -> str:
        if self.kind == "text":
            where = f"pasted text ({len(self.text or '')} characters)"
        elif self.text is not None:
            where = f"the uploaded file {self.source!r}"
        elif self.kind == "dataset":
            cfg = f":{self.config}" if self.config else ""
            where = f"{self.source}{cfg} ({self.split}, column {self.field or 'text/input_ids'})"
        else:
            where = {"demo": "the bundled held-out sample"}.get(self.kind, self.source)
        return where if self.sampling == Sampling() else f"{where}; {self.sampling.describe()}"

    def identity(self) -> dict:
        """What makes two corpora the same for caching and resuming: contents, not names."""
        ident = {k: v for k, v in asdict(self).items() if k != "text"}
        if self.text is not None:  # pasted text, or an uploaded file held in memory
            ident["sha256"] = hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()
        elif self.kind in ("file", "jsonl", "demo", "dir") and self.text is None:
            paths = _files(self) if self.kind == "dir" else [_path(self)]
            ident["files"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
        return ident


def _path(corpus: Corpus) -> Path:
    return DEMO_DIR / "heldout.jsonl" if corpus.kind == "demo" else Path(os.path.expanduser(corpus.source))


def _files(corpus: Corpus) -> list[Path]:
    root = _path(corpus)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts))
    if not files:
        raise InputError(f"the corpus directory {corpus.source!r} holds no files")
    return files


def parse_corpus(data: str, field: str | None = None, split: str = "train", sampling: Sampling = Sampling()) -> Corpus:
    """The corpus ``--data`` names: an existing path, ``demo``, or a dataset ``name[:config]``."""
    data = (data or "").strip()
    if not data:
        raise InputError("no corpus: give --data a .txt file, a directory, a .jsonl file, 'demo' or a dataset name")
    if data == DEMO_CORPUS:
        return Corpus("demo", DEMO_CORPUS, sampling=sampling)
    path = Path(os.path.expanduser(data))
    if path.is_dir():
        return Corpus("dir", data, sampling=sampling)
    if path.is_file():
        if path.suffix == ".jsonl":
            return Corpus("jsonl", data, field=field or "text", sampling=sampling)
        return Corpus("file", data, sampling=sampling)
    if path.suffix in (".txt", ".jsonl", ".json") or data.startswith((".", "/", "~")):
        raise InputError(f"no such corpus file or directory: {data!r}")
    name, _, config = data.partition(":")
    if name.count("/") > 1 or not name.replace("/", "").replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InputError(f"{data!r} is neither a file nor a dataset name (owner/name[:config])")
    return Corpus("dataset", name, field=field, config=config or None, split=split or "train", sampling=sampling)


def text_corpus(text: str) -> Corpus:
    """A corpus of pasted text (one document)."""
    return Corpus("text", "pasted text", text=text)


def documents(corpus: Corpus) -> Iterator[str | list[int]]:
    """The corpus's documents in order: strings, or lists of token ids for a pre-tokenised dataset."""
    if corpus.kind == "text":
        yield check_text(corpus.text or "", "the pasted text")
    elif corpus.kind == "file":
        yield _read_text(_path(corpus))
    elif corpus.kind == "demo":  # one held-out chapter per line
        yield from _jsonl(_path(corpus), "text", DEMO_CORPUS)
    elif corpus.kind == "dir":
        for path in _files(corpus):
            yield _read_text(path)
    elif corpus.kind == "jsonl":
        yield from _jsonl(_path(corpus) if corpus.text is None else corpus.text, corpus.field or "text",
                          corpus.source)
    elif corpus.kind == "dataset":
        yield from _dataset_rows(corpus)
    else:
        raise InputError(f"unknown corpus kind {corpus.kind!r} (one of {', '.join(KINDS)})")


def _read_text(path: Path) -> str:
    return check_text(decode_utf8(path.read_bytes(), f"the corpus file {str(path)!r}"), f"the corpus file {str(path)!r}")


def text_lines(text: str) -> Iterator[bytes]:
    """An in-memory file's lines, as reading it from disk would give them."""
    for line in text.splitlines(keepends=True):
        yield line.encode("utf-8", "surrogatepass")


def _jsonl(source: Path | str, field: str, name: str) -> Iterator[str | list[int]]:
    """The documents of a JSONL file on disk (``source`` a path) or in memory (``source`` its text)."""
    where = repr(str(source)) if isinstance(source, Path) else repr(name)
    with (open(source, "rb") if isinstance(source, Path) else contextlib.nullcontext(text_lines(source))) as fh:
        for number, raw in enumerate(fh, 1):
            line = decode_utf8(raw, f"line {number} of {where}").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"line {number} of {where} is not JSON ({err.msg})") from None
            except RecursionError:
                raise InputError(f"line {number} of {where} is nested too deeply to be a document") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(sorted(row)[:20]) if isinstance(row, dict) else type(row).__name__
                raise InputError(f"line {number} of {where} has no field {field!r} (it has: {keys}); "
                                 "choose one with --field")
            yield _document(row[field], f"field {field!r} on line {number} of {where}")


def _document(value, what: str) -> str | list[int]:
    if isinstance(value, str):
        return check_text(value, what)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
        return [int(v) for v in value]
    raise InputError(f"{what} is neither text nor a list of token ids")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")


def _open_dataset(corpus: Corpus, streaming: bool):
    """``(dataset, column, rows)`` through ``datasets``: streamed, or read whole (a map-style ``Dataset``).

    ``rows`` iterates the rows once, from the first (already read, to check the column); None when the
    dataset is empty.  Offline a stream is made from the local cache (one shard).  Every failure is one line.
    """
    try:
        import datasets
    except ImportError:
        raise InputError("reading a Hugging Face dataset needs the datasets package: pip install datasets") from None
    name = corpus.source + (f":{corpus.config}" if corpus.config else "")
    offline = _offline()
    try:
        # Offline, datasets finds an earlier download in its cache only when not streaming.
        ds = datasets.load_dataset(corpus.source, corpus.config, split=corpus.split, streaming=streaming and not offline)
        if streaming and isinstance(ds, datasets.Dataset):  # the local cache, read as one stream
            ds = ds.to_iterable_dataset()
        rows = iter(ds)
        first = next(rows, None)
    except Exception as err:
        kind = type(err).__name__
        if kind in ("DatasetNotFoundError", "RepositoryNotFoundError", "DataFilesNotFoundError") and not offline:
            raise InputError(f"no dataset {name!r} on the Hugging Face hub") from None
        if isinstance(err, (ConnectionError, FileNotFoundError)):
            if offline:
                raise InputError(f"dataset {name!r} is not in the local cache and the hub is offline "
                                 "(HF_HUB_OFFLINE): download it once online, or use a local file") from None
            raise InputError(f"no dataset {name!r} could be read ({str(err).splitlines()[0][:200]})") from None
        if isinstance(err, ValueError):  # an unknown split or config
            raise InputError(f"dataset {name!r}: {str(err).splitlines()[0][:300]}") from None
        raise
    if first is None:
        return ds, None, None
    column = corpus.field or ("input_ids" if "input_ids" in first else "text")
    if column not in first:
        raise InputError(f"dataset {name!r} has no column {column!r} (it has: {', '.join(sorted(first))}); "
                         "choose one with --field")
    return ds, column, itertools.chain([first], rows)


def _dataset_rows(corpus: Corpus) -> Iterator[str | list[int]]:
    _, column, rows = _open_dataset(corpus, streaming=True)
    if rows is None:
        return
    name = corpus.source + (f":{corpus.config}" if corpus.config else "")
    for row in rows:
        yield _document(row[column], f"column {column!r} of {name!r}")


def _as_dataset(corpus: Corpus, streaming: bool):
    """The corpus's rows as a ``datasets`` object, so that the papers' shuffles apply to it: ``(ds, column)``."""
    if corpus.kind == "dataset":
        ds, column, rows = _open_dataset(corpus, streaming)
        return (ds, column) if rows is not None else (None, None)
    import datasets

    first = next(documents(corpus), None)
    if first is None:
        return None, None
    column = "text" if isinstance(first, str) else "input_ids"

    def rows():  # a fresh pass each time datasets asks
        for doc in documents(corpus):
            if isinstance(doc, str) != (column == "text"):
                raise InputError(f"the corpus {corpus.describe()} mixes text and token ids")
            yield {column: doc}

    if streaming:
        return datasets.IterableDataset.from_generator(rows), column
    return datasets.Dataset.from_list(list(rows())), column


def _sampled(corpus: Corpus) -> Iterator[list[str | list[int]]]:
    """The corpus's rows as its :class:`Sampling` orders them, in groups joined before chunking.

    Each group holds one row, except under ``owt-eval``, whose groups are the batches of rows that
    ``prepare_dataset.py`` joins and chunks on their own.
    """
    s = corpus.sampling
    if s.method in ("stream", "first-tokens") and s.seed is None:  # the corpus's own order: no dataset needed
        docs = documents(corpus)
        for doc in (itertools.islice(docs, s.rows) if s.rows else docs):
            yield [doc]
        return
    what = f"column of {corpus.describe()}"
    if s.method in ("stream", "first-tokens"):  # load_dataset.py, lines 59-60: shuffle(seed=42).take(N), streamed
        ds, column = _as_dataset(corpus, streaming=True)
        if ds is None:
            return
        ds = ds.shuffle(seed=s.seed, buffer_size=SHUFFLE_BUFFER)
        if s.rows:
            ds = ds.take(s.rows)
        for row in ds:
            yield [_document(row[column], what)]
    elif s.method == "pile-eval":  # pile_eval.py, lines 31-47
        ds, column = _as_dataset(corpus, streaming=s.streaming)
        if ds is None:
            return
        seed = 42 if s.seed is None else s.seed
        if s.streaming:
            if s.rows:
                ds = ds.take(s.rows)
            ds = ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        else:
            if s.rows and s.rows < len(ds):
                ds = ds.shuffle(seed=seed).select(range(s.rows))
            ds = ds.shuffle(seed=seed)
        for row in ds:
            if s.skip_sets and isinstance(row.get("meta"), dict) and row["meta"].get("pile_set_name") in s.skip_sets:
                continue
            yield [_document(row[column], what)]
    else:  # owt-eval: prepare_dataset.py, lines 16-50
        ds, column = _as_dataset(corpus, streaming=False)
        if ds is None:
            return
        test = ds.train_test_split(test_size=s.test_size, seed=s.split_seed, shuffle=True)["test"]
        shards = min(s.shards, len(test))  # datasets' map never uses more processes than rows
        for index in range(shards):
            shard = test.shard(num_shards=shards, index=index, contiguous=True)
            for start in range(0, len(shard), s.batch_rows):
                yield [_document(v, what) for v in shard[start:start + s.batch_rows][column]]


@dataclass(frozen=True)
class Chunks:
    """A corpus cut into sequences, on disk: ``n`` rows of ``seq_len`` token ids."""

    path: Path
    n: int
    seq_len: int
    bos: bool
    documents: int
    """Documents read (all of them, unless the budget stopped the reading early)."""
    exhausted: bool
    """True when the corpus ran out before the budget did."""
    skipped: int = 0
    """Rows too short for a sequence (``first-tokens`` sampling), left out."""

    def tokens(self) -> np.ndarray:
        """``(n, seq_len)`` token ids, memory-mapped."""
        if self.n == 0:
            return np.zeros((0, self.seq_len), dtype=np.uint32)
        return np.memmap(self.path, dtype=np.uint32, mode="r", shape=(self.n, self.seq_len))

    @classmethod
    def load(cls, meta_path: Path) -> "Chunks":
        meta = json.loads(meta_path.read_text())
        return cls(meta_path.parent / meta["file"], meta["n"], meta["seq_len"], meta["bos"], meta["documents"],
                   meta["exhausted"], meta.get("skipped", 0))


@contextlib.contextmanager
def _removed_on_failure(path: Path):
    """A partial file is removed when its writing fails (a bad row, Ctrl-C), so nothing half-made stays behind."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def prepare_chunks(corpus: Corpus, tokenizer, directory: Path, seq_len: int, *, bos: bool = False,
                   max_tokens: int | None = None, eot_id: int = 50256, d_vocab: int = 50257) -> Chunks:
    """Tokenise ``corpus`` into ``directory/chunks.u32`` (once: an existing complete file is reused).

    ``max_tokens`` caps the tokens analysed (whole sequences only); reading stops as
    soon as the budget is met, so a large dataset is never read to its end.
    """
    if seq_len < 2:
        raise InputError(f"--seq-len {seq_len} is too short: a sequence needs at least 2 tokens")
    if max_tokens is not None and max_tokens < seq_len:
        raise InputError(f"the budget of {max_tokens} tokens is smaller than one sequence of {seq_len}: "
                         f"raise --max-tokens to at least {seq_len}")
    sampling = corpus.sampling
    body = seq_len - 1 if bos else seq_len
    cut = sampling.chunk or body
    if cut < body:
        raise InputError(f"--chunk {cut} is shorter than a sequence of {seq_len} tokens")
    meta_path = directory / "chunks.json"
    if meta_path.exists():
        return Chunks.load(meta_path)
    directory.mkdir(parents=True, exist_ok=True)
    limit = None if max_tokens is None else max_tokens // seq_len
    if sampling.method == "pile-eval" and sampling.rows:  # pile_eval.py, line 76: at most num_samples chunks
        limit = sampling.rows if limit is None else min(limit, sampling.rows)
    tmp = directory / "chunks.u32.partial"
    n, docs, content, skipped, stream, exhausted = 0, 0, 0, 0, [], True

    def token_ids(doc, eot: bool) -> list[int]:
        nonlocal content
        if isinstance(doc, str):
            ids = tokenizer.encode(doc, add_special_tokens=False).ids
            content += len(ids)
            return ids + [eot_id] if eot else ids
        if doc and (min(doc) < 0 or max(doc) >= d_vocab):
            raise InputError(f"document {docs} holds token ids outside the vocabulary of {d_vocab}")
        content += len(doc)
        return list(doc)

    try:
        out = open(tmp, "wb")
    except OSError as err:
        raise InputError(f"cannot write the study's chunks ({err.strerror})") from None
    with out, _removed_on_failure(tmp):
        for group in _sampled(corpus):
            if sampling.method == "first-tokens":  # each row on its own, its first tokens only, no EOT
                docs += 1
                ids = token_ids(group[0], eot=False)
                if len(ids) < body:
                    skipped += 1
                else:
                    out.write(np.asarray(([eot_id] if bos else []) + ids[:body], dtype=np.uint32).tobytes())
                    n += 1
            else:
                if sampling.method == "owt-eval":  # each batch of rows is chunked on its own
                    stream = []
                for doc in group:
                    docs += 1
                    stream.extend(token_ids(doc, eot=True))
                while len(stream) >= cut and (limit is None or n < limit):
                    row = ([eot_id] if bos else []) + stream[:body]  # a chunk's first tokens
                    del stream[:cut]
                    out.write(np.asarray(row, dtype=np.uint32).tobytes())
                    n += 1
            if limit is not None and n >= limit:
                exhausted = False
                break
    if n == 0:
        tmp.unlink()
        if content == 0:
            raise InputError(f"the corpus ({corpus.describe()}) is empty")
        if sampling.method == "first-tokens":
            raise InputError(f"every row of the corpus ({corpus.describe()}) is shorter than {body} tokens: "
                             "lower --seq-len")
        raise InputError(f"the corpus ({corpus.describe()}) holds {content} tokens, fewer than one sequence "
                         f"of {cut}: lower --seq-len or add text")
    final = directory / "chunks.u32"
    tmp.replace(final)
    meta = {"file": final.name, "n": n, "seq_len": seq_len, "bos": bos, "documents": docs, "exhausted": exhausted,
            "skipped": skipped}
    meta_path.write_text(json.dumps(meta))
    return Chunks(final, n, seq_len, bos, docs, exhausted, skipped)
