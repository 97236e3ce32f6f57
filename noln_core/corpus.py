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

The chunks are written once to a file of token ids (memory-mapped, so memory
stays bounded whatever the corpus), which every process of a study then reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError
from .paths import DEMO_DIR
from .tokenizer import check_text, decode_utf8

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
    """The text itself, for ``kind == "text"``."""

    def describe(self) -> str:
        if self.kind == "text":
            return f"pasted text ({len(self.text or '')} characters)"
        if self.kind == "dataset":
            cfg = f":{self.config}" if self.config else ""
            return f"{self.source}{cfg} ({self.split}, column {self.field or 'text/input_ids'})"
        return {"demo": "the bundled held-out sample"}.get(self.kind, self.source)

    def identity(self) -> dict:
        """What makes two corpora the same for caching and resuming: contents, not names."""
        ident = {k: v for k, v in asdict(self).items() if k != "text"}
        if self.kind == "text":
            ident["sha256"] = hashlib.sha256((self.text or "").encode("utf-8", "surrogatepass")).hexdigest()
        elif self.kind in ("file", "jsonl", "demo", "dir"):
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


def parse_corpus(data: str, field: str | None = None, split: str = "train") -> Corpus:
    """The corpus ``--data`` names: an existing path, ``demo``, or a dataset ``name[:config]``."""
    data = (data or "").strip()
    if not data:
        raise InputError("no corpus: give --data a .txt file, a directory, a .jsonl file, 'demo' or a dataset name")
    if data == DEMO_CORPUS:
        return Corpus("demo", DEMO_CORPUS)
    path = Path(os.path.expanduser(data))
    if path.is_dir():
        return Corpus("dir", data)
    if path.is_file():
        return Corpus("jsonl", data, field=field or "text") if path.suffix == ".jsonl" else Corpus("file", data)
    if path.suffix in (".txt", ".jsonl", ".json") or data.startswith((".", "/", "~")):
        raise InputError(f"no such corpus file or directory: {data!r}")
    name, _, config = data.partition(":")
    if name.count("/") > 1 or not name.replace("/", "").replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InputError(f"{data!r} is neither a file nor a dataset name (owner/name[:config])")
    return Corpus("dataset", name, field=field, config=config or None, split=split or "train")


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
        yield from _jsonl(_path(corpus), "text")
    elif corpus.kind == "dir":
        for path in _files(corpus):
            yield _read_text(path)
    elif corpus.kind == "jsonl":
        yield from _jsonl(_path(corpus), corpus.field or "text")
    elif corpus.kind == "dataset":
        yield from _dataset_rows(corpus)
    else:
        raise InputError(f"unknown corpus kind {corpus.kind!r} (one of {', '.join(KINDS)})")


def _read_text(path: Path) -> str:
    return check_text(decode_utf8(path.read_bytes(), f"the corpus file {str(path)!r}"), f"the corpus file {str(path)!r}")


def _jsonl(path: Path, field: str) -> Iterator[str | list[int]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            line = decode_utf8(raw, f"line {number} of {str(path)!r}").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"line {number} of {str(path)!r} is not JSON ({err.msg})") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                raise InputError(f"line {number} of {str(path)!r} has no field {field!r} (it has: {keys}); "
                                 "choose one with --field")
            yield _document(row[field], f"field {field!r} on line {number} of {str(path)!r}")


def _document(value, what: str) -> str | list[int]:
    if isinstance(value, str):
        return check_text(value, what)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
        return [int(v) for v in value]
    raise InputError(f"{what} is neither text nor a list of token ids")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")


def _dataset_rows(corpus: Corpus) -> Iterator[str | list[int]]:
    try:
        import datasets
    except ImportError:
        raise InputError("reading a Hugging Face dataset needs the datasets package: pip install datasets") from None
    name = corpus.source + (f":{corpus.config}" if corpus.config else "")
    offline = _offline()
    try:
        # Offline, datasets finds an earlier download in its cache only when not streaming.
        ds = datasets.load_dataset(corpus.source, corpus.config, split=corpus.split, streaming=not offline)
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
        return
    column = corpus.field or ("input_ids" if "input_ids" in first else "text")
    if column not in first:
        raise InputError(f"dataset {name!r} has no column {column!r} (it has: {', '.join(sorted(first))}); "
                         "choose one with --field")
    yield _document(first[column], f"column {column!r} of {name!r}")
    for row in rows:
        yield _document(row[column], f"column {column!r} of {name!r}")


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

    def tokens(self) -> np.ndarray:
        """``(n, seq_len)`` token ids, memory-mapped."""
        if self.n == 0:
            return np.zeros((0, self.seq_len), dtype=np.uint32)
        return np.memmap(self.path, dtype=np.uint32, mode="r", shape=(self.n, self.seq_len))

    @classmethod
    def load(cls, meta_path: Path) -> "Chunks":
        meta = json.loads(meta_path.read_text())
        return cls(meta_path.parent / meta["file"], meta["n"], meta["seq_len"], meta["bos"], meta["documents"],
                   meta["exhausted"])


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
    meta_path = directory / "chunks.json"
    if meta_path.exists():
        return Chunks.load(meta_path)
    directory.mkdir(parents=True, exist_ok=True)
    limit = None if max_tokens is None else max_tokens // seq_len
    body = seq_len - 1 if bos else seq_len
    tmp = directory / "chunks.u32.partial"
    n, docs, content, stream, exhausted = 0, 0, 0, [], True
    with open(tmp, "wb") as out:
        for doc in documents(corpus):
            docs += 1
            if isinstance(doc, str):
                ids = tokenizer.encode(doc, add_special_tokens=False).ids
                content += len(ids)
                ids.append(eot_id)
            else:
                ids = doc
                if ids and (min(ids) < 0 or max(ids) >= d_vocab):
                    raise InputError(f"document {docs} holds token ids outside the vocabulary of {d_vocab}")
                content += len(ids)
            stream.extend(ids)
            while len(stream) >= body and (limit is None or n < limit):
                row = ([eot_id] if bos else []) + stream[:body]
                del stream[:body]
                out.write(np.asarray(row, dtype=np.uint32).tobytes())
                n += 1
            if limit is not None and n >= limit:
                exhausted = False
                break
    if n == 0:
        tmp.unlink()
        if content == 0:
            raise InputError(f"the corpus ({corpus.describe()}) is empty")
        raise InputError(f"the corpus ({corpus.describe()}) holds {content} tokens, fewer than one sequence "
                         f"of {seq_len}: lower --seq-len or add text")
    final = directory / "chunks.u32"
    tmp.replace(final)
    meta = {"file": final.name, "n": n, "seq_len": seq_len, "bos": bos, "documents": docs, "exhausted": exhausted}
    meta_path.write_text(json.dumps(meta))
    return Chunks(final, n, seq_len, bos, docs, exhausted)
