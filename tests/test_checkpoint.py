"""Checkpoints on disk: every bad config, tensor set or weights file is refused fast with one line, before reading."""

from __future__ import annotations

import json
import pickle
import time
import warnings

import pytest
import torch

from checkpoints import neutralise, random_gpt2, save, write_config
from noln_core import CorruptCheckpointError, NotGPT2Error, UnsafeCheckpointError, load_model
from noln_core.checkpoint import (
    LN_FREE_MIN_EPS, TRICK_EPS, TRICK_SCALE, Checkpoint, check_fits, read_config, validate_config, write_checkpoint,
)


@pytest.fixture
def tiny(tmp_path, ln_dir):
    """A fresh copy of the tiny checkpoint that a test may damage."""
    target = tmp_path / "tiny"
    target.mkdir()
    for f in ln_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


@pytest.mark.parametrize("change, message", [
    ({"n_layer": 0}, "n_layer = 0, outside 1..1,024"),
    ({"n_layer": -1}, "n_layer = -1"),
    ({"n_head": 0}, "n_head = 0"),
    ({"n_layer": 1_000_000_000}, "n_layer = 1000000000"),
    ({"n_embd": "48"}, "n_embd must be a whole number, not '48' (str)"),
    ({"n_layer": True}, "n_layer must be a whole number"),
    ({"n_embd": 50}, "n_embd=50 is not divisible by n_head=4"),
    ({"layer_norm_epsilon": "abc"}, "layer_norm_epsilon must be a positive number, not 'abc'"),
    ({"layer_norm_epsilon": -1.0}, "layer_norm_epsilon must be a positive number"),
    ({"vocab_size": None}, "vocab_size must be a whole number, not missing"),
])
def test_degenerate_configs_get_one_clear_line(tiny, change, message):
    write_config(tiny, **change)
    started = time.perf_counter()
    with pytest.raises(CorruptCheckpointError) as err:
        load_model(str(tiny), device="cpu")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - started < 30  # refused before anything large is built (a generous bound: no hang)


def test_absurd_layer_count_fails_before_reading_weights(tiny, monkeypatch):
    """A config declaring more layers than the file holds is refused from the headers alone."""
    write_config(tiny, n_layer=500)
    reads = []
    monkeypatch.setattr(Checkpoint, "get", lambda self, key, out=None: reads.append(key))
    with pytest.raises(CorruptCheckpointError, match="declares 500 layers but the weights hold 3"):
        load_model(str(tiny), device="cpu")
    assert reads == []


def test_a_model_larger_than_free_memory_is_refused_at_once(tiny):
    config = read_config(tiny, "tiny")
    with pytest.raises(CorruptCheckpointError, match=r"needs about .* GB to load .* only 0.0 GB of memory is free"):
        check_fits(config, "tiny", free=1000)
    assert check_fits(config, "tiny", free=10**12) == config.n_parameters() * 4


def test_parameter_count_matches_transformers():
    model = random_gpt2(seed=0)
    config = validate_config(model.config.to_dict(), "tiny")
    assert config.n_parameters() == sum(p.numel() for p in model.parameters())


def test_other_architectures_are_named(tiny):
    write_config(tiny, model_type="llama", activation_function="gelu_new")
    with pytest.raises(NotGPT2Error, match="'llama'"):
        load_model(str(tiny), device="cpu")


def test_a_pickled_object_is_refused_without_suggesting_to_unlock_it(tiny, capfd):
    """A .bin holding executable objects: say so, never advise weights_only=False, keep torch's warning quiet."""
    (tiny / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tiny / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": Payload()}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning torch lets through would fail here
        with pytest.raises(UnsafeCheckpointError) as err:
            load_model(str(tiny), device="cpu")
    message = str(err.value)
    assert "executable Python objects" in message and "will not be loaded" in message
    assert "weights_only" not in message and "corrupt" not in message
    out = capfd.readouterr()
    assert "pwned" not in out.out + out.err and "weights_only" not in out.err


def test_a_checkpoint_saved_mid_removal_is_refused(tiny):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny / "model.safetensors"))
    tensors["transformer.h.0.ln_1.average_std_buffer"] = torch.ones(48)
    tensors["transformer.h.0.ln_1.is_fake"] = torch.tensor([1.0])
    save_file(tensors, str(tiny / "model.safetensors"))
    with pytest.raises(CorruptCheckpointError, match=r"saved mid-removal by the papers' training code .*average_std_buffer"):
        load_model(str(tiny), device="cpu")


@pytest.mark.parametrize("which", ["ln_f", "h.2.ln_2", "h.0.ln_1"])
def test_every_layernorm_is_checked_for_the_trick(tmp_path, which):
    """eps 1e12 with one LayerNorm left unscaled is not the LN-free trick there: load, and name it."""
    model = neutralise(random_gpt2(seed=2))
    module = model.transformer
    for part in which.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    with torch.no_grad():
        module.weight.div_(TRICK_SCALE)
    loaded = load_model(str(save(model, tmp_path / "odd")), device="cpu")
    assert loaded.ln_free
    warning = next(w for w in loaded.info.warnings if "not the LN-free trick" in w)
    assert f"first: {which}" in warning


def test_a_large_deviation_of_the_stored_model_is_flagged_at_load(tmp_path):
    """With eps only 1e6 and a large residual stream, the stored LNs are not close to the identity: warn at load."""
    model = random_gpt2(seed=3)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(3000)
        for block in model.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.mul_(1e3)
                ln.bias.zero_()
        model.transformer.ln_f.weight.mul_(1e3)
    model.config.layer_norm_epsilon = LN_FREE_MIN_EPS
    loaded = load_model(str(save(model, tmp_path / "loose")), device="cpu")
    assert loaded.ln_free and any("deviates from the exact LN-free model by" in w for w in loaded.info.warnings)
    exact = load_model(str(save(neutralise(random_gpt2(seed=3)), tmp_path / "tight")), device="cpu")
    assert not [w for w in exact.info.warnings if "deviates" in w]


def test_writer_round_trips_through_the_reader(tmp_path, ln_dir):
    ckpt = Checkpoint(ln_dir, "tiny")
    config = json.loads((ln_dir / "config.json").read_text())
    state = {f"transformer.{k}": ckpt.get(k) for k in ckpt.keys()}
    out = write_checkpoint(tmp_path / "copy", state, {**config, "layer_norm_epsilon": TRICK_EPS})
    back = Checkpoint(out, "copy")
    assert sorted(back.keys()) == sorted(ckpt.keys())
    assert all(torch.equal(back.get(k), ckpt.get(k).float()) for k in ckpt.keys())
    assert read_config(out, "copy").ln_free
