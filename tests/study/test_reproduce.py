"""``study --reproduce NAME``: each of the papers' figures, run offline on tiny checkpoints laid out as the hub's
models and with the dataset reader mocked, chooses the papers' settings and the papers' sequences."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

import papers
from checkpoints import neutralise, random_gpt2, save
from noln_core.cli import main
from noln_core.corpus import parse_corpus, prepare_chunks
from noln_core.tokenizer import gpt2_tokenizer
from noln_core.study.published import FIGURES, OPENWEBTEXT, PILE, PILE_10K, PILE_FILTERED, SIZES

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# The settings of the papers' scripts, transcribed from submarat/removing-layer-norm at 583a9e6 (file: lines).
SCRIPTS = {
    # mech_interp/attention_head_attribution/run_analysis.py, lines 24-34: luca-pile, 512 tokens, 1000 samples, no BOS;
    # mech_interp/load_dataset.py, lines 10, 59-60: lucabaroni/apollo-pile-filtered-10k, streamed, shuffle(seed=42).
    "nmae": dict(dataset=PILE_FILTERED, method="first-tokens", rows=1000, seed=42, seq_len=512, bos=False),
    # mech_interp/run_inference.py, lines 188-196: the same loader, 1000 samples of 512 tokens, no BOS.
    "entropy-ece": dict(dataset=PILE_FILTERED, method="first-tokens", rows=1000, seed=42, seq_len=512, bos=False),
    # residual_norms.py reads run_inference.py's sequences (line 39); only position 0 enters the figure.
    "norms": dict(dataset=PILE_FILTERED, method="first-tokens", rows=1000, seed=42, seq_len=512, bos=False),
    # sink_rate.py, lines 176 and 189: pile-apollo-luca, 1000 samples, chunks of 1024 cut to 512.
    "sinks": dict(dataset=PILE_FILTERED, method="pile-eval", rows=1000, seed=42, chunk=1024, streaming=False,
                  seq_len=512, bos=False),
    # eval_pile.py, line 19 (-n 10000), pile_eval.py, lines 32-38, 47, 74-84; eval_all.sh: -d pile-apollo[-luca].
    "ce-pile": dict(dataset=PILE, method="pile-eval", rows=10_000, seed=42, chunk=1024, streaming=True, seq_len=1024,
                    bos=False),
    "ce-pile-filtered": dict(dataset=PILE_FILTERED, method="pile-eval", rows=10_000, seed=42, chunk=1024,
                             streaming=False, seq_len=1024, bos=False),
    # entropy_neurons/ablate_all_models.py, lines 44-50: DataLoader("luca-pile", max_context=512, num_samples=250,
    # prepend_bos=False), which load_dataset.py (lines 59-60, 72-82) reads as shuffle(seed=42).take(250).
    "neurons": dict(dataset=PILE_FILTERED, method="first-tokens", rows=250, seed=42, seq_len=512, bos=False),
    # eval_lora.py, lines 68-77: preprocess_pile_dataset("pile-10k", num_samples=10000), pile_eval.py lines 42-91.
    "pile10k": dict(dataset=PILE_10K, method="pile-eval", rows=10_000, seed=42, chunk=1024, streaming=False,
                    skip_sets=("OpenWebText2", "Books3", "BookCorpus2"), seq_len=1024, bos=False),
    # prepare_dataset.py, lines 17-50: test_size 0.0005, seed 2357, batches of 512, num_proc 32, chunks of 1024.
    "ce-owt": dict(dataset=OPENWEBTEXT, method="owt-eval", test_size=0.0005, split_seed=2357, shards=32,
                   batch_rows=512, chunk=1024, seq_len=1024, bos=False),
}


def _script(name: str) -> dict:
    if name.startswith("ce-"):
        return SCRIPTS["ce-" + name.split("-", 2)[2]]
    return SCRIPTS[name.rsplit("-", 1)[0]]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Every figure's model ids as the hub cache holds them (tiny 1024-position checkpoints), and the papers'
    datasets behind a mocked ``datasets.load_dataset``."""
    import datasets
    import huggingface_hub

    root = tmp_path_factory.mktemp("reproduce")
    tiny = dict(n_positions=1024)
    dirs = [save(random_gpt2(seed=1, **tiny), root / "orig"), save(random_gpt2(seed=2, **tiny), root / "vanilla"),
            save(neutralise(random_gpt2(seed=1, **tiny)), root / "noln")]
    cache = root / "hub"
    for models in SIZES.values():
        for repo, directory in zip(models, dirs):
            storage = cache / ("models--" + repo.replace("/", "--"))
            (storage / "snapshots" / COMMIT).mkdir(parents=True)
            for f in directory.iterdir():
                (storage / "snapshots" / COMMIT / f.name).symlink_to(f)
            (storage / "refs").mkdir()
            (storage / "refs" / "main").write_text(COMMIT)
    rng = np.random.default_rng(7)
    words = "light darkness water earth heaven firmament evening morning day night".split()
    rows = {
        PILE_FILTERED: [{"input_ids": rng.integers(0, 50000, size=int(rng.integers(700, 1400))).tolist()}
                        for _ in range(3)],
        PILE: [{"input_ids": rng.integers(0, 50000, size=1024).tolist()} for _ in range(2)],
        OPENWEBTEXT: [{"text": " ".join(rng.choice(words, size=1400))} for _ in range(40)],
        PILE_10K: [{"text": " ".join(rng.choice(words, size=900)),
                    "meta": {"pile_set_name": ["Pile-CC", "OpenWebText2", "Books3", "Github"][i % 4]}} for i in range(8)],
    }
    files = {}
    for name, data in rows.items():
        files[name] = root / f"{name.replace('/', '__')}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    real = datasets.load_dataset

    def load(name, config=None, split=None, streaming=False, **kw):
        return real("json", data_files={"train": str(files[name])}, split=split, streaming=streaming)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets, "load_dataset", load)
        yield {"files": files, "real": real, "root": root}


def _reference_chunks(figure, hub) -> list[list[int]]:
    """The sequences the figure's script reads from the mocked dataset, by the independent re-implementation."""
    real, path = hub["real"], str(hub["files"][figure.dataset])
    s = figure.sampling
    if s.method == "first-tokens":
        stream = real("json", data_files={"train": path}, split="train", streaming=True)
        return [r for r in papers.load_dataset_rows(stream, s.rows, figure.seq_len) if len(r) == figure.seq_len]
    if s.method == "pile-eval":
        ds = real("json", data_files={"train": path}, split="train", streaming=s.streaming)
        encode = None
        if figure.column == "text":
            tok = gpt2_tokenizer()
            encode = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
        return papers.sink_rate_inputs(papers.preprocess_pile_dataset(ds, s.rows, s.streaming, s.chunk, encode),
                                       figure.seq_len)
    tok = gpt2_tokenizer()
    ds = real("json", data_files={"train": path}, split="train")
    return papers.prepare_owt(ds, lambda t: tok.encode(t, add_special_tokens=False).ids, 50256)


def test_list_names_every_figure_with_its_source(capsys):
    assert main(["study", "--reproduce", "list"]) == 0
    out = capsys.readouterr().out
    for name, figure in FIGURES.items():
        assert name in out and figure.source.split()[0] in out
    assert {"ce-small-owt", "ce-xl-pile", "nmae-small", "nmae-medium", "entropy-ece-medium", "sinks-medium",
            "norms-small"} <= set(FIGURES)


def test_an_unknown_figure_gets_one_line(capsys):
    assert main(["study", "--reproduce", "nmae-huge"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown figure 'nmae-huge': `study --reproduce list` names them"


@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figure_runs_with_the_papers_settings_and_sequences(name, hub, capsys, tmp_path):
    figure = FIGURES[name]
    want = _script(name)
    # The preset itself against the scripts' constants.
    assert figure.dataset == want["dataset"] and figure.seq_len == want["seq_len"] and figure.bos == want["bos"]
    sampling = asdict(figure.sampling)
    assert {k: sampling[k] for k in want if k in sampling} == {k: v for k, v in want.items() if k in sampling}
    assert figure.models == SIZES[name.split("-")[1] if name.startswith("ce-") else name.split("-")[-1]]
    # The run: offline, every model from the (fake) hub cache, the dataset through the mocked reader.
    # The tiny checkpoints have 192 neurons a layer: the papers' neuron numbers are checked, then small ones run.
    extra = []
    if figure.neurons:
        assert figure.neurons == {"small": "584,2123,2870", "medium": "3144,1083,1108"}[name.split("-")[-1]]
        extra = ["--neurons", "3"]
    code = main(["study", "--reproduce", name, "--device", "cpu", "--batch", "2", "--bootstrap", "20",
                 "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "out"), *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [m["source"] for m in doc["models"]] == list(figure.models)
    assert doc["corpus_spec"]["source"] == figure.dataset
    assert doc["corpus_spec"]["sampling"] == json.loads(json.dumps(sampling))  # tuples are lists in JSON
    assert (doc["seq_len"], doc["bos"], doc["max_tokens"]) == (figure.seq_len, figure.bos, figure.max_tokens)
    assert set(figure.metrics) <= set(doc["settings"]["metrics"])
    if "nmae" in figure.metrics:
        assert doc["settings"]["nmae_target"] == "last-token" and doc["settings"]["value_bias"]["counted_in"] == "b_O"
    if figure.neurons:
        ablated = doc["neurons"]["models"]
        assert [m["neurons"] for m in ablated] == [[3]] * 3 and ablated[2]["ln_free"]
        assert doc["neurons"]["sequences"] == doc["n_sequences"]
        assert all(e["loss_via_ln"]["mean"] == 0 for e in ablated[2]["effects"])  # LN-free: exactly 0
        assert all(e["loss_via_ln"]["mean"] > 0 for e in ablated[0]["effects"])
    # The same sequences as the papers' own data loading, in the same order.
    corpus = parse_corpus(figure.dataset, figure.column, figure.split, sampling=figure.sampling)
    chunks = np.asarray(prepare_chunks(corpus, gpt2_tokenizer(), tmp_path / "chunks", figure.seq_len,
                                       max_tokens=figure.max_tokens).tokens()).tolist()
    assert chunks == _reference_chunks(figure, hub) and len(chunks) == doc["n_sequences"] >= 1
    # With the figure's settings, its published numbers stand beside the study's (and those of any figure measured
    # the same way: the CE of run_inference.py beside an NMAE run, say).
    md = (tmp_path / "out" / "study.md").read_text()
    assert (f"{name})*" in md) == bool(figure.published)
    assert f"--reproduce {name}`" not in md  # not listed among the figures whose settings differ


def test_any_changed_setting_withdraws_the_published_numbers(hub, capsys, tmp_path):
    code = main(["study", "--reproduce", "nmae-small", "--device", "cpu", "--seq-len", "256", "--bootstrap", "0",
                 "--state-dir", str(tmp_path / "state")])
    out, _ = capsys.readouterr()
    assert code == 0 and "*published:" not in out and "differs in seq len 256 (figure: 512)" in out
