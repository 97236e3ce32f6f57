"""Activation patching against attribution patching, on a clean and a corrupted prompt of equal length.

The metric is the logit difference ``logit[answer] - logit[counterfactual]`` at the last position (the clean
prompt's answer and counterfactual), as ``attr_vs_act_patching_(per_prompt).py`` of ``submarat/removing-layer-norm``
(@583a9e6, ``get_logit_diff``, lines 91-103) defines it.

* **Activation patching** (lines 18-36 and ``custom_patching.py``): run the corrupted prompt with one activation
  replaced by the clean run's; the effect is the metric's change from the corrupted run.  For ``resid_pre`` at each
  layer x position, and for each head's ``z`` at every position.  The runs of one layer are batched and start at
  that layer from the cached corrupted stream.
* **Attribution patching** (lines 53-88 and ``attribution_patching_utils.py``): the first-order estimate of the
  same, ``grad_corrupted . (clean - corrupted)`` summed over d_model (or over positions and d_head for ``z``): two
  forward passes and one backward pass for every cell at once.
* **Normalisation** (``analysis_attr_vs_act_patching_(per_prompt).py``, lines 136-154): both are divided by the
  activation patching of ``resid_pre`` at layer 0 and the position where the prompts differ (position 11 of their
  BOS-prefixed IOI prompts), which for prompts differing in one token is exactly ``clean metric - corrupted
  metric``; that difference is the normaliser here for any pair.

A last row, ``final``, patches the residual stream that enters the unembedding (``blocks.{L-1}.hook_resid_post``).
For an LN-free model the map from it to the metric is affine, so there attribution patching *equals* activation
patching (to float precision); everywhere else, the blocks in between are not linear with or without LN, which is
the papers' finding: removing LN does not make attribution patching more accurate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..compare import frozen
from ..errors import InputError
from ..model import LoadedModel


@dataclass(frozen=True)
class Agreement:
    """How well attribution patching matches activation patching over the cells of one map."""

    correlation: float
    """Pearson correlation over the cells (nan when either map is constant)."""
    nmae: float
    """``mean |attr - act| / mean |act|`` (as the papers' NMAE of DLA against the direct effect); 0 when both are 0."""


def agreement(act: np.ndarray, attr: np.ndarray) -> Agreement:
    a, b = np.asarray(act, dtype=np.float64).ravel(), np.asarray(attr, dtype=np.float64).ravel()
    denom = np.abs(a).mean()
    nmae = float(np.abs(b - a).mean() / denom) if denom > 0 else (0.0 if not np.abs(b).any() else float("inf"))
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    return Agreement(corr, nmae)


@dataclass(frozen=True)
class Patching:
    """One model's patching maps for one clean/corrupted pair (``n`` tokens, ``L`` layers, ``H`` heads).

    Effects are in logit-difference units: *patched minus corrupted* metric; the ``norm_*`` fields divide them by
    ``normaliser``.
    """

    name: str
    ln_free: bool
    clean_ids: np.ndarray
    """(n,) token ids."""
    corrupted_ids: np.ndarray
    """(n,)."""
    answer_id: int
    counterfactual_id: int
    clean_metric: float
    """The logit difference at the last position on the clean prompt."""
    corrupted_metric: float
    normaliser: float
    """``clean_metric - corrupted_metric``: the papers' normaliser (module docstring)."""
    resid_labels: tuple[str, ...]
    """(L + 1,) ``resid_pre 0`` ... ``resid_pre L-1``, ``final``."""
    resid_act: np.ndarray
    """(L + 1, n) activation patching of each layer's stream at each position."""
    resid_attr: np.ndarray
    """(L + 1, n) attribution patching of the same."""
    z_act: np.ndarray
    """(L, H) activation patching of each head's ``z`` at every position."""
    z_attr: np.ndarray
    """(L, H)."""
    resid_agreement: Agreement
    z_agreement: Agreement

    def __post_init__(self) -> None:
        assert self.resid_act.shape == self.resid_attr.shape == (len(self.resid_labels), self.clean_ids.shape[0])
        assert self.z_act.shape == self.z_attr.shape

    def normalised(self, values: np.ndarray) -> np.ndarray:
        """``values / normaliser`` (zeros when the prompts' metrics are equal)."""
        return values / self.normaliser if self.normaliser != 0 else np.zeros_like(values)


def swapped_prompt(text: str, answer: str, counterfactual: str) -> str:
    """``text`` with the answer's and the counterfactual's words swapped everywhere (whole words): the default
    corrupted prompt, e.g. ``When Mary and John ..., John gave a drink to`` -> ``When John and Mary ..., Mary gave
    a drink to``, whose answer is the counterfactual."""
    import re

    a, b = answer.strip(), counterfactual.strip()
    if not a or not b or a == b:
        return text
    return re.sub(rf"\b({re.escape(a)}|{re.escape(b)})\b", lambda m: b if m.group(0) == a else a, text)


def _ids(model: LoadedModel, text_or_ids, prepend_bos: bool) -> list[int]:
    from ..tokenizer import tokenize

    if isinstance(text_or_ids, str):
        return tokenize(model, text_or_ids, prepend_bos)
    return [int(i) for i in text_or_ids]


def _metric(model: LoadedModel, final: torch.Tensor, pair: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Logit difference from final streams at the last position ``final`` (..., d)."""
    logits = model.unembed(final, vocab=pair, grad=grad)
    return logits[..., 0] - logits[..., 1]


def _hook_names(L: int) -> tuple[list[str], str]:
    final = f"blocks.{L - 1}.hook_resid_post"
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(L)] + [final], final


def _attribution(model: LoadedModel, clean_ids: list[int], corrupt_ids: list[int], pair: torch.Tensor) -> dict:
    """Attribution patching: the clean run's activations, and one forward and one backward pass on the corrupted
    prompt; ``grad . (clean - corrupted)`` for every ``resid_pre`` (and the final stream) and every head's ``z``."""
    L = model.info.n_layers
    names, final_name = _hook_names(L)

    def wanted(name: str) -> bool:
        return name.endswith(("hook_resid_pre", "attn.hook_z")) or name == final_name

    clean_cache: dict[str, torch.Tensor] = {}
    model.forward(torch.tensor([clean_ids]), observer=clean_cache.__setitem__, wants=wanted, return_logits=False)
    clean_metric = float(_metric(model, clean_cache[final_name][0, -1], pair))
    corrupt_cache: dict[str, torch.Tensor] = {}

    def keep_grad(name: str, value: torch.Tensor) -> torch.Tensor:
        if not wanted(name):
            return value
        if value.grad_fn is None:  # the embedding: the leaf every later activation hangs from
            value = value.detach().requires_grad_(True)
        value.retain_grad()
        corrupt_cache[name] = value
        return value

    model.forward(torch.tensor([corrupt_ids]), edit=keep_grad, grad=True, return_logits=False)
    with torch.enable_grad():
        metric = _metric(model, corrupt_cache[final_name][0, -1], pair, grad=True)
        metric.backward()
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in corrupt_cache.items()}
    corrupt_cache = {k: v.detach() for k, v in corrupt_cache.items()}
    resid_attr = torch.stack([(grads[k][0] * (clean_cache[k][0] - corrupt_cache[k][0])).float().sum(-1)
                              for k in names])
    z_attr = torch.stack([(grads[k][0] * (clean_cache[k][0] - corrupt_cache[k][0])).float().sum((0, 2))
                          for k in (f"blocks.{layer}.attn.hook_z" for layer in range(L))])
    return {"clean_cache": clean_cache, "corrupt_cache": corrupt_cache, "clean_metric": clean_metric,
            "corrupted_metric": float(metric.detach()), "resid_attr": resid_attr, "z_attr": z_attr, "names": names}


def attribution_patching(model: LoadedModel, clean, corrupted, answer: str | int, counterfactual: str | int,
                         prepend_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Attribution patching alone (two forward passes, one backward): ``(resid_attr (L + 1, n), z_attr (L, H))``,
    as :func:`patching` computes them."""
    clean_ids, corrupt_ids, a, b = _checked(model, clean, corrupted, answer, counterfactual, prepend_bos)
    att = _attribution(model, clean_ids, corrupt_ids, torch.tensor([a, b], device=model.device))
    return frozen(att["resid_attr"].cpu(), np.float64), frozen(att["z_attr"].cpu(), np.float64)


def _checked(model: LoadedModel, clean, corrupted, answer, counterfactual, prepend_bos: bool):
    from ..tokenizer import resolve_token

    info = model.info
    clean_ids, corrupt_ids = _ids(model, clean, prepend_bos), _ids(model, corrupted, prepend_bos)
    if len(clean_ids) != len(corrupt_ids):
        raise InputError(f"the clean prompt is {len(clean_ids)} tokens and the corrupted one {len(corrupt_ids)}: "
                         "patching needs prompts of the same token length")
    if len(clean_ids) < 2:
        raise InputError("the prompts need at least 2 tokens")
    if len(clean_ids) > info.n_ctx:
        raise InputError(f"the prompts are {len(clean_ids)} tokens, more than {info.name}'s context of {info.n_ctx}")
    a, _, _ = resolve_token(model.tokenizer, info.d_vocab, answer, "answer")
    b, _, _ = resolve_token(model.tokenizer, info.d_vocab, counterfactual, "counterfactual")
    if a == b:
        raise InputError("the answer and the counterfactual are the same token")
    return clean_ids, corrupt_ids, a, b


def patching(model: LoadedModel, clean, corrupted, answer: str | int, counterfactual: str | int,
             prepend_bos: bool = True) -> Patching:
    """Activation and attribution patching from ``clean`` into ``corrupted`` (texts or token ids of equal length)
    for the logit difference ``answer - counterfactual`` at the last position."""
    info = model.info
    clean_ids, corrupt_ids, a, b = _checked(model, clean, corrupted, answer, counterfactual, prepend_bos)
    L, H, n = info.n_layers, info.n_heads, len(clean_ids)
    device = model.device
    pair = torch.tensor([a, b], device=device)
    att = _attribution(model, clean_ids, corrupt_ids, pair)
    clean_cache, corrupt_cache = att["clean_cache"], att["corrupt_cache"]
    clean_metric, corrupted_metric = att["clean_metric"], att["corrupted_metric"]
    resid_attr, z_attr, names = att["resid_attr"], att["z_attr"], att["names"]
    final_name = names[-1]
    idx = torch.arange(n, device=device)  # run i patches position i

    # Activation patching: each layer's n (resp. H) patched runs in one batch, started at that layer.
    resid_act = torch.zeros(L + 1, n)
    z_act = torch.zeros(L, H)
    final: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for layer in range(L):
            start = corrupt_cache[names[layer]].expand(n, n, -1).clone()
            start[idx, idx] = clean_cache[names[layer]][0]
            model.forward(torch.tensor([corrupt_ids]).expand(n, n), observer=final.__setitem__,
                          wants=final_name.__eq__, return_logits=False, start=(layer, start))
            resid_act[layer] = _metric(model, final[final_name][:, -1], pair).cpu() - corrupted_metric
        patched = corrupt_cache[final_name][0].expand(n, n, -1).clone()
        patched[idx, idx] = clean_cache[final_name][0]
        resid_act[L] = _metric(model, patched[:, -1], pair).cpu() - corrupted_metric
        for layer in range(L):
            z_name = f"blocks.{layer}.attn.hook_z"
            clean_z = clean_cache[z_name][0]

            def swap(name: str, value: torch.Tensor, z_name=z_name, clean_z=clean_z) -> torch.Tensor:
                if name != z_name:
                    return value
                value = value.clone()
                heads = torch.arange(H, device=device)
                value[heads, :, heads] = clean_z.transpose(0, 1)  # run h takes head h's clean z everywhere
                return value

            start = corrupt_cache[names[layer]].expand(H, n, -1)
            model.forward(torch.tensor([corrupt_ids]).expand(H, n), observer=final.__setitem__,
                          wants=final_name.__eq__, return_logits=False, start=(layer, start), edit=swap)
            z_act[layer] = _metric(model, final[final_name][:, -1], pair).cpu() - corrupted_metric

    labels = tuple(f"resid_pre {layer}" for layer in range(L)) + ("final",)
    result_resid_act, result_resid_attr = frozen(resid_act, np.float64), frozen(resid_attr.cpu(), np.float64)
    result_z_act, result_z_attr = frozen(z_act, np.float64), frozen(z_attr.cpu(), np.float64)
    return Patching(
        name=info.name, ln_free=model.ln_free, clean_ids=frozen(np.array(clean_ids), np.int64),
        corrupted_ids=frozen(np.array(corrupt_ids), np.int64), answer_id=a, counterfactual_id=b,
        clean_metric=clean_metric, corrupted_metric=corrupted_metric, normaliser=clean_metric - corrupted_metric,
        resid_labels=labels, resid_act=result_resid_act, resid_attr=result_resid_attr, z_act=result_z_act,
        z_attr=result_z_attr, resid_agreement=agreement(result_resid_act, result_resid_attr),
        z_agreement=agreement(result_z_act, result_z_attr))


def patch_models(models: Sequence[LoadedModel], clean, corrupted, answer, counterfactual,
                 prepend_bos: bool = True) -> tuple[Patching, ...]:
    """:func:`patching` for each model on the same prompts (side by side)."""
    return tuple(patching(m, clean, corrupted, answer, counterfactual, prepend_bos) for m in models)
