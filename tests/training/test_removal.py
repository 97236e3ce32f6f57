"""LayerNorm removal by fine-tuning: the schedule, the exact full-vocabulary loss, the published output format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from checkpoints import hf_model
from helpers import PROMPTS
from noln_core import compare, direct_logit_attribution, load_model, tokenize
from noln_core.analyses import exactness_tolerance
from noln_core.cli import main
from noln_core.training.removal import Schedule, TrainableGPT2, TrainConfig, remove_layernorm, train

STEPS = 60


@pytest.fixture(scope="module")
def tokens(ln_model) -> np.ndarray:
    text = " ".join(PROMPTS * 40)
    return np.array(tokenize(ln_model, text, prepend_bos=False), dtype=np.int64)


@pytest.fixture(scope="module")
def removed(tmp_path_factory, ln_dir, tokens):
    out = tmp_path_factory.mktemp("removed") / "tiny-removed"
    cfg = TrainConfig(steps=STEPS, batch=4, block=32, lr=1e-3, warmup=5, checkpoint_every=20)
    remove_layernorm(ln_dir, tokens, out, steps=STEPS, cfg=cfg)
    return out


def test_trainable_model_matches_hf(ln_dir):
    model = TrainableGPT2.from_pretrained(ln_dir).eval()
    ids = torch.tensor([tokenize(load_model(str(ln_dir), device="cpu"), PROMPTS[0])])
    with torch.no_grad():
        ours, _ = model(ids)
        ref = hf_model(ln_dir)(ids).logits
    assert torch.allclose(ours, ref, atol=1e-4)


def test_dropped_rows_give_the_exact_full_vocabulary_loss(tmp_path):
    """Zero embedding rows have logit 0: logsumexp(kept, log n_dropped) is the full softmax, as HF computes it."""
    config = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, eos_token_id=50256)
    keep = torch.arange(0, 50257, 7)
    model = TrainableGPT2(config, keep=torch.cat([keep, torch.tensor([50256])]))
    model.init_weights(0, std=0.3)
    model.save_pretrained(tmp_path / "m", ln_free=False, half=False)
    batch = keep[torch.randint(0, len(keep), (2, 20))]
    batch[0, 3] = 50255  # a dropped token as a target: its logit is 0
    with torch.no_grad():
        logits, _ = model(batch[:, :-1])
        ours = model.loss(logits, batch[:, 1:])
        ref = torch.nn.functional.cross_entropy(hf_model(tmp_path / "m")(batch[:, :-1]).logits.reshape(-1, 50257),
                                                batch[:, 1:].reshape(-1))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-4)
    reloaded = TrainableGPT2.from_pretrained(tmp_path / "m")
    assert reloaded.n_dropped == model.n_dropped


def test_schedule_follows_the_papers_order():
    s = Schedule.for_model(12, 300)
    assert (s.mlp_start, s.qk_start, s.v_start, s.lnf_start, s.gap) == (20, 44, 68, 104, 2)
    events = s.events(12)
    order = [what for step in sorted(events) for what, _ in events[step]]
    assert order.index("ln_2") < order.index("ln_1.qk") < order.index("ln_1.v") < order.index("ln_f")
    assert [step for step in sorted(events) if ("ln_2", 1) in events[step]] == [22]
    assert s.lnf_start < s.special_until < 299
    with pytest.raises(ValueError, match="too few"):
        Schedule.for_model(12, 30)


def test_fine_tuning_removes_every_layernorm(removed, ln_dir):
    log = [json.loads(line) for line in (removed / "_training" / "loss_log.jsonl").read_text().splitlines()]
    assert len(log) == STEPS and all(np.isfinite(e["loss"]) for e in log)
    removed_events = [r for e in log for r in e["removed"]]
    assert sum(r.startswith("ln_2") for r in removed_events) == 3 and "ln_f" in removed_events
    assert "special-sigma-merged" in removed_events
    assert any(e["aux"] > 0 for e in log) and all(e["aux"] == 0 for e in log if e["step"] > 21)


def test_output_loads_back_ln_free_and_exact(removed, tokens):
    model = load_model(str(removed), device="cpu")
    assert model.ln_free and model.info.eps == 1e12
    config = json.loads((removed / "config.json").read_text())
    assert config["layer_norm_epsilon"] == 1e12
    result = compare(model, PROMPTS[0], " Mary", " John")
    dla = direct_logit_attribution(result)[0]
    assert dla.exact and dla.error <= exactness_tolerance(dla.logit_diff)


def test_output_computes_what_training_ended_with(removed, ln_dir, tokens):
    """The written checkpoint (weight x1e6/sigma, eps 1e12) equals the fine-tuned model with every LN fake."""
    state = torch.load(removed / "_training" / "checkpoint.pt", weights_only=False)
    trained = TrainableGPT2.from_pretrained(ln_dir)
    trained.load_state_dict(state["model"])
    for ln, flags in zip(trained.layer_norms(), state["fake"]):
        ln.fake, ln.special = dict(flags["fake"]), flags["special"]
    assert all(all(ln.fake.values()) and not ln.special for ln in trained.layer_norms())
    trained.eval()
    ids = torch.tensor([[50256] + list(tokens[:40])])
    with torch.no_grad():
        expected, _ = trained(ids)
        ours = load_model(str(removed), device="cpu").forward(ids)
        theirs = hf_model(removed)(ids).logits
    # The large matrices are stored in float16, so the written model differs from training by that rounding only.
    assert torch.allclose(ours, expected, atol=2e-2)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_training_resumes_from_its_checkpoint(tmp_path, ln_dir, tokens):
    model = TrainableGPT2.from_pretrained(ln_dir)
    cfg = TrainConfig(steps=6, batch=2, block=16, checkpoint_every=3)
    train(model, tokens, TrainConfig(**{**cfg.__dict__, "steps": 3}), tmp_path)
    fresh = TrainableGPT2.from_pretrained(ln_dir)
    log = train(fresh, tokens, cfg, tmp_path)
    assert [e["step"] for e in log] == [3, 4, 5]
    lines = (tmp_path / "loss_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(6))


def test_cli_remove_ln(tmp_path, capsys, ln_dir, tokens):
    data = tmp_path / "data.txt"
    data.write_text(" ".join(PROMPTS * 40))
    code = main(["remove-ln", "--base", str(ln_dir), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--steps", "40", "--batch", "2", "--block", "16"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["ln_free"] is True and "remove LN" in err
    assert load_model(str(tmp_path / "out"), device="cpu").ln_free


@pytest.mark.parametrize("args, message", [
    (["--base", "/nope", "--data", "x", "--out", "y"], "is not a directory"),
    (["--data", "/nope.txt", "--out", "y"], "is not a file"),
    (["--steps", "5"], "too few"),
])
def test_cli_remove_ln_errors(tmp_path, capsys, ln_dir, args, message):
    data = tmp_path / "data.txt"
    data.write_text(" ".join(PROMPTS * 40))
    base = ["--base", str(ln_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    merged = dict(zip(base[::2], base[1::2]))
    merged.update(dict(zip(args[::2], args[1::2])))
    code = main(["remove-ln", *[x for kv in merged.items() for x in kv]])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_refuses_an_ln_free_base(tmp_path, capsys, noln_dir):
    data = tmp_path / "data.txt"
    data.write_text(" ".join(PROMPTS * 40))
    code = main(["remove-ln", "--base", str(noln_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    assert code == 2 and "already LN-free" in capsys.readouterr().err
