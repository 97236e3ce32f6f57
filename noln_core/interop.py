"""Hand-off to the ecosystem: a loaded model as an ordinary ``transformers`` ``GPT2LMHeadModel``.

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
"""

from __future__ import annotations

import torch
from torch import nn

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
