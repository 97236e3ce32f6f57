"""A GPT-2 forward pass over folded weights, with TransformerLens hook names.

Folding
-------
Every GPT-2 LayerNorm computes ``LN(x) = (x - mean(x)) / sigma(x) * w + b``
with ``sigma(x) = sqrt(var(x) + eps)``.  Mean-centring is the linear map
``C = I - 11^T/d``, so ``C``, ``w`` and ``b`` fold into whatever reads the LN's
output (``W -> C diag(w) W``, ``b_W -> b W + b_W``), exactly as TransformerLens'
``fold_ln`` does.  What is left of the LN is the division by ``sigma``.

The LN-free checkpoints (gpt2_noLN, ``schaeff/*_LNFree*``) store
``w' = w * 1e6`` and ``eps = 1e12``, so ``sigma ~= sqrt(eps)`` and the stored
LN computes ``(x - mean) * w'/sqrt(eps) + b``.  For them we fold
``w = w'/sqrt(eps)`` and drop the division altogether: the model has **no
normalisation at all**, the map from any residual stream to the logits is
linear, and attribution is exact by construction.  (The stored checkpoint, run
in ``transformers``, differs from this model by a relative ``var/(2 eps)``; a
run reports that deviation, see ``ModelRun.hf_deviation``.)

For models with LN the division stays, recorded under the TransformerLens
names ``blocks.{l}.ln1.hook_scale``, ``ln2.hook_scale`` and
``ln_final.hook_scale``.  LN-free models have no such hooks: nothing in them
divides by anything.

Hook names and shapes follow TransformerLens (``blocks.{l}.hook_resid_pre``,
``blocks.{l}.attn.hook_pattern`` ``[batch, head, query, key]``,
``blocks.{l}.attn.hook_z`` ``[batch, pos, head, d_head]``...), so a notebook
written against ``run_with_cache`` carries over.  One hook is our own:
``blocks.{l}.attn.hook_attn_to_first`` ``[batch, head, query]``, the attention
on position 0, which the fused attention kernel yields without materialising
the pattern (the attention output for a value that is 1 at position 0).  Nothing is registered on any
module: observers are arguments of one call, so concurrent calls on one
loaded model never see each other's hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a model can run in, by name (float32 first: the default, which small logit differences need)."""

OWN_HOOKS = ("attn.hook_attn_to_first",)
"""Hook names (after ``blocks.{l}.``) that noln_core adds to TransformerLens' set."""

Observer = Callable[[str, torch.Tensor], None]
"""Called as ``observer(hook_name, activation)`` during a forward pass."""

Editor = Callable[[str, torch.Tensor], torch.Tensor]
"""Called as ``edit(hook_name, activation)`` for the names in ``EDITABLE``; returns the activation to go on with."""

EDITABLE = ("hook_resid_pre", "attn.hook_z", "mlp.hook_post", "hook_resid_post")
"""Hook names (after ``blocks.{l}.``) an :data:`Editor` can replace."""


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is: its identity and shape."""

    name: str
    """Display name (the spec the user gave, e.g. ``apollo-research/gpt2_noLN@v4``)."""
    source: str
    """Hub repo id or local directory."""
    revision: str | None
    """Requested revision, ``None`` for the default branch or a local directory."""
    commit: str | None
    """Resolved commit hash of a hub snapshot, when known."""
    ln_free: bool
    """True when the checkpoint carried the neutralising trick and the model has no normalisation."""
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    n_ctx: int
    d_vocab: int
    eps: float
    """The checkpoint's ``layer_norm_epsilon`` (1e12 for the LN-free trick)."""
    act_fn: str
    bos_token_id: int
    device: str
    dtype: str
    warnings: tuple[str, ...] = ()
    """Anything odd noticed while loading, one line each."""

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class GPT2Weights:
    """Folded GPT-2 weights, stacked over layers.  Shapes use ``L`` layers, ``d`` = d_model.

    The unembedding is kept as the (possibly tied) embedding matrix plus a
    folded scale and bias, so that tied checkpoints hold one copy of the
    ``[d_vocab, d]`` matrix: ``logits = (C x / sigma) * w_U @ W_U_rows.T + b_U``.
    """

    W_E: torch.Tensor
    """(d_vocab, d) token embedding."""
    W_pos: torch.Tensor
    """(n_ctx, d) position embedding."""
    W_QKV: torch.Tensor
    """(L, d, 3d) fused Q/K/V projections with ln_1 folded in (centring included)."""
    b_QKV: torch.Tensor
    """(L, 3d)."""
    W_O: torch.Tensor
    """(L, d, d) attention output projection; rows are ``head*d_head + i``."""
    b_O: torch.Tensor
    """(L, d)."""
    W_in: torch.Tensor
    """(L, d, d_mlp) MLP input with ln_2 folded in."""
    b_in: torch.Tensor
    """(L, d_mlp)."""
    W_out: torch.Tensor
    """(L, d_mlp, d)."""
    b_out: torch.Tensor
    """(L, d)."""
    W_U_rows: torch.Tensor
    """(d_vocab, d) unembedding rows before the folded ln_f scale (the same tensor as ``W_E`` when tied)."""
    w_U: torch.Tensor
    """(d,) ln_f weight folded into the unembedding (already divided by sqrt(eps) for LN-free models)."""
    b_U: torch.Tensor
    """(d_vocab,) ln_f bias pushed through the unembedding, plus any lm_head bias."""

    def unembed_direction(self, answer: int, counterfactual: int) -> torch.Tensor:
        """(d,) ``u`` with ``logit[a] - logit[b] = (C x / sigma) . u + const``; ``u`` is centred."""
        u = (self.W_U_rows[answer] - self.W_U_rows[counterfactual]).float() * self.w_U.float()
        return u - u.mean()

    def unembed_constant(self, answer: int, counterfactual: int) -> float:
        """The bias term of the logit difference: ``b_U[a] - b_U[b]``."""
        return float(self.b_U[answer].float() - self.b_U[counterfactual].float())

    def tensors(self) -> Iterable[torch.Tensor]:
        return (getattr(self, f) for f in self.__dataclass_fields__)


def fold_checkpoint(
    get: Callable[..., torch.Tensor], has: Callable[[str], bool], n_layers: int, eps: float, ln_free: bool
) -> GPT2Weights:
    """Build float32 :class:`GPT2Weights` from an HF GPT-2 checkpoint, one tensor at a time.

    ``get(key, out=None)`` returns a tensor of the checkpoint (keys without
    the ``transformer.`` prefix), written into ``out`` when given; ``has(key)``
    says whether it exists.  Each matrix lands once in a preallocated layer
    stack and is folded in place, so loading holds the final weights plus at
    most one checkpoint tensor.

    Folding ``x -> C x * w + b`` into ``y = x W + b_W`` gives
    ``W' = C diag(w) W`` (scale the rows, subtract their mean) and
    ``b' = b_W + b W``.  ``ln_free`` first divides every LN weight by
    ``sqrt(eps)``, undoing the stored x1e6 of the neutralising trick.
    """
    undo = 1.0 / math.sqrt(eps) if ln_free else 1.0

    def f32(key: str) -> torch.Tensor:
        return get(key).to(torch.float32)

    d, d_mlp = f32("h.0.attn.c_proj.bias").shape[0], f32("h.0.mlp.c_fc.bias").shape[0]
    W_QKV, b_QKV = torch.empty(n_layers, d, 3 * d), torch.empty(n_layers, 3 * d)
    W_O, b_O = torch.empty(n_layers, d, d), torch.empty(n_layers, d)
    W_in, b_in = torch.empty(n_layers, d, d_mlp), torch.empty(n_layers, d_mlp)
    W_out, b_out = torch.empty(n_layers, d_mlp, d), torch.empty(n_layers, d)

    def fold_into(W: torch.Tensor, b: torch.Tensor, prefix: str, ln: str) -> None:
        w_ln, b_ln = f32(ln + ".weight") * undo, f32(ln + ".bias")
        get(prefix + ".weight", out=W)
        get(prefix + ".bias", out=b)
        b.add_(b_ln @ W)
        W.mul_(w_ln[:, None])
        W.sub_(W.mean(dim=0, keepdim=True))  # = C @ W for the symmetric centring matrix C

    for layer in range(n_layers):
        p = f"h.{layer}."
        fold_into(W_QKV[layer], b_QKV[layer], p + "attn.c_attn", p + "ln_1")
        get(p + "attn.c_proj.weight", out=W_O[layer]), get(p + "attn.c_proj.bias", out=b_O[layer])
        fold_into(W_in[layer], b_in[layer], p + "mlp.c_fc", p + "ln_2")
        get(p + "mlp.c_proj.weight", out=W_out[layer]), get(p + "mlp.c_proj.bias", out=b_out[layer])
    W_E = f32("wte.weight")
    W_U_rows = W_E
    if has("lm_head.weight"):
        lm_head = f32("lm_head.weight")
        if not torch.equal(lm_head, W_E):  # untied: keep the second matrix
            W_U_rows = lm_head
    w_f, b_f = f32("ln_f.weight") * undo, f32("ln_f.bias")
    b_U = W_U_rows @ b_f
    if has("lm_head.bias"):
        b_U += f32("lm_head.bias")
    return GPT2Weights(
        W_E=W_E, W_pos=f32("wpe.weight"), W_QKV=W_QKV, b_QKV=b_QKV, W_O=W_O, b_O=b_O,
        W_in=W_in, b_in=b_in, W_out=W_out, b_out=b_out, W_U_rows=W_U_rows, w_U=w_f, b_U=b_U,
    )


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_new,
    "gelu_fast": _gelu_new,
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
}


def _scale(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm's centring and divisor, in float32: ``(x - mean, sqrt(var + eps))``."""
    xf = x.float()
    centred = xf - xf.mean(-1, keepdim=True)
    return centred, (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A GPT-2 ready for analysis: folded weights, tokenizer and identity.

    It holds no per-run state.  :meth:`run_with_cache` and :meth:`forward`
    are pure functions of their arguments, safe to call from many threads.
    """

    info: ModelInfo
    weights: GPT2Weights
    tokenizer: object = field(repr=False)
    """A ``tokenizers.Tokenizer`` (GPT-2 byte-level BPE)."""
    scale_attn_by_inverse_layer_idx: bool = False

    @property
    def ln_free(self) -> bool:
        return self.info.ln_free

    @property
    def device(self) -> torch.device:
        return self.weights.W_E.device

    @property
    def nbytes(self) -> int:
        """Bytes of the weights (a tied unembedding counted once)."""
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in self.weights.tensors()}.values())

    def hook_names(self) -> list[str]:
        """Every hook name a forward pass can report, in execution order."""
        names = ["hook_embed", "hook_pos_embed"]
        ln = not self.ln_free
        for layer in range(self.info.n_layers):
            b = f"blocks.{layer}."
            names.append(b + "hook_resid_pre")
            if ln:
                names += [b + "ln1.hook_scale", b + "ln1.hook_normalized"]
            names += [b + f"attn.hook_{x}" for x in ("q", "k", "v", "attn_scores", "pattern", "attn_to_first", "z")]
            names += [b + "hook_attn_out", b + "hook_resid_mid"]
            if ln:
                names += [b + "ln2.hook_scale", b + "ln2.hook_normalized"]
            names += [b + "mlp.hook_pre", b + "mlp.hook_post", b + "hook_mlp_out", b + "hook_resid_post"]
        if ln:
            names += ["ln_final.hook_scale", "ln_final.hook_normalized"]
        return names

    def forward(
        self,
        tokens: torch.Tensor,
        observer: Observer | None = None,
        wants: Callable[[str], bool] | None = None,
        return_logits: bool = True,
        stop_at_layer: int | None = None,
        edit: Editor | None = None,
        grad: bool = False,
        start: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Run on ``tokens`` ``[batch, pos]``; return logits ``[batch, pos, d_vocab]`` (float32).

        ``observer(name, tensor)`` is called for each hook name that ``wants``
        accepts (all of them when ``wants`` is None).  With ``return_logits``
        False the unembedding is skipped and ``None`` returned.  With
        ``stop_at_layer=k`` (TransformerLens' name) only blocks ``0..k-1`` run,
        and ``None`` is returned.

        Interventions (patching, ablation, gradients), all off by default:
        ``edit(name, tensor)`` returns the tensor the pass goes on with, for the
        names in ``EDITABLE`` (``blocks.{l}.hook_resid_pre``, ``attn.hook_z``,
        ``mlp.hook_post``, ``hook_resid_post``), before any observer sees it.
        ``grad`` runs with autograd on (so a caller can ``retain_grad`` what its
        editor returns and call ``backward``).  ``start=(l, resid)`` begins at
        block ``l`` from ``resid`` (its ``hook_resid_pre``), skipping the
        embedding and the blocks before it (TransformerLens' ``start_at_layer``).
        """
        info, w = self.info, self.weights
        if tokens.ndim == 1:
            tokens = tokens[None]
        n = tokens.shape[-1]
        if n > info.n_ctx:
            raise ValueError(f"{n} tokens exceed the context window of {info.n_ctx}")
        tokens = tokens.to(w.W_E.device)
        emit = observer is not None
        want = (lambda _: emit) if wants is None else (lambda name: emit and wants(name))
        dtype = w.W_E.dtype
        H, dh, eps, ln = info.n_heads, info.d_head, info.eps, not info.ln_free
        act = ACTIVATIONS[info.act_fn]

        def put(name: str, value: torch.Tensor) -> None:
            if want(name):
                observer(name, value)  # type: ignore[misc]

        def norm_in(x: torch.Tensor, name: str) -> torch.Tensor:
            if not ln:
                return x
            xf = x.float()
            if want(name + ".hook_scale"):
                put(name + ".hook_scale", (xf.var(-1, unbiased=False, keepdim=True) + eps).sqrt())
            normed = torch.nn.functional.layer_norm(xf, (xf.shape[-1],), eps=eps)  # centring and division, fused
            put(name + ".hook_normalized", normed)
            return normed.to(dtype)

        def change(name: str, value: torch.Tensor) -> torch.Tensor:
            return value if edit is None else edit(name, value)

        with torch.enable_grad() if grad else torch.inference_mode():
            if start is None:
                embed = w.W_E[tokens]
                pos = w.W_pos[:n][None]
                put("hook_embed", embed)
                put("hook_pos_embed", pos.expand_as(embed))
                resid, first_layer = embed + pos, 0
            else:
                first_layer, resid = start
            marker = None
            last = info.n_layers if stop_at_layer is None else min(stop_at_layer, info.n_layers)
            for layer in range(first_layer, last):
                b = f"blocks.{layer}."
                resid = change(b + "hook_resid_pre", resid)
                put(b + "hook_resid_pre", resid)
                x = norm_in(resid, b + "ln1")
                qkv = x @ w.W_QKV[layer] + w.b_QKV[layer]
                q, k, v = (t.unflatten(-1, (H, dh)) for t in qkv.split(info.d_model, dim=-1))
                put(b + "attn.hook_q", q), put(b + "attn.hook_k", k), put(b + "attn.hook_v", v)
                div = math.sqrt(dh) * ((layer + 1) if self.scale_attn_by_inverse_layer_idx else 1)
                if want(b + "attn.hook_attn_scores") or want(b + "attn.hook_pattern"):
                    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / div
                    causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
                    scores = scores.masked_fill(~causal, float("-inf"))
                    put(b + "attn.hook_attn_scores", scores)
                    pattern = scores.softmax(-1)
                    put(b + "attn.hook_pattern", pattern)
                    put(b + "attn.hook_attn_to_first", pattern[..., 0])
                    z = torch.einsum("bhqk,bkhd->bqhd", pattern.to(dtype), v)
                else:  # nobody looks at the whole pattern: the fused kernel, as transformers uses
                    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
                    z = torch.nn.functional.scaled_dot_product_attention(
                        qt, kt, v.transpose(1, 2), is_causal=True, scale=1.0 / div
                    ).transpose(1, 2)
                    if want(b + "attn.hook_attn_to_first"):
                        # Attention to position 0 is the output for a value that is 1 at position 0 and 0 elsewhere.
                        # It goes through the same fused kernel (which needs a value as wide as the keys): one more
                        # attention call, instead of materialising the n x n pattern.
                        if marker is None:
                            marker = torch.zeros(1, 1, n, dh, dtype=dtype, device=v.device)
                            marker[..., 0, 0] = 1
                        first = torch.nn.functional.scaled_dot_product_attention(
                            qt, kt, marker.expand(tokens.shape[0], H, n, dh), is_causal=True, scale=1.0 / div)
                        put(b + "attn.hook_attn_to_first", first[..., 0])
                z = change(b + "attn.hook_z", z)
                put(b + "attn.hook_z", z)
                attn_out = z.flatten(-2) @ w.W_O[layer] + w.b_O[layer]
                put(b + "hook_attn_out", attn_out)
                resid = resid + attn_out
                put(b + "hook_resid_mid", resid)
                x = norm_in(resid, b + "ln2")
                pre = x @ w.W_in[layer] + w.b_in[layer]
                put(b + "mlp.hook_pre", pre)
                post = change(b + "mlp.hook_post", act(pre))
                put(b + "mlp.hook_post", post)
                mlp_out = post @ w.W_out[layer] + w.b_out[layer]
                put(b + "hook_mlp_out", mlp_out)
                resid = change(b + "hook_resid_post", resid + mlp_out)
                put(b + "hook_resid_post", resid)
            if not return_logits or stop_at_layer is not None:
                return None
            return self.unembed(resid, observer=put, grad=grad)

    def unembed(self, resid: torch.Tensor, observer: Observer | None = None,
                vocab: torch.Tensor | None = None, grad: bool = False,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32) from final residual-stream vectors ``resid`` (..., d_model): the model's readout.

        ``vocab`` (token ids) computes only those columns, in that order.

        With LN: ``ln_f`` (centring, division by ``sqrt(var + eps)``, folded
        weight and bias) then the unembedding.  LN-free: centring only, so the
        map is affine.  The unembedding stays tied to ``W_E``, so ``ln_f``'s
        centring is applied here rather than folded.

        ``scale`` (..., 1), for models with LN: divide by it instead of the
        scale of ``resid`` itself (the final LN's scale *frozen*, as in a
        direct-effect measurement).  ``grad`` keeps autograd on.
        """
        w = self.weights
        with torch.enable_grad() if grad else torch.inference_mode():
            if self.ln_free:
                x = resid - resid.mean(-1, keepdim=True)
            else:
                centred, own = _scale(resid, self.info.eps)
                scale = own if scale is None else scale
                if observer is not None:
                    observer("ln_final.hook_scale", scale)
                x = centred / scale
                if observer is not None:
                    observer("ln_final.hook_normalized", x)
                x = x.to(w.W_E.dtype)
            x = (x * w.w_U).reshape(-1, x.shape[-1])
            rows, bias = (w.W_U_rows, w.b_U) if vocab is None else (w.W_U_rows[vocab], w.b_U[vocab])
            logits = torch.addmm(bias.to(x.dtype), x, rows.T)  # bias fused: one vocabulary-sized output
            return logits.float().reshape(*resid.shape[:-1], -1)

    def run_with_cache(
        self, tokens: torch.Tensor, names_filter: Callable[[str], bool] | Iterable[str] | str | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """TransformerLens-style ``(logits, cache)``; the cache maps hook names to tensors.

        ``names_filter`` is a name, a list of names or a predicate, as in
        TransformerLens.  Tensors keep their device and the batch dimension.
        """
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if names_filter is not None and not callable(names_filter):
            wanted = set(names_filter)
            names_filter = wanted.__contains__
        cache: dict[str, torch.Tensor] = {}
        logits = self.forward(tokens, observer=cache.__setitem__, wants=names_filter)
        assert logits is not None
        return logits, cache
