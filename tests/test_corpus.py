"""Corpus sources become the papers' chunks: documents joined by <|endoftext|>, no BOS, the rest dropped."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from noln_core.errors import InputError
from noln_core.corpus import Corpus, parse_corpus, prepare_chunks, text_corpus
from noln_core.tokenizer import gpt2_tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def chunks_of(tok, corpus, tmp_path, seq_len, **kw):
    return prepare_chunks(corpus, tok, tmp_path / "state", seq_len, **kw).tokens()


def test_documents_are_joined_by_eot_and_cut_without_bos(tok, tmp_path):
    docs = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void."]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    (folder / ".hidden").write_text("never read")
    stream = ids(tok, docs[0]) + [EOT] + ids(tok, docs[1]) + [EOT]
    rows = chunks_of(tok, parse_corpus(str(folder)), tmp_path, 7)
    n = len(stream) // 7
    assert rows.shape == (n, 7)
    assert rows.ravel().tolist() == stream[: n * 7]  # consecutive, the rest dropped, no BOS


def test_bos_puts_eot_first_with_seq_len_minus_one_tokens(tok, tmp_path):
    text = "Let there be light: and there was light. " * 5
    stream = ids(tok, text) + [EOT]
    rows = chunks_of(tok, text_corpus(text), tmp_path, 8, bos=True)
    assert (rows[:, 0] == EOT).all()
    assert rows[:, 1:].ravel().tolist() == stream[: rows.shape[0] * 7]


def test_budget_counts_whole_sequences(tok, tmp_path):
    text = "word " * 500
    rows = chunks_of(tok, text_corpus(text), tmp_path, 16, max_tokens=50)
    assert rows.shape == (3, 16)


def test_jsonl_field_and_pretokenised_rows(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"body": "one two three"}, {"body": "four five"}]) + "\n")
    rows = chunks_of(tok, parse_corpus(str(path), field="body"), tmp_path / "a", 3)
    assert rows.ravel().tolist() == (ids(tok, "one two three") + [EOT] + ids(tok, "four five") + [EOT])[:rows.size]
    pre = tmp_path / "pre.jsonl"
    pre.write_text("\n".join(json.dumps({"input_ids": r}) for r in [[1, 2, 3, 4], [5, 6, 7]]))
    rows = chunks_of(tok, parse_corpus(str(pre), field="input_ids"), tmp_path / "b", 3)
    assert rows.tolist() == [[1, 2, 3], [4, 5, 6]]  # used as they are: no EOT added


def test_existing_chunks_are_reused(tok, tmp_path):
    corpus = text_corpus("a b c d e f g h i j k l")
    first = prepare_chunks(corpus, tok, tmp_path, 4)
    (tmp_path / "chunks.u32").write_bytes(np.arange(first.n * 4, dtype=np.uint32).tobytes())
    assert prepare_chunks(corpus, tok, tmp_path, 4).tokens().ravel().tolist() == list(range(first.n * 4))


@pytest.mark.parametrize("setup, message", [
    (lambda p: text_corpus(""), r"is empty"),
    (lambda p: (p / "e.txt").write_bytes(b"\xff\xfe bad") and parse_corpus(str(p / "e.txt")), r"not UTF-8"),
    (lambda p: (p / "r.jsonl").write_text('{"text": "x"}\n') and parse_corpus(str(p / "r.jsonl"), field="body"),
     r"has no field 'body' \(it has: text\)"),
    (lambda p: text_corpus("short"), r"fewer than one sequence of 64"),
    (lambda p: parse_corpus(str(p / "missing.txt")), r"no such corpus file"),
    (lambda p: (p / "d").mkdir() or parse_corpus(str(p / "d")), r"holds no files"),
])
def test_bad_corpora_get_one_line(tok, tmp_path, setup, message):
    with pytest.raises(InputError, match=message) as err:
        prepare_chunks(setup(tmp_path), tok, tmp_path / "state", 64)
    assert "\n" not in str(err.value)


def test_budget_smaller_than_one_sequence(tok, tmp_path):
    with pytest.raises(InputError, match="smaller than one sequence of 64"):
        prepare_chunks(text_corpus("x " * 500), tok, tmp_path, 64, max_tokens=10)


def test_dataset_names_parse():
    c = parse_corpus("lucabaroni/apollo-pile-filtered-10k:default", split="test")
    assert (c.kind, c.source, c.config, c.split) == ("dataset", "lucabaroni/apollo-pile-filtered-10k", "default", "test")
    with pytest.raises(InputError, match="neither a file nor a dataset"):
        parse_corpus("not a/da/taset")


def fake_datasets_cache(tmp_path, repo: str, rows: list[dict]):
    """The datasets cache as an earlier online ``load_dataset(repo)`` leaves it (built offline, no network)."""
    import datasets

    src = tmp_path / "src.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    builder = datasets.load_dataset_builder("json", data_files={"train": str(src)}, cache_dir=str(tmp_path / "build"))
    builder.download_and_prepare()
    name = repo.split("/")[-1]
    target = tmp_path / "datasets" / repo.replace("/", "___") / "default" / "0.0.0" / "0"
    shutil.copytree(builder.cache_dir, target)
    (target / "json-train.arrow").rename(target / f"{name}-train.arrow")
    return tmp_path / "datasets"


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    import datasets

    def make(repo, rows):
        cache = fake_datasets_cache(tmp_path, repo, rows)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        return cache
    return make


def test_hub_dataset_is_read_from_the_cache_offline(tok, tmp_path, offline_datasets):
    offline_datasets("someone/tiny-pile", [{"text": "alpha beta gamma"}, {"text": "delta epsilon"}])
    rows = chunks_of(tok, parse_corpus("someone/tiny-pile"), tmp_path, 4)
    stream = ids(tok, "alpha beta gamma") + [EOT] + ids(tok, "delta epsilon") + [EOT]
    assert rows.ravel().tolist() == stream[: rows.size]


def test_pretokenised_hub_dataset_is_used_as_it_is(tok, tmp_path, offline_datasets):
    offline_datasets("someone/pretok", [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}])
    assert chunks_of(tok, parse_corpus("someone/pretok"), tmp_path, 3).tolist() == [[5, 6, 7], [8, 9, 10]]


def test_hub_dataset_errors_are_one_line(tok, tmp_path, offline_datasets):
    offline_datasets("someone/tiny-pile", [{"text": "alpha"}])
    with pytest.raises(InputError, match="not in the local cache and the hub is offline"):
        prepare_chunks(parse_corpus("someone/absent"), tok, tmp_path / "a", 4)
    with pytest.raises(InputError, match="no column 'body'"):
        prepare_chunks(parse_corpus("someone/tiny-pile", field="body"), tok, tmp_path / "b", 4)
    with pytest.raises(InputError, match="someone/tiny-pile.*split"):
        prepare_chunks(parse_corpus("someone/tiny-pile", split="test"), tok, tmp_path / "c", 4)


def test_corpus_identity_follows_contents(tmp_path):
    a, b = text_corpus("one"), text_corpus("two")
    assert a.identity() != b.identity() and a.identity() == text_corpus("one").identity()
    path = tmp_path / "t.txt"
    path.write_text("v1")
    before = Corpus("file", str(path)).identity()
    path.write_text("v2 longer")
    assert Corpus("file", str(path)).identity() != before


def test_online_dataset_errors_map_to_one_line(tok, tmp_path, monkeypatch):
    """Online (streaming), the hub's own exceptions become one line each; the reading asks for a stream."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def missing(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        raise DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(InputError, match="no dataset 'someone/typo:cfg' on the Hugging Face hub"):
        prepare_chunks(parse_corpus("someone/typo:cfg", split="validation"), tok, tmp_path, 4)
    assert calls == [("someone/typo", "cfg", "validation", True)]

    def rows(name, config=None, split=None, streaming=False):
        return iter([{"text": "alpha beta"}, {"text": "gamma"}])

    monkeypatch.setattr(datasets, "load_dataset", rows)
    got = prepare_chunks(parse_corpus("someone/ok"), tok, tmp_path / "ok", 2).tokens()
    assert got.ravel().tolist() == (ids(tok, "alpha beta") + [EOT] + ids(tok, "gamma") + [EOT])[: got.size]


# --- Sampling as the papers' scripts sample (their data loading re-implemented in tests/papers.py) ---------------

@pytest.fixture
def hub_datasets(tmp_path, monkeypatch):
    """``datasets.load_dataset(NAME, ...)`` reads local JSON rows instead of the hub (the dataset reader mocked);
    returns ``make(name, rows)`` and the untouched loader, for the reference."""
    import datasets

    real = datasets.load_dataset
    files: dict[str, str] = {}

    def load(name, config=None, split=None, streaming=False, **kw):
        if name not in files:
            return real(name, config, split=split, streaming=streaming, **kw)
        return real("json", data_files={"train": files[name]}, split=split, streaming=streaming)

    def make(name, rows):
        path = tmp_path / f"{name.replace('/', '__')}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[name] = str(path)
        return lambda streaming: real("json", data_files={"train": str(path)}, split="train", streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", load)
    return make


def _online(monkeypatch, online: bool):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", not online)
    if online:
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def _token_rows(n, rng, low=10, high=40):
    return [{"input_ids": rng.integers(0, 50000, size=int(rng.integers(low, high))).tolist()} for _ in range(n)]


@pytest.mark.parametrize("online", [True, False])
def test_first_tokens_are_load_dataset_py(tok, tmp_path, hub_datasets, monkeypatch, online):
    """mech_interp/load_dataset.py: shuffle(seed=42).take(R) of the stream, each row's first N tokens."""
    import papers

    from noln_core.corpus import Sampling

    _online(monkeypatch, online)
    reference = hub_datasets("someone/pile-filtered", _token_rows(2500, np.random.default_rng(0)))
    corpus = parse_corpus("someone/pile-filtered", sampling=Sampling("first-tokens", rows=1000, seed=42))
    got = chunks_of(tok, corpus, tmp_path, 8)
    assert got.tolist() == papers.load_dataset_rows(reference(True), 1000, 8)
    assert got[0].tolist() != reference(True).take(1).__iter__().__next__()["input_ids"][:8]  # it did shuffle


def test_first_tokens_skips_and_counts_short_rows(tok, tmp_path, hub_datasets):
    from noln_core.corpus import Sampling

    rows = [{"input_ids": list(range(1, 1 + n))} for n in (12, 3, 9, 2, 10)]
    hub_datasets("someone/short", rows)
    chunks = prepare_chunks(parse_corpus("someone/short", sampling=Sampling("first-tokens")), tok, tmp_path / "s", 8)
    assert chunks.tokens().tolist() == [list(range(1, 9))] * 3 and chunks.skipped == 2


@pytest.mark.parametrize("streaming", [False, True])
def test_pile_eval_is_pile_eval_py(tok, tmp_path, hub_datasets, monkeypatch, streaming):
    """pile_eval.py: permuted (read whole: shuffle, select R, shuffle) or streamed (take R, shuffle), joined,
    at most R chunks; sink_rate.py then analyses each chunk's first half."""
    import papers

    from noln_core.corpus import Sampling

    _online(monkeypatch, True)
    reference = hub_datasets("someone/pile", _token_rows(1500, np.random.default_rng(1)))
    expected = papers.preprocess_pile_dataset(reference(streaming) if streaming else reference(False), 900,
                                              streaming, block_size=32)
    sampling = Sampling("pile-eval", rows=900, seed=42, chunk=32, streaming=streaming)
    got = chunks_of(tok, parse_corpus("someone/pile", sampling=sampling), tmp_path / "a", 32)
    assert got.tolist() == expected and len(expected) < 900  # 900 rows of ~25 tokens: fewer chunks than rows
    halves = chunks_of(tok, parse_corpus("someone/pile", sampling=sampling), tmp_path / "b", 16)
    assert halves.tolist() == papers.sink_rate_inputs(expected, 16)


def test_owt_eval_is_prepare_dataset_py(tok, tmp_path, hub_datasets):
    """prepare_dataset.py: the test split, mapped in num_proc contiguous shards of batches, each batch joined with
    EOT and chunked on its own (the remainder of each batch dropped)."""
    import papers

    from noln_core.corpus import Sampling

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rng = np.random.default_rng(2)
    rows = [{"text": " ".join(rng.choice(words, size=int(rng.integers(3, 30))))} for _ in range(400)]
    reference = hub_datasets("someone/owt", rows)
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    expected = papers.prepare_owt(reference(False), encode, EOT, test_size=0.25, num_proc=3, batch_size=7, block=16)
    sampling = Sampling("owt-eval", test_size=0.25, shards=3, batch_rows=7, chunk=16)
    got = chunks_of(tok, parse_corpus("someone/owt", sampling=sampling), tmp_path, 16)
    assert got.tolist() == expected and len(expected) > 10


def test_seeded_shuffles_of_local_files_are_reproducible(tok, tmp_path):
    from noln_core.corpus import Sampling

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(50)))
    plain = chunks_of(tok, parse_corpus(str(path)), tmp_path / "p", 4)
    a = chunks_of(tok, parse_corpus(str(path), sampling=Sampling(seed=3)), tmp_path / "a", 4)
    b = chunks_of(tok, parse_corpus(str(path), sampling=Sampling(seed=3)), tmp_path / "b", 4)
    assert a.tolist() == b.tolist() and a.tolist() != plain.tolist() and sorted(a.ravel()) == sorted(plain.ravel())


def test_bad_samplings_get_one_line():
    from noln_core.corpus import Sampling

    for kwargs, message in (({"method": "random"}, "unknown sampling"), ({"rows": 0}, "--rows 0"),
                            ({"method": "first-tokens", "chunk": 8}, "--chunk applies")):
        with pytest.raises(InputError, match=message):
            Sampling(**kwargs)


def test_deeply_nested_json_and_a_failed_chunking_leave_one_line_and_no_partial_file(tok, tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n' + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(InputError, match="line 2 of .* is nested too deeply"):
        prepare_chunks(parse_corpus(str(deep)), tok, tmp_path / "a", 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": "word " * 50}) + "\n" for _ in range(20)) + "not json\n")
    with pytest.raises(InputError, match="line 21 .* is not JSON"):
        prepare_chunks(parse_corpus(str(bad)), tok, tmp_path / "b", 4)
    assert not list(tmp_path.rglob("*.partial"))
