"""The folded forward pass equals Hugging Face's, and LN-free models keep no normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import PROMPTS, hf_run
from noln_core import load_model, tokenize


@pytest.mark.parametrize("which", ["ln", "noln"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_logprobs_equal_hf(request, which, prompt):
    directory = request.getfixturevalue(f"{which}_dir")
    model = request.getfixturevalue(f"{which}_model")
    ids = tokenize(model, prompt)
    ours = model.forward(torch.tensor([ids]))[0].double().log_softmax(-1)
    ref = hf_run(directory, ids)["logprobs"]
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("which", ["ln", "noln"])
def test_residual_stream_equals_hf_hidden_states(request, which):
    directory, model = request.getfixturevalue(f"{which}_dir"), request.getfixturevalue(f"{which}_model")
    ids = tokenize(model, PROMPTS[0])
    _, cache = model.run_with_cache(torch.tensor([ids]))
    hidden = hf_run(directory, ids)["hidden"]
    L = model.info.n_layers
    for layer in range(L):
        assert torch.allclose(cache[f"blocks.{layer}.hook_resid_pre"][0].double(), hidden[layer], atol=1e-5)
    assert torch.allclose(cache[f"blocks.{L - 1}.hook_resid_post"][0].double(), hidden[L], atol=1e-5)


def test_trick_is_detected_from_the_checkpoint(ln_model, noln_model):
    assert noln_model.ln_free and noln_model.info.eps == 1e12
    assert not ln_model.ln_free and ln_model.info.eps == pytest.approx(1e-5)


def test_ln_free_model_has_no_normalisation(noln_model):
    names = noln_model.hook_names()
    assert not [n for n in names if any(part.startswith("ln") for part in n.split("."))]
    seen = []
    noln_model.forward(torch.tensor([tokenize(noln_model, PROMPTS[1])]), observer=lambda n, _: seen.append(n))
    assert seen == names and not any("scale" in n for n in seen)
    # The folded weights carry no trace of the 1e6 factor either.
    w = noln_model.weights
    assert w.w_U.abs().max() < 1e3 and w.W_QKV.abs().max() < 1e3 and w.W_in.abs().max() < 1e3


def test_ln_free_model_is_affine_from_the_residual_stream(noln_model, ln_model):
    """The model's own readout: logits of a sum of residual vectors are the sum of their readouts (minus the
    constant) for the LN-free model, and not for the model with LN; and the forward pass ends in that readout."""
    torch.manual_seed(0)
    x, y = torch.randn(2, noln_model.info.d_model) * 50

    def affine_gap(model):
        b_U = model.weights.b_U
        return float((model.unembed(x + y) - (model.unembed(x) + model.unembed(y) - b_U)).abs().max())

    assert affine_gap(noln_model) < 1e-3
    assert affine_gap(ln_model) > 1e-1
    for model in (noln_model, ln_model):
        ids = torch.tensor([tokenize(model, PROMPTS[0])])
        last = f"blocks.{model.info.n_layers - 1}.hook_resid_post"
        logits, cache = model.run_with_cache(ids, names_filter=last)
        assert torch.allclose(model.unembed(cache[last]), logits, atol=1e-4)


def test_ln_model_keeps_its_layernorm_scales(ln_model, ln_dir):
    ids = tokenize(ln_model, PROMPTS[0])
    _, cache = ln_model.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n.endswith("hook_scale"))
    assert sorted(cache) == sorted([f"blocks.{l}.ln{i}.hook_scale" for l in range(3) for i in (1, 2)] + ["ln_final.hook_scale"])
    hidden = hf_run(ln_dir, ids)["hidden"]
    expected = (hidden[0] - hidden[0].mean(-1, keepdim=True)).pow(2).mean(-1).add(1e-5).sqrt()
    assert torch.allclose(cache["blocks.0.ln1.hook_scale"][0, :, 0].double(), expected, atol=1e-6)


def test_names_filter_forms(ln_model):
    ids = torch.tensor([tokenize(ln_model, "hello there")])
    _, one = ln_model.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern")
    _, many = ln_model.run_with_cache(ids, names_filter=["hook_embed", "blocks.0.hook_resid_pre"])
    assert list(one) == ["blocks.1.attn.hook_pattern"]
    assert sorted(many) == ["blocks.0.hook_resid_pre", "hook_embed"]
    assert one["blocks.1.attn.hook_pattern"].shape == (1, 4, 3, 3)


def test_hook_names_and_values_match_transformer_lens_bridge(ln_dir, ln_model):
    """Our cache uses TransformerBridge's hook names, shapes and values, so notebooks carry over."""
    from transformer_lens.model_bridge import TransformerBridge

    from noln_core.model import OWN_HOOKS

    bridge = TransformerBridge.boot_transformers(str(ln_dir), device="cpu")
    ids = torch.tensor([tokenize(ln_model, PROMPTS[0])])
    _, theirs = bridge.run_with_cache(ids)
    _, ours = ln_model.run_with_cache(ids)
    own = {n for n in ours if n.split(".", 2)[-1] in OWN_HOOKS}
    assert own and set(ours) - own <= set(theirs)
    for name in own:  # our one addition: the pattern's first column, which the fused kernel gives for free
        layer = name.split(".")[1]
        assert torch.allclose(ours[name], theirs[f"blocks.{layer}.attn.hook_pattern"][..., 0], atol=1e-5)
        del ours[name]
    for name, value in ours.items():
        other = theirs[name]
        assert other.shape == value.shape, name
        finite = torch.isfinite(value) & torch.isfinite(other)
        assert torch.allclose(value[finite], other[finite].to(value.dtype), atol=1e-4), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_request(noln_dir, noln_model, dtype):
    half = load_model(str(noln_dir), device="cpu", dtype=dtype)
    assert half.info.dtype == dtype and half.weights.W_E.dtype == getattr(torch, dtype)
    ids = torch.tensor([tokenize(half, PROMPTS[1])])
    lp_half = half.forward(ids)[0].log_softmax(-1)
    lp_full = noln_model.forward(ids)[0].log_softmax(-1)
    assert lp_half.dtype == torch.float32
    assert (lp_half - lp_full).abs().max() < 0.2


def test_tied_embedding_is_one_tensor(noln_model):
    assert noln_model.weights.W_U_rows.data_ptr() == noln_model.weights.W_E.data_ptr()


def test_context_window_is_enforced(ln_model):
    with pytest.raises(ValueError, match="context window"):
        ln_model.forward(torch.zeros(1, ln_model.info.n_ctx + 1, dtype=torch.long))


def test_run_outputs_are_deterministic(ln_model):
    ids = torch.tensor([tokenize(ln_model, PROMPTS[2])])
    assert np.array_equal(ln_model.forward(ids).numpy(), ln_model.forward(ids).numpy())


@pytest.mark.parametrize("which", ["ln", "noln"])
def test_fused_attention_path_equals_the_explicit_one(request, which):
    """Without pattern observers the fused kernel runs; it must give what the observed, explicit path gives."""
    model = request.getfixturevalue(f"{which}_model")
    ids = torch.tensor([tokenize(model, PROMPTS[0])])
    fused = model.forward(ids)
    seen = []
    explicit = model.forward(ids, observer=lambda n, _: seen.append(n), wants=lambda n: n.endswith("hook_pattern"))
    assert len(seen) == model.info.n_layers
    assert torch.allclose(fused, explicit, atol=1e-5)
