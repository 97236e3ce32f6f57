"""GPT-2's tokenizer: text in, ids out, and a clear line for input that is not text."""

from __future__ import annotations

import pytest

from helpers import hf_tokenizer
from noln_core import InputError
from noln_core.tokenizer import check_text, decode_utf8, encode, gpt2_tokenizer, resolve_token, token_pieces


def test_bundled_tokenizer_equals_transformers(ln_dir):
    ours, theirs = gpt2_tokenizer(), hf_tokenizer(str(ln_dir))
    for text in ["Hello world", " tabs\tand\x0cfeeds", "emoji 🙂 and ünïcödé", "<|endoftext|>x"]:
        assert encode(ours, text) == theirs.encode(text)


def test_undecodable_bytes_get_one_line_naming_the_encoding():
    with pytest.raises(InputError, match=r"stdin is not UTF-8 text \(byte 0xff at offset 0"):
        decode_utf8(b"\xff\xfe", "stdin")
    assert decode_utf8("héllo".encode(), "stdin") == "héllo"


def test_lone_surrogates_are_refused_before_the_tokenizer():
    smuggled = b"ok \xff".decode("utf-8", errors="surrogateescape")
    with pytest.raises(InputError, match="undecodable bytes"):
        check_text(smuggled)
    with pytest.raises(InputError, match="undecodable bytes"):
        encode(gpt2_tokenizer(), smuggled)


def test_pieces_and_multi_token_answers():
    tok = gpt2_tokenizer()
    assert token_pieces(tok, [995, 50256]) == ((" world", "<|endoftext|>"), ("Ġworld", "<|endoftext|>"))
    token_id, pieces, warnings = resolve_token(tok, 50257, " Maryanne", "answer")
    assert len(pieces) > 1 and token_id == encode(tok, pieces[0])[0] and "first token" in warnings[0]
    with pytest.raises(InputError, match="outside the vocabulary"):
        resolve_token(tok, 50257, 50257, "answer")
