"""The hand-off: ``to_transformers`` gives an ordinary GPT2LMHeadModel computing exactly the loaded model."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import PROMPTS
from noln_core import tokenize
from noln_core.interop import FinalScale, to_transformers


@pytest.mark.parametrize("which", ["ln_model", "noln_model"])
def test_log_probs_equal_noln_core(which, request):
    model = request.getfixturevalue(which)
    hf = to_transformers(model)
    assert type(hf).__name__ == "GPT2LMHeadModel" and not hf.training
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied
    for prompt in PROMPTS:
        ids = torch.tensor([tokenize(model, prompt)])
        with torch.no_grad():
            ours = model.forward(ids).log_softmax(-1)
            theirs = hf(ids).logits.log_softmax(-1)
        assert torch.allclose(ours, theirs, atol=1e-5), prompt


def test_ln_free_model_has_no_normalisation_left(noln_model, ln_model):
    hf = to_transformers(noln_model)
    assert all(isinstance(b.ln_1, torch.nn.Identity) and isinstance(b.ln_2, torch.nn.Identity) for b in hf.transformer.h)
    assert isinstance(hf.transformer.ln_f, FinalScale)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in hf.modules())
    assert any(isinstance(m, torch.nn.LayerNorm) for m in to_transformers(ln_model).modules())
    # No epsilon to reset: changing the config's eps changes nothing.
    hf.config.layer_norm_epsilon = 1e-5
    ids = torch.tensor([tokenize(noln_model, PROMPTS[0])])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, noln_model.forward(ids), atol=1e-4)


def test_nnsight_wraps_it_and_reads_the_residual_stream(noln_dir, tmp_path):
    """nnsight compiles the body of a trace from its source file, so this runs a script file."""
    script = tmp_path / "trace.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch
        from transformers import PreTrainedTokenizerFast
        from nnsight import TransformersModel
        from noln_core import load_model, to_transformers
        model = load_model({str(noln_dir)!r}, device="cpu")
        lm = TransformersModel(to_transformers(model), task="text-generation",
                               tokenizer=PreTrainedTokenizerFast(tokenizer_object=model.tokenizer))
        ids = torch.tensor([[50256, 464, 3290, 318, 257]])
        with lm.trace(ids):
            h = lm.transformer.h[1].output.save()
            logits = lm.lm_head.output.save()
        h = h[0] if isinstance(h, tuple) else h
        _, cache = model.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
        print(json.dumps({{"resid": (h - cache["blocks.1.hook_resid_post"]).abs().max().item(),
                          "logits": (logits - model.forward(ids)).abs().max().item()}}))
    """))
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]
    gaps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert gaps["resid"] < 1e-5 and gaps["logits"] < 1e-4


def test_transformer_bridge_snippet_of_the_readme(noln_dir, noln_model):
    """The plain bridge on the published checkpoint itself is as close as to_transformer_lens gets (the eps-1e12
    trick's deviation); compatibility mode (weight processing) moves further away."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformer_lens.model_bridge import TransformerBridge

    hf = GPT2LMHeadModel.from_pretrained(noln_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=noln_model.tokenizer)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer)
    assert bridge.cfg.eps == 1e12  # TransformerLens 4 keeps the trick's eps (older versions reset it to 1e-5)
    ids = torch.tensor([tokenize(noln_model, PROMPTS[0])])
    logits, cache = bridge.run_with_cache(ids)
    exact, ours = noln_model.run_with_cache(ids)
    plain = ((logits - exact).abs().max() / exact.abs().max()).item()
    assert plain < 1e-5
    assert torch.allclose(cache["blocks.1.hook_resid_post"], ours["blocks.1.hook_resid_post"], atol=1e-4)
    assert "blocks.1.ln1.hook_scale" in cache  # the LN hooks stay, dividing by sqrt(var + 1e12)
    bridge.enable_compatibility_mode()
    compat = ((bridge(ids) - exact).abs().max() / exact.abs().max()).item()
    assert compat > 10 * plain


@pytest.mark.parametrize("which", ["ln_model", "noln_model"])
def test_to_transformer_lens_hands_over_a_bridge_within_its_stated_error(which, request):
    """The TransformerLens 4 hand-off: a model with LN goes in exactly; an LN-free one through the eps-1e12 trick,
    whose error (var / 2e12 per norm) is measured on each hand-off and small while the stream's variance is."""
    from noln_core import to_transformer_lens

    model = request.getfixturevalue(which)
    bridge = to_transformer_lens(model)
    assert bridge.cfg.eps == (1e12 if model.ln_free else model.info.eps)
    ids = torch.tensor([tokenize(model, PROMPTS[1])])
    logits, cache = bridge.run_with_cache(ids)
    exact, ours = model.run_with_cache(ids)
    gap = ((logits - exact).abs().max() / exact.abs().max()).item()
    assert gap < 1e-5 and bridge.noln_deviation < 1e-5
    for name in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"):
        assert torch.allclose(cache[name], ours[name], atol=1e-4), name
    if model.ln_free:  # the trick's error grows with the stream's variance, as the docstring says
        big = torch.randn(1, 1, model.info.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3e3
        norm = torch.nn.LayerNorm(model.info.d_model, eps=1e12, dtype=torch.float64)
        torch.nn.init.constant_(norm.weight, 1e6)
        centred = big - big.mean(-1, keepdim=True)
        rel = ((norm(big) - centred).abs().max() / centred.abs().max()).item()
        var = centred.pow(2).mean(-1).max().item()
        assert rel == pytest.approx(var / 2e12, rel=0.05)


def test_to_transformer_lens_refuses_float16_for_an_ln_free_model(noln_dir):
    from noln_core import load_model, to_transformer_lens
    from noln_core.errors import InputError

    with pytest.raises(InputError, match="beyond float16's range"):
        to_transformer_lens(load_model(str(noln_dir), device="cpu", dtype="float16"))
    bridge = to_transformer_lens(load_model(str(noln_dir), device="cpu", dtype="bfloat16"))
    assert bridge.noln_deviation < 0.05  # bfloat16's own rounding, not the trick


def test_the_readmes_transformer_lens_snippet_runs_offline_from_any_directory(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "to_transformer_lens" in block]
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5
