"""Loading: local directories, the hub cache (offline), revisions, and a clear message for every bad source."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hub_errors

from checkpoints import neutralise, random_gpt2, save, write_config, write_tokenizer_json
from noln_core import (
    CorruptCheckpointError, ModelLoadError, NotGPT2Error, OfflineError, UnknownModelError, load_model,
)
from noln_core import loading

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(tmp_path, source_dir, repo="apollo-research/gpt2_noLN", revision="v4", commit=COMMIT):
    """Lay out ``source_dir`` as the hub cache would hold ``repo`` at ``revision`` (no network involved)."""
    storage = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    shutil.copytree(source_dir, snapshot)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / revision).write_text(commit)
    return tmp_path / "hub"


@pytest.fixture
def offline_cache(monkeypatch, tmp_path, noln_dir):
    cache = fake_hub_cache(tmp_path, noln_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_repo_revision_loads_from_the_cache(offline_cache):
    model = load_model("apollo-research/gpt2_noLN", revision="v4", device="cpu")
    assert model.ln_free and model.info.commit == COMMIT and model.info.revision == "v4"
    assert model.info.source == "apollo-research/gpt2_noLN"


def test_spec_with_revision_and_registry_default_revision(offline_cache):
    assert load_model("apollo-research/gpt2_noLN@v4", device="cpu").info.revision == "v4"
    # gpt2_noLN without a revision means v4, the registry's (and the repo's) default.
    assert load_model("apollo-research/gpt2_noLN", device="cpu").info.revision == "v4"


def test_uncached_revision_offline_says_how_to_predownload(offline_cache):
    with pytest.raises(OfflineError, match=r"not cached: pre-download .*hf download apollo-research/gpt2_noLN --revision v2"):
        load_model("apollo-research/gpt2_noLN@v2", device="cpu")


def test_unknown_repo_offline(offline_cache):
    with pytest.raises(OfflineError, match="local directory"):
        load_model("someone/not-a-model", device="cpu")


@pytest.mark.parametrize(
    "error, expected",
    [
        (hub_errors.RepositoryNotFoundError, r"no model 'someone/typo' on the Hugging Face hub"),
        (hub_errors.RevisionNotFoundError, r"has no revision 'v9'"),
        (hub_errors.GatedRepoError, r"is gated"),
    ],
)
def test_hub_errors_become_one_line(monkeypatch, error, expected):
    """The hub's own exception types (raised as snapshot_download raises them) map to actionable lines."""

    def refuse(*args, **kwargs):
        raise error("404 Client Error", response=_response(404))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(UnknownModelError, match=expected) as info:
        load_model("someone/typo", revision="v9" if "revision" in expected else None, device="cpu")
    assert "\n" not in str(info.value)


def _response(status):
    import httpx

    return httpx.Response(status, request=httpx.Request("GET", "https://hub.invalid/api"))


def test_incomplete_snapshot_is_reported(monkeypatch):
    def incomplete(*args, **kwargs):
        raise hub_errors.IncompleteSnapshotError("partial", snapshot_path="/nowhere")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    with pytest.raises(OfflineError, match="incomplete"):
        load_model("openai-community/gpt2", device="cpu")


def test_invalid_repo_id_is_refused_before_any_network_call(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("network was called"))
    for bad in ["bad id!!", "a/b/c/d", "owner/--x", "../../etc", "x" * 200]:
        with pytest.raises(ModelLoadError):
            load_model(bad, device="cpu")


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no directory"):
        load_model(str(tmp_path / "nope"), device="cpu")


def test_not_gpt2(tmp_path, ln_dir):
    target = tmp_path / "llama"
    shutil.copytree(ln_dir, target)
    write_config(target, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(NotGPT2Error, match="'llama' model; noLN Explorer analyses GPT-2-architecture"):
        load_model(str(target), device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "config", "shape", "nan"])
def test_corrupt_checkpoint(tmp_path, ln_dir, damage):
    target = tmp_path / "broken"
    shutil.copytree(ln_dir, target)
    weights = target / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "delete":
        weights.unlink()
    elif damage == "config":
        (target / "config.json").write_text("{not json")
    elif damage == "shape":
        write_config(target, n_embd=64, n_head=4)
    elif damage == "nan":
        from safetensors.torch import load_file, save_file

        sd = load_file(str(weights))
        sd["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
        save_file(sd, str(weights), metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError) as info:
        load_model(str(target), device="cpu")
    assert "\n" not in str(info.value)


def test_pytorch_bin_checkpoint_loads_with_weights_only(tmp_path, ln_dir, ln_model):
    target = tmp_path / "bin"
    model = random_gpt2(seed=1)
    target.mkdir()
    model.config.save_pretrained(target)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(ln_dir / f, target / f)
    loaded = load_model(str(target), device="cpu")
    assert torch.allclose(loaded.weights.W_QKV, ln_model.weights.W_QKV)


def test_tokenizer_json_is_used_when_present(tmp_path, ln_dir):
    target = tmp_path / "tj"
    shutil.copytree(ln_dir, target)
    write_tokenizer_json(target)
    (target / "vocab.json").unlink()
    (target / "merges.txt").unlink()
    model = load_model(str(target), device="cpu")
    assert model.tokenizer.encode("Hello world").ids == [15496, 995]


def test_no_tokenizer_and_foreign_vocab(tmp_path):
    target = save(random_gpt2(seed=3, vocab_size=1000), tmp_path / "small-vocab", tokenizer=False)
    with pytest.raises(CorruptCheckpointError, match="ships no tokenizer"):
        load_model(str(target), device="cpu")


def test_no_tokenizer_uses_the_bundled_gpt2_tokenizer(tmp_path, monkeypatch):
    """Fine-tunes often ship no tokenizer; GPT-2's own, shipped with noln_core, is used without any network."""
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("network was called"))
    target = save(random_gpt2(seed=3), tmp_path / "no-tok", tokenizer=False)
    model = load_model(str(target), device="cpu")
    assert model.tokenizer.encode(" Paris").ids == [6342]
    assert model.tokenizer.encode("<|endoftext|>").ids == [50256]


def test_revision_on_local_directory_is_refused(ln_dir):
    with pytest.raises(ModelLoadError, match="local directory"):
        load_model(str(ln_dir), revision="v4", device="cpu")


def test_local_directories_can_be_disabled(ln_dir):
    with pytest.raises(ModelLoadError, match="disabled"):
        load_model(str(ln_dir), device="cpu", allow_local=False)


def test_device_and_dtype_are_checked(ln_dir):
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(ln_dir), device="cpu", dtype="int8")
    with pytest.raises(ModelLoadError, match="unknown device"):
        load_model(str(ln_dir), device="toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load_model(str(ln_dir), device="cuda")


def test_auto_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert loading.resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert loading.resolve_device("auto").type == "cpu"


def test_mismatched_trick_is_flagged(tmp_path):
    """eps 1e12 with unscaled LN weights is not the LN-free trick: load, but warn."""
    model = random_gpt2(seed=2)
    model.config.layer_norm_epsilon = 1e12
    target = save(model, tmp_path / "odd")
    loaded = load_model(str(target), device="cpu")
    assert loaded.ln_free and any("is not the LN-free trick" in w for w in loaded.info.warnings)


def test_ln_free_output_loads_back(tmp_path):
    target = save(neutralise(random_gpt2(seed=5)), tmp_path / "n")
    assert json.loads((target / "config.json").read_text())["layer_norm_epsilon"] == 1e12
    assert load_model(str(target), device="cpu").ln_free


def test_bundled_tokenizer_is_gpt2s():
    from checkpoints import gpt2_tokenizer_files
    from noln_core.paths import TOKENIZER_DIR as BUNDLED_TOKENIZER

    encoder, merges = gpt2_tokenizer_files()
    assert (BUNDLED_TOKENIZER / "vocab.json").read_bytes() == encoder.read_bytes()
    assert (BUNDLED_TOKENIZER / "merges.txt").read_bytes() == merges.read_bytes()
