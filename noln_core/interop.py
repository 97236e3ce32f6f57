"""Hand-off to the ecosystem: a loaded model as an ordinary ``transformers`` ``GPT2LMHeadModel``, or as a
TransformerLens 4 ``TransformerBridge``.

:func:`to_transformers` builds a ``GPT2LMHeadModel`` that computes exactly what
:class:`~noln_core.model.LoadedModel` computes, from its folded weights:

* every LayerNorm's weight and bias, and its mean-centring, are already folded
  into the next matrix (``W_QKV``, ``W_in``), so ``ln_1`` and ``ln_2`` become
  ``nn.Identity`` for LN-free models, and a LayerNorm *without* affine for models
  with LN (the division is all that is left);
* ``ln_f`` becomes :class:`FinalScale` for LN-free models (centre, then the
  folded ``ln_f`` weight: the map is affine) or a LayerNorm whose weight is that
  folded weight; the ``ln_f`` bias, pushed through the unembedding, is the bias
  of ``lm_head`` (GPT-2 has none, so it is added), and ``lm_head`` stays tied to
  the embedding.

This is the model card's nnsight recipe ("HF GPT-2 with the LNs replaced by
identities") done without its two pitfalls: no ε that a library can reset (there
is no division left to neutralise), and no lost constant term (the bias is in
``lm_head``).  The module lives in memory: ``save_pretrained`` would drop
``lm_head.bias``, so save the original checkpoint instead.

:func:`to_transformer_lens` hands the same weights to TransformerLens 4.  Its ``TransformerBridge`` always
computes a LayerNorm, ``(x - mean) / sqrt(var + eps) * w + b``, and offers no identity norm, so an LN-free
model goes in as the published checkpoints do: LN weight 1e6, eps 1e12.  That is the closest TransformerLens
offers, and it is *not* exact: each norm divides by ``sqrt(var + 1e12) / 1e6 = 1 + var / 2e12 + ...``, a
relative error of ``var / 2e12`` per norm (below 1e-6 while the residual stream's variance stays under 1e6;
measured on each hand-off and kept as ``bridge.noln_deviation``).  A model *with* LN goes in exactly: its
folded weights with unit LN weights and its own eps.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InputError
from .model import LoadedModel


class FinalScale(nn.Module):
    """``(x - mean(x)) * weight``: the LN-free final "norm", an affine map (its bias lives in ``lm_head``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) * self.weight


def to_transformers(model: LoadedModel):
    """A ``transformers.GPT2LMHeadModel`` (eval mode, on the model's device and dtype) computing exactly ``model``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    info, w = model.info, model.weights
    config = GPT2Config(
        vocab_size=info.d_vocab, n_positions=info.n_ctx, n_embd=info.d_model, n_layer=info.n_layers,
        n_head=info.n_heads, n_inner=info.d_mlp, activation_function=info.act_fn, layer_norm_epsilon=info.eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=info.bos_token_id,
        eos_token_id=info.bos_token_id, scale_attn_by_inverse_layer_idx=model.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=w.W_U_rows is w.W_E,
    )
    hf = GPT2LMHeadModel(config)
    dtype, device = w.W_E.dtype, w.W_E.device
    with torch.no_grad():
        t = hf.transformer
        t.wte.weight.copy_(w.W_E)
        t.wpe.weight.copy_(w.W_pos)
        for layer, block in enumerate(t.h):
            block.attn.c_attn.weight.copy_(w.W_QKV[layer])  # Conv1D stores (in, out), as the folded weights are
            block.attn.c_attn.bias.copy_(w.b_QKV[layer])
            block.attn.c_proj.weight.copy_(w.W_O[layer])
            block.attn.c_proj.bias.copy_(w.b_O[layer])
            block.mlp.c_fc.weight.copy_(w.W_in[layer])
            block.mlp.c_fc.bias.copy_(w.b_in[layer])
            block.mlp.c_proj.weight.copy_(w.W_out[layer])
            block.mlp.c_proj.bias.copy_(w.b_out[layer])
            if model.ln_free:
                block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
            else:
                block.ln_1 = nn.LayerNorm(info.d_model, eps=info.eps, elementwise_affine=False)
                block.ln_2 = nn.LayerNorm(info.d_model, eps=info.eps, elementwise_affine=False)
        if model.ln_free:
            t.ln_f = FinalScale(w.w_U.float())
        else:
            t.ln_f = nn.LayerNorm(info.d_model, eps=info.eps, bias=False)
            t.ln_f.weight.copy_(w.w_U)
        if not config.tie_word_embeddings:
            hf.lm_head.weight = nn.Parameter(w.W_U_rows.detach().clone())
        hf.lm_head.bias = nn.Parameter(w.b_U.detach().clone().float())
    return hf.to(device=device, dtype=dtype).eval()


TRICK_WEIGHT, TRICK_EPS = 1e6, 1e12
"""How an LN-free model's norms are written for a library that always normalises (the published checkpoints' trick)."""
PROBE_TEXT = "When Mary and John went to the store, John gave a drink to"


def to_transformer_lens(model: LoadedModel, probe_text: str = PROBE_TEXT):
    """A TransformerLens 4 ``TransformerBridge`` (plain mode) over :func:`to_transformers`' weights.

    LN-free models get the eps-1e12 trick (the closest a bridge can come; see the module docstring); models
    with LN are exact.  The bridge's largest relative logit error against ``model`` on ``probe_text`` is
    measured here and kept as ``bridge.noln_deviation``.  Stay in plain mode: ``enable_compatibility_mode()``
    re-processes the weights and moves further from the exact model.  float16 cannot hold the trick's 1e6.
    """
    from transformers import PreTrainedTokenizerFast
    from transformer_lens.model_bridge import TransformerBridge

    from .tokenizer import tokenize

    w = model.weights
    if model.ln_free and w.W_E.dtype == torch.float16:
        raise InputError("TransformerLens needs an LN-free model's norms as weight 1e6 and eps 1e12, beyond "
                         "float16's range: load the model in float32 or bfloat16 for the hand-off")
    hf = to_transformers(model)
    d_model = model.info.d_model
    eps = TRICK_EPS if model.ln_free else model.info.eps
    scale = TRICK_WEIGHT if model.ln_free else 1.0
    with torch.no_grad():
        for block in hf.transformer.h:
            for name in ("ln_1", "ln_2"):
                norm = nn.LayerNorm(d_model, eps=eps)
                norm.weight.fill_(scale)
                norm.bias.zero_()
                setattr(block, name, norm)
        norm = nn.LayerNorm(d_model, eps=eps)
        norm.weight.copy_(w.w_U.float() * scale)
        norm.bias.zero_()
        hf.transformer.ln_f = norm
    hf.config.layer_norm_epsilon = eps
    hf = hf.to(device=w.W_E.device, dtype=w.W_E.dtype).eval()
    bridge = TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf, tokenizer=PreTrainedTokenizerFast(tokenizer_object=model.tokenizer),
        device=w.W_E.device, dtype=w.W_E.dtype)
    ids = torch.tensor([tokenize(model, probe_text)], device=w.W_E.device)
    with torch.no_grad():
        exact = model.forward(ids).float()
        got = bridge(ids).float()
    bridge.noln_deviation = ((got - exact).abs().max() / exact.abs().max()).item()
    return bridge
