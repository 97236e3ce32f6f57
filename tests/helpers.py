"""Independent recomputations with Hugging Face transformers, the reference the tests check against."""

from __future__ import annotations

import functools

import numpy as np
import torch

from checkpoints import hf_model

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
    "one two three four one two three four one two",
    "tabs\tand\x0cform feeds\n\n\n and emoji 🙂",
]


@functools.lru_cache(maxsize=None)
def _hf(directory: str):
    return hf_model(directory)


def hf_run(directory, ids) -> dict:
    """HF outputs for ``ids``: log-probs, hidden states, attentions, and the input of ln_f."""
    model = _hf(str(directory))
    captured: dict = {}

    def keep(key):
        return lambda mod, args: captured.__setitem__(key, args[0][0].double())

    handles = [model.transformer.ln_f.register_forward_pre_hook(keep("pre_lnf"))]
    for layer, block in enumerate(model.transformer.h):
        handles.append(block.ln_2.register_forward_pre_hook(keep(f"mid{layer}")))
        handles.append(block.attn.c_proj.register_forward_pre_hook(keep(f"z{layer}")))
    try:
        with torch.no_grad():
            out = model(torch.tensor([list(ids)]), output_hidden_states=True, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "logits": out.logits[0].double(),
        "logprobs": out.logits[0].double().log_softmax(-1),
        "hidden": [h[0].double() for h in out.hidden_states[:-1]] + [captured["pre_lnf"]],
        "resid_mid": [captured[f"mid{layer}"] for layer in range(len(model.transformer.h))],
        "z": [captured[f"z{layer}"] for layer in range(len(model.transformer.h))],
        "attentions": [a[0].double() for a in out.attentions],
        "model": model,
    }


@functools.lru_cache(maxsize=None)
def hf_tokenizer(directory: str):
    """transformers' GPT2TokenizerFast over a checkpoint directory's vocab.json/merges.txt."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(directory)


def ln_stats(x: torch.Tensor, eps: float) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return (centred.pow(2).mean(-1) + eps).sqrt()


def as_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def hf_readout(model, x: torch.Tensor, answer: int, counterfactual: int) -> torch.Tensor:
    """HF's own ln_f and unembedding applied to residual vectors ``x`` (..., d): the logit difference."""
    with torch.no_grad():
        logits = model.lm_head(model.transformer.ln_f(x.float())).double()
    return logits[..., answer] - logits[..., counterfactual]


def launch_two(*args: str, timeout: int = 300):
    """``accelerate launch`` with 2 processes (gloo on the CPU, one thread each) of ``python -m noln_core ARGS``."""
    import os
    import shutil
    import subprocess

    accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate is a requirement"
    return subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "noln_core", *args],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)
