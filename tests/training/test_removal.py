"""LayerNorm removal: the trainable model, the papers' method point by point, the published output format.

The divergences a review of the old ``removal.py`` found against
``submarat/removing-layer-norm`` (``train.py``, ``config.py``) each have a test here
that pins the papers' behaviour.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from checkpoints import hf_model
from helpers import PROMPTS
from noln_core import compare, direct_logit_attribution, load_model, tokenize
from noln_core.analyses import exactness_tolerance
from noln_core.corpus import parse_corpus, prepare_chunks, text_corpus
from noln_core.training import trainer
from noln_core.training.model import STD_EPS, FakeLayerNorm, TrainableGPT2
from noln_core.training.recipe import PRESETS, Recipe, Schedule, recipe
from noln_core.training.removal import finetune

TEXT = " ".join(PROMPTS * 40)
STEPS = 24


def tiny_recipe(**changes) -> Recipe:
    return recipe(**{**dict(steps=STEPS, batch=4, seq_len=32, lr=1e-3, warmup=2), **changes})


@pytest.fixture(scope="module")
def removed(tmp_path_factory, ln_dir):
    out = tmp_path_factory.mktemp("removed") / "tiny-removed"
    finetune(ln_dir, text_corpus(TEXT), out, tiny_recipe(), eval_every=8, checkpoint_every=8, device="cpu")
    return out


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "_training" / "loss_log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the trainable model


def test_trainable_model_matches_hf(ln_dir):
    model = TrainableGPT2.from_pretrained(ln_dir).eval()
    ids = torch.tensor([tokenize(load_model(str(ln_dir), device="cpu"), PROMPTS[0])])
    with torch.no_grad():
        ours = model(ids)
        ref = hf_model(ln_dir)(ids).logits
    assert torch.allclose(ours, ref, atol=1e-4)


def test_dropped_rows_give_the_exact_full_vocabulary_loss(tmp_path):
    """Zero embedding rows have logit 0: logsumexp(kept, log n_dropped) is the full softmax, as HF computes it."""
    config = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, eos_token_id=50256)
    keep = torch.arange(0, 50257, 7)
    model = TrainableGPT2(config, keep=torch.cat([keep, torch.tensor([50256])]))
    model.init_weights(0, std=0.3)
    model.save_pretrained(tmp_path / "m", ln_free=False)
    batch = keep[torch.randint(0, len(keep), (2, 20))]
    batch[0, 3] = 50255  # a dropped token as a target: its logit is 0
    with torch.no_grad():
        ours = model.loss(model(batch[:, :-1]), batch[:, 1:])
        ref = torch.nn.functional.cross_entropy(hf_model(tmp_path / "m")(batch[:, :-1]).logits.reshape(-1, 50257),
                                                batch[:, 1:].reshape(-1))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-4)
    assert TrainableGPT2.from_pretrained(tmp_path / "m").n_dropped == model.n_dropped


# --------------------------------------------------------------------------- presets: the papers' numbers


PAPERS = {  # shared/reference/PAPERS.md and config.py (*_aux) of submarat/removing-layer-norm
    "small": dict(layers=12, starts=(20, 44, 68, 104), gaps=(2, 2, 3), aux=0.1, lr=6e-4, min_lr=3e-4, steps=300),
    "medium": dict(layers=24, starts=(20, 68, 116, 188), gaps=(2, 2, 3), aux=0.1, lr=6e-4, min_lr=3e-4, steps=500),
    "large": dict(layers=36, starts=(30, 174, 318, 534), gaps=(4, 4, 6), aux=0.03, lr=3e-4, min_lr=4e-5, steps=600),
    "xl": dict(layers=48, starts=(50, 242, 434, 722), gaps=(4, 4, 6), aux=0.01, lr=1e-4, min_lr=2e-5, steps=800),
}


@pytest.mark.parametrize("name", PAPERS)
def test_each_preset_is_the_papers_recipe(name):
    paper, preset = PAPERS[name], PRESETS[name]
    s = preset.schedule(paper["layers"])
    assert (s.start_ln2, s.start_qk, s.start_v, s.start_lnf) == paper["starts"]
    assert (s.gap_ln2, s.gap_qk, s.gap_v) == paper["gaps"]
    assert (s.end_eot, s.end_bos) == (s.start_lnf + 2, s.start_lnf + 12)
    assert (preset.aux_lambda, preset.lr, preset.min_lr, preset.steps) == (paper["aux"], paper["lr"], paper["min_lr"],
                                                                          paper["steps"])
    assert preset.seq_len == 1024 and abs(preset.batch * preset.seq_len - 2**19) / 2**19 < 0.04
    assert preset.weight_decay == 0.01 and preset.lr_at(preset.steps - 1) >= preset.min_lr
    events = s.events(paper["layers"])
    last_v = max(step for step, what in events.items() if any(w == "ln_1.v" for w, _ in what))
    assert last_v == s.start_lnf - s.gap_v < s.start_lnf < preset.steps


def test_token_budgets_match_the_papers():
    assert PRESETS["small"].steps * PRESETS["small"].tokens_per_step() == pytest.approx(157e6, rel=0.01)
    assert PRESETS["xl"].steps * PRESETS["xl"].tokens_per_step() == pytest.approx(413e6, rel=0.01)
    assert PRESETS["large"].momentum == pytest.approx(0.9 ** (28 / 32)) and PRESETS["small"].momentum == 0.9


def test_gaps_are_per_phase_and_starts_per_size_not_scaled():
    """The old code scaled small's schedule (medium came out 33/105/177/249, one gap for every phase)."""
    medium = PRESETS["medium"].schedule(24)
    assert (medium.start_qk, medium.start_v, medium.start_lnf) == (68, 116, 188)
    events = medium.events(24)
    v_steps = sorted(step for step, what in events.items() if any(w == "ln_1.v" for w, _ in what))
    assert np.diff(v_steps).tolist() == [3] * 23
    qk_steps = sorted(step for step, what in events.items() if any(w == "ln_1.qk" for w, _ in what))
    assert np.diff(qk_steps).tolist() == [2] * 23


def test_flags_override_a_preset():
    r = recipe("small", steps=400, lr=3e-4)
    assert (r.steps, r.lr, r.preset, r.aux_lambda) == (400, 3e-4, "small", 0.1)
    assert r.min_lr == pytest.approx(1.5e-4)  # the preset's ratio of minimum to peak is kept
    with pytest.raises(ValueError, match="unknown preset"):
        recipe("tiny")
    with pytest.raises(ValueError, match="too few"):
        recipe("small", steps=100).schedule(12)


def test_fitted_schedule_for_other_budgets():
    s = Schedule.fitted(12, 300)
    assert (s.start_ln2, s.start_qk, s.start_v, s.start_lnf, s.end_eot, s.end_bos) == (20, 44, 68, 104, 106, 116)
    with pytest.raises(ValueError, match="too few"):
        Schedule.fitted(12, 30)


def test_learning_rate_is_the_papers_cosine_with_minimum():
    """transformers' cosine_with_min_lr: warm-up from 0, then down to min_lr (not 0.1 x peak)."""
    r = PRESETS["small"]
    assert r.lr_at(0) == 0 and r.lr_at(r.warmup) == pytest.approx(r.lr)
    assert r.lr_at(r.warmup // 2) == pytest.approx(r.lr * (r.warmup // 2) / r.warmup)
    assert r.lr_at(r.steps) == pytest.approx(3e-4)
    mid = r.warmup + (r.steps - r.warmup) // 2
    assert r.lr_at(mid) == pytest.approx((6e-4 + 3e-4) / 2, rel=0.01)
    large = PRESETS["large"]  # decays over its configuration's 1200 steps; the release is step 600
    assert large.lr_at(600) > large.min_lr + 0.4 * (large.lr - large.min_lr)


def test_weight_decay_as_the_released_code_decays_ln_gains_never_biases(ln_dir):
    """transformers' Trainer decays all but biases and nn.LayerNorm parameters; the released FakeLayerNorm is no
    nn.LayerNorm, so LN gains decay when removing LN (not in the with-LN control, nor with --no-ln-decay)."""
    model = TrainableGPT2.from_pretrained(ln_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, plain = trainer.optimizer_groups(model, 0.01, ln_gains=True)
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed >= {"wte.weight", "wpe.weight", "blocks.0.c_attn.weight", "blocks.0.ln_1.weight", "ln_f.weight"}
    assert all(names[id(p)].endswith("bias") for p in plain["params"])
    decay, plain = trainer.optimizer_groups(model, 0.01, ln_gains=False)
    assert not any("ln_" in names[id(p)] or names[id(p)].endswith("bias") for p in decay["params"])
    assert tiny_recipe().decays_ln_gains(control=False) and not tiny_recipe().decays_ln_gains(control=True)
    assert not tiny_recipe(ln_gain_decay=False).decays_ln_gains(control=False)


# --------------------------------------------------------------------------- sigma: the papers' estimate


def residual(seed=0, B=3, T=6, d=8, big_first=10.0):
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= big_first
    return x


def per_token_sigma(x):
    return (x.var(-1, unbiased=False) + STD_EPS).sqrt()


def test_sigma_moves_on_every_forward_with_position_0_included():
    ln = FakeLayerNorm(8, momentum=0.9).train()
    x = residual()
    ln(x)
    first = per_token_sigma(x)
    assert ln.ema.item() == pytest.approx(first.mean().item(), rel=1e-6)  # position 0 (10x larger) counts
    assert ln.ema.item() > per_token_sigma(x)[:, 1:].mean().item() * 1.5
    assert ln.ema_bos.item() == pytest.approx(first[:, 0].mean().item(), rel=1e-6)
    y = residual(seed=1)
    ln(y)
    assert ln.ema.item() == pytest.approx(0.9 * first.mean().item() + 0.1 * per_token_sigma(y).mean().item(), rel=1e-6)


def test_ln_1_advances_once_per_call_as_the_papers_code_calls_it_three_times():
    ln_1 = FakeLayerNorm(8, calls=("qk", "v", "v_eot"), momentum=0.9).train()
    x, y = residual(), residual(seed=1)
    ln_1(x)
    before, new = ln_1.ema.item(), per_token_sigma(y).mean().item()
    ln_1(y)
    assert ln_1.ema.item() == pytest.approx(0.9**3 * before + (1 - 0.9**3) * new, rel=1e-6)


def test_ln_1_sigma_keeps_moving_until_its_v_path_is_removed():
    ln_1 = FakeLayerNorm(8, calls=("qk", "v", "v_eot")).train()
    ln_1(residual())
    ln_1.remove("qk")
    held = ln_1.sigma.item()
    ln_1(residual(seed=1))
    assert ln_1.sigma.item() != held  # the live V path still copies the average
    ln_1.remove("v")
    frozen = ln_1.sigma.item()
    ln_1(residual(seed=2))
    assert ln_1.sigma.item() == frozen and ln_1.ema.item() != frozen  # averaged, no longer used


def test_evaluation_forwards_leave_sigma_alone():
    ln = FakeLayerNorm(8).train()
    ln(residual())
    ema = ln.ema.item()
    ln.eval()
    ln(residual(seed=3))
    assert ln.ema.item() == ema


def _removed_ln_1(special: bool):
    """An ``ln_1`` with every path removed, σ 2 and position 0's σ 5, and an input whose position 3 is EOT."""
    ln_1 = FakeLayerNorm(4, calls=("qk", "v", "v_eot"), special=special).eval()
    ln_1.sigma.fill_(2.0)
    ln_1.sigma_bos.fill_(5.0)
    ln_1.fake[:] = True
    x = torch.randn(1, 5, 4)
    eot = torch.zeros(1, 5, dtype=torch.bool)
    eot[0, 3] = True
    return ln_1, x, eot, x - x.mean(-1, keepdim=True)


def test_no_special_sigma_by_default_as_the_released_code():
    """train.py: bos_special_treatment defaults to False and no caller sets it; EOT's V call divides by the same σ."""
    ln_1, x, eot, centred = _removed_ln_1(special=False)
    for path in ("qk", "v"):
        assert [(centred[0, t] / ln_1(x, eot)[path][0, t]).mean().item() for t in range(5)] == pytest.approx([2] * 5)
    model = TrainableGPT2(dict(n_embd=8, n_layer=2, n_head=2, n_positions=8, vocab_size=10))
    assert not any(ln.bos_special or ln.eot_special for _, ln in model.layer_norms())


def test_special_sigma_eot_on_the_v_path_only_and_position_0_everywhere():
    ln_1, x, eot, centred = _removed_ln_1(special=True)

    def divisors(out):
        return [(centred[0, t] / out[0, t]).mean().item() for t in range(5)]

    out = ln_1(x, eot)
    assert divisors(out["qk"]) == pytest.approx([5, 2, 2, 2, 2])  # position 0's sigma; EOT not on Q/K
    assert divisors(out["v"]) == pytest.approx([5, 2, 2, 5, 2])  # EOT's own sigma on V
    ln_1.eot_special.fill_(False)
    assert divisors(ln_1(x, eot)["v"]) == pytest.approx([5, 2, 2, 2, 2])
    ln_1.bos_special.fill_(False)
    assert divisors(ln_1(x, eot)["qk"]) == pytest.approx([2, 2, 2, 2, 2])
    ln_2 = FakeLayerNorm(4, special=True).eval()  # another LN: position 0 special, EOT never
    ln_2.sigma.fill_(2.0)
    ln_2.sigma_bos.fill_(5.0)
    ln_2.fake[:] = True
    assert divisors(ln_2(x, eot)["out"]) == pytest.approx([5, 2, 2, 2, 2])


@pytest.fixture(scope="module")
def with_options(tmp_path_factory, ln_dir):
    """A run with this project's options: special σ, no LN-gain decay, EOT targets counted, pure bf16."""
    out = tmp_path_factory.mktemp("options") / "tiny-options"
    r = tiny_recipe(special_sigma=True, ln_gain_decay=False, eot_loss=True)
    finetune(ln_dir, text_corpus(TEXT), out, r, eval_every=0, checkpoint_every=100, device="cpu", precision="bf16")
    return out


def test_special_sigma_ends_two_and_twelve_steps_after_ln_f(with_options, removed):
    log = read_log(with_options)
    s = json.loads((with_options / "removal.json").read_text())["schedule"]
    at = {r: e["step"] for e in log for r in e["removed"]}
    assert at["ln_f"] == s["start_lnf"]
    assert at["eot-sigma-ends"] == s["end_eot"] and at["bos-sigma-ends"] == s["end_bos"]
    assert PRESETS["small"].schedule(12).end_eot == 106 and PRESETS["small"].schedule(12).end_bos == 116
    assert not {"eot-sigma-ends", "bos-sigma-ends"} & {r for e in read_log(removed) for r in e["removed"]}


def test_removal_json_and_card_record_the_choices_against_the_released_code(removed, with_options):
    default = json.loads((removed / "removal.json").read_text())
    assert default["choices"] == {"special_sigma": False, "ln_gain_decay": True, "eot_targets_masked": True,
                                  "precision": "fp32"}  # auto on a CPU: float32, as the released code there
    assert default["released_code"]["precision"] == "bf16" and default["differs_from_released_code"] == []
    assert "as the released code" in (removed / "README.md").read_text()
    own = json.loads((with_options / "removal.json").read_text())
    assert own["choices"] == {"special_sigma": True, "ln_gain_decay": False, "eot_targets_masked": False,
                              "precision": "bf16"}
    assert len(own["differs_from_released_code"]) == 3 and own["distributed"]["precision"] == "bf16"
    card = (with_options / "README.md").read_text()
    assert "unlike the released code" in card and "--special-sigma" in card and "--eot-loss" in card
    assert load_model(str(with_options), device="cpu").ln_free  # bf16 training, exported in float32, LN-free
    assert trainer.resolve_precision("auto", "cpu") == "fp32"


def test_eot_targets_are_left_out_of_the_loss(ln_dir, tmp_path):
    """The released collator pads with EOS, so targets equal to EOT get label -100: the logged loss of step 0 (the
    base model, before any update) is the mean over the other targets of step 0's rows."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS * 30))
    r = tiny_recipe(steps=2, aux_lambda=0.0)
    out = tmp_path / "ctl"
    finetune(ln_dir, parse_corpus(str(docs)), out, r, control=True, eval_every=0, checkpoint_every=100, device="cpu")
    tokenizer = load_model(str(ln_dir), device="cpu").tokenizer
    chunks = np.asarray(prepare_chunks(parse_corpus(str(docs)), tokenizer, tmp_path / "c", r.seq_len).tokens())
    train = chunks[:-trainer.held_out_count(len(chunks))]
    rows = torch.from_numpy(train[trainer._rows(0, 0, 0, r, r.batch, len(train))].astype(np.int64))
    with torch.no_grad():
        logp = hf_model(ln_dir)(rows[:, :-1]).logits.double().log_softmax(-1)
    losses = -logp.gather(-1, rows[:, 1:, None])[..., 0]
    keep = rows[:, 1:] != 50256
    logged = read_log(out)[0]["loss"]
    assert (~keep).sum() > 0 and logged == pytest.approx(losses[keep].mean().item(), rel=1e-4)
    assert logged != pytest.approx(losses.mean().item(), rel=1e-4)  # counting EOT targets would give this


# --------------------------------------------------------------------------- auxiliary loss


def test_aux_loss_penalises_every_position_against_the_batch_mean_without_special_ones():
    resid = residual().requires_grad_(True)
    tokens = torch.ones(3, 6, dtype=torch.long)
    tokens[1, 4] = 50256
    loss = trainer.aux_loss(resid, tokens, 50256, 0.5)
    sig = per_token_sigma(resid.detach())
    common = torch.ones(3, 6, dtype=torch.bool)
    common[:, 0] = False
    common[1, 4] = False
    target = sig[common].mean()
    assert loss.item() == pytest.approx(0.5 * (sig - target).pow(2).mean().item(), rel=1e-5)
    loss.backward()
    assert resid.grad[:, 0].abs().sum() > 0 and resid.grad[1, 4].abs().sum() > 0  # BOS and EOT pulled too


def test_aux_loss_runs_the_whole_run(removed):
    log = read_log(removed)
    lnf = json.loads((removed / "removal.json").read_text())["schedule"]["start_lnf"]
    assert all(e["aux"] > 0 for e in log) and any(e["step"] > lnf for e in log)


# --------------------------------------------------------------------------- data


def test_training_reads_eot_joined_chunks_without_bos(tmp_path, ln_dir, monkeypatch):
    seen = []
    original = TrainableGPT2.forward

    def spy(self, tokens):
        if self.training:
            seen.append(tokens.clone())
        return original(self, tokens)

    monkeypatch.setattr(TrainableGPT2, "forward", spy)
    r = tiny_recipe(steps=14)
    finetune(ln_dir, text_corpus(TEXT), tmp_path / "o", r, eval_every=0, checkpoint_every=100, device="cpu")
    chunks = np.array(prepare_chunks(text_corpus(TEXT), load_model(str(ln_dir), device="cpu").tokenizer,
                                     tmp_path / "c", r.seq_len).tokens())
    rows = {tuple(c[:-1]) for c in chunks}
    fed = torch.cat(seen)
    assert all(tuple(row.tolist()) in rows for row in fed)  # consecutive chunks of the stream, as they are
    assert (fed[:, 0] == 50256).float().mean() < 0.5  # no BOS put in front


def test_each_epoch_is_a_permutation_and_processes_share_the_same_rows():
    r = tiny_recipe(batch=8, grad_accum=2)
    n = 37
    one = np.concatenate([trainer._rows(s, m, 0, r, 4, n) for s in range(10) for m in range(2)])
    assert sorted(one[:n].tolist()) == list(range(n)) and sorted(one[n:2 * n].tolist()) == list(range(n))
    two = np.concatenate([np.concatenate([trainer._rows(s, m, rank, r, 2, n) for rank in range(2)])
                          for s in range(10) for m in range(2)])
    assert two.tolist() == one.tolist()


# --------------------------------------------------------------------------- the result


def test_fine_tuning_removes_every_layernorm(removed):
    log = read_log(removed)
    assert len(log) == STEPS and all(math.isfinite(e["loss"]) for e in log)
    assert {"step", "loss", "lr", "tokens", "processes"} <= set(log[0])
    assert log[-1]["tokens"] == STEPS * 4 * 32 and log[0]["processes"] == 1
    events = [r for e in log for r in e["removed"]]
    assert sum(r.startswith("ln_2") for r in events) == 3 and sum(r.startswith("ln_1.v") for r in events) == 3
    assert "ln_f" in events
    assert [e["step"] for e in log if "eval_loss" in e] == [7, 15, 23]


def test_output_loads_back_ln_free_and_exact(removed):
    model = load_model(str(removed), device="cpu")
    assert model.ln_free and model.info.eps == 1e12
    assert json.loads((removed / "config.json").read_text())["layer_norm_epsilon"] == 1e12
    assert not [n for n in model.hook_names() if any(part.startswith("ln") for part in n.split("."))]
    result = compare(model, PROMPTS[0], " Mary", " John")
    dla = direct_logit_attribution(result)[0]
    assert dla.exact and dla.error <= exactness_tolerance(dla.logit_diff)


def test_output_computes_what_training_ended_with(removed, ln_dir):
    """The written checkpoint (float32, weight x1e6/σ, eps 1e12) equals the fine-tuned model with every LN fake."""
    from safetensors.torch import load_file

    trained = TrainableGPT2.from_pretrained(ln_dir)
    trained.load_state_dict(load_file(removed / "_training" / "checkpoint" / "model.safetensors"))
    assert all(ln.fake.all() and not ln.bos_special and not ln.eot_special for _, ln in trained.layer_norms())
    trained.eval()
    ids = torch.tensor([[50256] + tokenize(load_model(str(ln_dir), device="cpu"), TEXT, prepend_bos=False)[:40]])
    with torch.no_grad():
        expected = trained(ids)
        ours = load_model(str(removed), device="cpu").forward(ids)
        theirs = hf_model(removed)(ids).logits
    assert torch.allclose(ours, expected, atol=1e-3)
    assert torch.allclose(ours, theirs, atol=1e-4)
    card = (removed / "README.md").read_text()
    info = json.loads((removed / "removal.json").read_text())
    assert "LN-free fine-tune" in card and info["kind"] == "ln_free" and len(info["sigma"]) == 7
