"""GPT-2's byte-level BPE tokenizer: loading it, and turning text and tokens into ids and back.

Every model in the registry shares GPT-2's tokenizer.  A checkpoint's own
``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``) is used when it ships
one; fine-tunes that ship none get GPT-2's, bundled in
:data:`noln_core.paths.TOKENIZER_DIR`.  A ``tokenizers.Tokenizer`` is
immutable once built and safe to share between threads, so each set of files
is built once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import CorruptCheckpointError, InputError
from .paths import TOKENIZER_DIR

if TYPE_CHECKING:
    from .model import LoadedModel

GPT2_VOCAB_SIZE = 50257


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _tokenizer_from_files(files: tuple[tuple[str, int, int], ...]):
    """Build (once per set of files) a GPT-2 byte-level BPE tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    paths = [f[0] for f in files]
    if len(paths) == 1:
        return Tokenizer.from_file(paths[0])
    tok = Tokenizer(models.BPE.from_file(*paths))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id("<|endoftext|>") is not None:  # as GPT-2's own tokenizer treats it
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok


def load_tokenizer(directory: Path | None, vocab_size: int, name: str):
    """A ``tokenizers.Tokenizer`` from the checkpoint's files, else GPT-2's (all these models share it)."""
    candidates = [Path(directory)] if directory is not None else []
    for attempt in range(2):
        for folder in candidates:
            for files in (["tokenizer.json"], ["vocab.json", "merges.txt"]):
                if all((folder / f).is_file() for f in files):
                    try:
                        return _tokenizer_from_files(tuple(_file_key(folder / f) for f in files))
                    except Exception as err:  # tokenizers raises plain Exception subclasses
                        raise CorruptCheckpointError(f"{name}: {' and '.join(files)} unreadable ({err})") from err
        if attempt == 0:
            if vocab_size != GPT2_VOCAB_SIZE:
                break
            # No tokenizer files: fine-tunes often ship none.  They use GPT-2's own, which we ship.
            candidates = [TOKENIZER_DIR]
    raise CorruptCheckpointError(
        f"{name} ships no tokenizer (tokenizer.json, or vocab.json + merges.txt) and its vocabulary of {vocab_size} is "
        "not GPT-2's"
    )


def gpt2_tokenizer():
    """GPT-2's own tokenizer, from the bundled files."""
    return load_tokenizer(TOKENIZER_DIR, GPT2_VOCAB_SIZE, "GPT-2 tokenizer")


def decode_utf8(data: bytes, source: str) -> str:
    """Bytes from a file, stdin or an upload as text; one line saying where decoding failed otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{source} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start} cannot be decoded): "
            "save it as UTF-8 and try again"
        ) from None


def check_text(text: str, what: str = "the text") -> str:
    """``text`` if it can be tokenised; strings holding lone surrogates (undecodable bytes smuggled through the
    shell's or Python's error handlers) are refused with one line."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"{what} holds undecodable bytes (at character {err.start}): pass UTF-8 text"
        ) from None
    return text


def encode(tokenizer, text: str, bos: int | None = None) -> list[int]:
    """Token ids of ``text``, ``bos`` first when given."""
    check_text(text)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ([bos] if bos is not None else []) + list(ids)


def tokenize(model: "LoadedModel", text: str, prepend_bos: bool = True) -> list[int]:
    """Token ids of ``text`` with the model's tokenizer, BOS (``<|endoftext|>``) first if asked."""
    return encode(model.tokenizer, text, model.info.bos_token_id if prepend_bos else None)


def token_pieces(tokenizer, ids: Sequence[int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(decoded, pieces)`` for each id: its text alone and its byte-level BPE piece (``Ġ`` marks a space)."""
    decoded = tuple(tokenizer.decode_batch([[int(i)] for i in ids], skip_special_tokens=False)) if len(ids) else ()
    pieces = tuple(tokenizer.id_to_token(int(i)) or f"<{int(i)}>" for i in ids)
    return decoded, pieces


def decode_rows(tokenizer, rows: list[list[int]]) -> tuple[tuple[str, ...], ...]:
    """Each id of a (rows, k) table decoded on its own, in one batched call."""
    flat = tokenizer.decode_batch([[i] for row in rows for i in row], skip_special_tokens=False)
    k = len(rows[0]) if rows else 0
    return tuple(tuple(flat[r * k:(r + 1) * k]) for r in range(len(rows)))


def resolve_token(tokenizer, d_vocab: int, token: str | int, what: str) -> tuple[int, tuple[str, ...], list[str]]:
    """An answer/counterfactual as one token id: ``(id, pieces, warnings)``; several tokens use the first, with a warning."""
    warnings: list[str] = []
    if isinstance(token, int) and not isinstance(token, bool) or type(token).__module__ == "numpy" and hasattr(token, "__index__"):
        token = int(token)
        if not 0 <= token < d_vocab:
            raise InputError(f"{what} token id {token} is outside the vocabulary (0..{d_vocab - 1})")
        return token, (tokenizer.decode([token], skip_special_tokens=False),), warnings
    if not isinstance(token, str) or token == "":
        raise InputError(f"the {what} is empty: give a token such as ' Paris' (mind the leading space)")
    check_text(token, f"the {what}")
    ids = tokenizer.encode(token, add_special_tokens=False).ids
    if not ids:
        raise InputError(f"the {what} {token!r} produced no tokens")
    pieces = tuple(tokenizer.decode([i], skip_special_tokens=False) for i in ids)
    if len(ids) > 1:
        warnings.append(f"the {what} {token!r} is {len(ids)} tokens {list(pieces)}; its first token {pieces[0]!r} is used")
    return int(ids[0]), pieces, warnings
