"""The library on an accelerator: ``NOLN_TEST_DEVICE=cuda`` (or ``mps``) runs these there; CI runs them on the CPU.

The same invariants as elsewhere, on the device the app would pick: log-probs equal
transformers' (computed on the CPU), LN-free DLA exact in float32, concurrent runs
equal sequential ones, and half precision available on request.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from helpers import PROMPTS, hf_run
from noln_core import compare, direct_logit_attribution, head_direct_effects, load_model, residual_norms, tokenize
from noln_core.analyses import exactness_tolerance

DEVICE = os.environ.get("NOLN_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def models(ln_dir, noln_dir):
    return [load_model(str(ln_dir), device=DEVICE), load_model(str(noln_dir), device=DEVICE)]


def test_models_live_on_the_device_with_tied_embeddings_kept_as_one_tensor(noln_dir):
    """Moving to the device (and dtype) keeps the tied unembedding one tensor and changes nothing else."""
    model = load_model(str(noln_dir), device=DEVICE, dtype="bfloat16")
    assert all(t.device.type == torch.device(DEVICE).type and t.dtype == torch.bfloat16 for t in model.weights.tensors())
    assert model.weights.W_U_rows.data_ptr() == model.weights.W_E.data_ptr()
    assert model.info.device.startswith(torch.device(DEVICE).type) and model.info.dtype == "bfloat16"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logprobs_on_the_device_equal_hf_on_the_cpu(models, ln_dir, noln_dir, prompt):
    for model, directory in zip(models, (ln_dir, noln_dir)):
        ids = tokenize(model, prompt)
        ours = model.forward(torch.tensor([ids])).double().log_softmax(-1)[0].cpu()
        assert (ours - hf_run(directory, ids)["logprobs"]).abs().max() < 1e-4


def test_results_come_back_to_the_cpu_and_dla_is_exact(models):
    result = compare(models, PROMPTS[0], " Mary", " John")
    arrays = [result.runs[0].resid_pre_norm, result.runs[1].attribution.components, result.pairs[0].kl_ab]
    assert all(isinstance(a, np.ndarray) and not a.flags.writeable for a in arrays)  # CPU copies, shareable
    dla = direct_logit_attribution(result)[1]
    assert dla.exact and dla.error <= exactness_tolerance(dla.logit_diff)
    assert head_direct_effects(result)[1].nmae < 1e-5
    assert residual_norms(result)[1].ln1_scale is None


def test_concurrent_runs_on_the_device_equal_sequential(models):
    jobs = [(PROMPTS[i % 4] + " more" * i, " the", " a") for i in range(12)]
    def summary(job):
        r = compare(models, *job)
        return [r.runs[1].attribution.components, r.runs[0].next_logprobs, r.runs[1].attn_to_first]
    sequential = [summary(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(summary, jobs))
    for a, b in zip(sequential, parallel):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


def test_bfloat16_on_request_reports_its_error(noln_dir):
    model = load_model(str(noln_dir), device=DEVICE, dtype="bfloat16")
    dla = direct_logit_attribution(compare(model, PROMPTS[1], " Paris", " London"))[0]
    assert model.weights.W_QKV.dtype == torch.bfloat16 and np.isfinite(dla.error)


def test_a_study_on_the_device_equals_one_on_the_cpu(models, ln_dir, noln_dir, tmp_path):
    """The study's numbers do not depend on where the models run (float32), and LN-free NMAE stays 0."""
    from noln_core.study import Settings, parse_corpus, run_study

    kw = dict(seq_len=32, batch=4, max_tokens=32 * 8, settings=Settings(bootstrap=0))
    here = run_study(models, parse_corpus("demo"), state_dir=tmp_path / "device", **kw)
    cpu = run_study([load_model(str(d), device="cpu") for d in (ln_dir, noln_dir)], parse_corpus("demo"),
                    state_dir=tmp_path / "cpu", **kw)
    for a, b in zip(here.models, cpu.models):
        assert a.ce.mean == pytest.approx(b.ce.mean, abs=1e-4)
        assert a.nmae.mean == pytest.approx(b.nmae.mean, abs=1e-4)
        assert a.sink_rate["papers"].mean == pytest.approx(b.sink_rate["papers"].mean, abs=1e-3)
    assert here.models[1].nmae.mean < 1e-6
    assert here.pairs[0].kl_ab.mean == pytest.approx(cpu.pairs[0].kl_ab.mean, abs=1e-4)


def test_removal_on_the_device_equals_the_cpu_and_mixed_precision_trains(ln_dir, tmp_path):
    """remove-ln on DEVICE in float32 gives the CPU's loss log; bf16 mixed precision (float32 master weights) trains
    to an LN-free, exact model."""
    import json

    from noln_core.corpus import text_corpus
    from noln_core.training.recipe import recipe
    from noln_core.training.removal import finetune

    r = recipe(steps=12, batch=4, seq_len=32, lr=2e-4, warmup=2)
    corpus = text_corpus(" ".join(PROMPTS * 40))
    logs = {}
    for name, device, precision in (("cpu", "cpu", "fp32"), ("dev", DEVICE, "fp32"), ("bf16", DEVICE, "bf16")):
        if precision == "bf16" and DEVICE == "cpu":
            continue  # bf16 autocast is the GPU recipe
        finetune(ln_dir, corpus, tmp_path / name, r, eval_every=0, device=device, precision=precision)
        logs[name] = [json.loads(x) for x in (tmp_path / name / "_training" / "loss_log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in logs["dev"]] == pytest.approx([e["loss"] for e in logs["cpu"]], abs=1e-4)
    if "bf16" in logs:
        assert json.loads((tmp_path / "bf16" / "removal.json").read_text())["distributed"]["mixed_precision"] == "bf16"
        assert all(np.isfinite(e["loss"]) for e in logs["bf16"])
        model = load_model(str(tmp_path / "bf16"), device=DEVICE)
        assert model.ln_free
        dla = direct_logit_attribution(compare(model, PROMPTS[0], " Mary", " John"))[0]
        assert dla.exact and dla.error <= exactness_tolerance(dla.logit_diff)
