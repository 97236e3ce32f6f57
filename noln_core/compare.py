"""One side-by-side run: tokenise once, run every model once, keep what the analyses need.

``compare`` returns a :class:`RunResult`: frozen dataclasses holding read-only
NumPy arrays on the CPU, the same token ids for every model.  The analyses
(:mod:`noln_core.analyses`) are pure functions of it.

What a forward pass keeps is decided by :class:`Capture`, one small reducer
per hook name: norms instead of residual streams, attention on position 0 and
the analysed query's pattern row instead of whole patterns, the residual
writes at the analysed position.  A 1024-token run of GPT-2 small so keeps a
few MB per model rather than the gigabyte a full cache would hold.  Full
attention patterns are kept only on request (``keep_patterns``), and only
while they fit ``max_pattern_elements``.

The attributed direction is applied *after* the forward pass, so the run can
choose its own target (``auto_target``: what the app's pickers default to) and
a text is run once however the target is found.  The analyses then do the
maths: dividing by the final LN's scale, reading the lens, the NMAE, the sink
rates.  Two projections onto the direction happen here because their inputs
are too large to keep: each head's value writes at every source position
(``L x H x n x d``) and each MLP neuron's write (``L x d_mlp x d``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .checkpoint import DEVIATION_WARNING, trick_deviation
from .divergence import distribution_stats, pair_divergences
from .errors import InputError, TokenizerMismatchError
from .model import LoadedModel, ModelInfo
from .tokenizer import decode_rows, resolve_token, token_pieces, tokenize

TOP_K = 10
def vocab_chunk(n: int) -> int:
    """Positions unembedded at a time for the full-vocabulary statistics (``rows x d_vocab`` logits at once).

    Short texts (the app's) take 64 rows, which keeps their extra memory to a few tens of MB; long ones take
    512, since every chunk reads the whole unembedding matrix again and that reading dominates at length.
    """
    return 64 if n <= 256 else 512
MAX_PATTERN_ELEMENTS = 16_000_000
"""Full attention patterns (layers x heads x n x n floats) are kept up to this size (64 MB)."""


def frozen(x: torch.Tensor | np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """A read-only CPU array owning exactly its own memory, so results can be shared between threads, cached
    safely and counted by their ``nbytes`` (a view would keep the whole tensor it came from alive)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.untyped_storage().nbytes() != x.numel() * x.element_size():
            x = x.clone()
        arr = x.cpu().numpy()
    else:
        arr = np.asarray(x)
    arr = np.ascontiguousarray(arr, dtype=dtype)
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True)
class Target:
    """The logit difference being attributed: ``logit[answer] - logit[counterfactual]`` at ``position``."""

    answer_id: int
    counterfactual_id: int
    answer: str
    """The answer token as text."""
    counterfactual: str
    answer_pieces: tuple[str, ...]
    """How the answer text split into tokens (only the first is used)."""
    counterfactual_pieces: tuple[str, ...]
    chosen_by_run: bool = False
    """True when ``compare`` picked the target itself (``auto_target``)."""


@dataclass(frozen=True)
class AttributionCapture:
    """Everything one model's attribution analyses need at the analysed position ``p``.

    ``u`` is the (centred) unembedding direction of the logit difference and
    ``scale`` the final LN's divisor at ``p`` (1 for LN-free models), so a
    residual-stream vector ``x`` contributes ``(C x) . u / scale``.  The
    projections below are *not* divided by ``scale``; the analyses do that.
    """

    logit_diff: float
    """The model's own ``logit[a] - logit[b]`` at ``p``, from its output logits."""
    constant: float
    """``b_U[a] - b_U[b]``: the final LN bias pushed through the unembedding."""
    u: np.ndarray
    """(d_model,) centred direction ``C (w_f * (W_U[a] - W_U[b]))``."""
    scale: float
    """Final LN divisor ``sqrt(var + eps)`` at ``p``; exactly 1.0 for LN-free models."""
    components: np.ndarray
    """(2 + 2L, d_model) residual-stream writes at ``p``: embed, pos_embed, then attn_0, mlp_0, attn_1, ..."""
    component_labels: tuple[str, ...]
    head_out: np.ndarray
    """(L, H, d_model) each head's write to the residual stream at ``p`` (``z_h W_O^h``, its value bias included)."""
    value_bias_out: np.ndarray
    """(L, H, d_model) the part of ``head_out`` that is the head's value bias: ``b_V^h W_O^h`` (``ln_1``'s bias
    folded into ``b_V``), the same at every position since attention sums to 1.  TransformerLens' default
    ``fold_value_biases`` moves it into ``b_O``."""
    source_attention: np.ndarray
    """(L, H, n) the analysed position's attention on each source token (its pattern row)."""
    attn_bias: np.ndarray
    """(L, d_model) ``b_O``: the part of each attention layer's output that belongs to no head."""
    head_source: np.ndarray
    """(L, H, n) each head's write at ``p`` split by source token, projected: ``pattern[p, s] * (v_s W_O^h) . u``."""
    neurons: np.ndarray
    """(L, d_mlp) each MLP neuron's write at ``p``, projected: ``post[p, i] * W_out[i] . u``."""
    mlp_bias: np.ndarray
    """(L,) each MLP output bias, projected: ``b_out . u``."""
    accumulated: np.ndarray
    """(2L + 1, d_model) residual stream at ``p``: resid_pre_0, resid_mid_0, resid_pre_1, ..., final resid_post."""
    accumulated_labels: tuple[str, ...]
    eps: float
    """The final LN's epsilon (used only when ``ln_free`` is False)."""
    ln_free: bool


@dataclass(frozen=True)
class ModelRun:
    """One model's captured run on the shared token ids (``n`` tokens, ``L`` layers, ``H`` heads)."""

    info: ModelInfo
    next_logprobs: np.ndarray
    """(n - 1,) ``log p(token[i+1] | tokens[..i])``; the per-token loss is its negative."""
    entropy: np.ndarray
    """(n,) entropy of the next-token distribution at each position, in nats."""
    top_ids: np.ndarray
    """(k,) most likely next tokens at the analysed position."""
    top_logprobs: np.ndarray
    """(k,) their log-probabilities."""
    top_tokens: tuple[str, ...]
    """(k,) the same tokens as text."""
    position_logprobs: np.ndarray
    """(d_vocab,) the whole next-token distribution at the chosen position (log-probs)."""
    resid_pre_norm: np.ndarray
    """(L, n) L2 norm of ``blocks.{l}.hook_resid_pre``."""
    resid_mid_norm: np.ndarray
    """(L, n) L2 norm of ``blocks.{l}.hook_resid_mid``."""
    resid_post_norm: np.ndarray
    """(L, n) L2 norm of ``blocks.{l}.hook_resid_post``."""
    ln1_scale: np.ndarray | None
    """(L, n) what ln_1 divides by (``sqrt(var + eps)``); None for LN-free models, which divide by nothing."""
    ln2_scale: np.ndarray | None
    """(L, n) likewise for ln_2."""
    ln_final_scale: np.ndarray | None
    """(n,) likewise for ln_f."""
    attn_to_first: np.ndarray
    """(L, H, n) attention each query position pays to position 0."""
    attn_patterns: np.ndarray | None
    """(L, H, n, n) full patterns, or None unless asked for (``keep_patterns``) and small enough."""
    hf_deviation: float | None
    """LN-free only: the largest relative gap ``1 - 1/sqrt(1 + var/eps)`` between the stored checkpoint (run with
    its eps-1e12 LayerNorms) and this exact LN-free model, over every LN input of this run."""
    attribution: AttributionCapture | None
    """Present when the run has a :class:`Target`."""

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def nbytes(self) -> int:
        """Bytes held by this run's arrays (what a cache of runs should count)."""
        return nbytes(self)


@dataclass(frozen=True)
class PairDivergence:
    """Per-position comparison of two models' next-token distributions."""

    a: int
    """Index of the first model in ``RunResult.runs``."""
    b: int
    kl_ab: np.ndarray
    """(n,) KL(A || B) in nats."""
    kl_ba: np.ndarray
    """(n,) KL(B || A)."""
    js: np.ndarray
    """(n,) Jensen-Shannon divergence (nats, at most ln 2)."""
    top1_agree: np.ndarray
    """(n,) bool: both models' most likely next token is the same."""


@dataclass(frozen=True)
class RunResult:
    """The immutable result of :func:`compare`."""

    text: str
    """The text as analysed (after any truncation)."""
    token_ids: np.ndarray
    """(n,) token ids shared by every model (BOS first when ``prepend_bos``)."""
    tokens: tuple[str, ...]
    """Each token decoded on its own."""
    pieces: tuple[str, ...]
    """Each token's byte-level BPE piece (``Ġ`` marks a space)."""
    prepend_bos: bool
    position: int
    """The analysed position as a non-negative index into ``token_ids``."""
    target: Target | None
    runs: tuple[ModelRun, ...]
    pairs: tuple[PairDivergence, ...]
    """Every pair ``(a, b)`` with ``a < b``."""
    truncated: bool
    """True when the text was longer than the context window and cut."""
    warnings: tuple[str, ...] = field(default=())

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the result's arrays: the figure a byte-bounded cache counts."""
        return nbytes(self)

    def candidates(self) -> list[str]:
        """Every model's top predictions at the analysed position, in order, each once (the app's pickers)."""
        seen: list[str] = []
        for run in self.runs:
            for token in run.top_tokens:
                if token not in seen:
                    seen.append(token)
        return seen


def nbytes(obj) -> int:
    """Bytes of the NumPy arrays in ``obj``: an array, or dataclasses and tuples of them, recursively.

    Strings and scalars are not counted (they are small next to the arrays of any run).
    """
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(nbytes(getattr(obj, name)) for name in obj.__dataclass_fields__)
    return 0


def _check_models(models: Sequence[LoadedModel]) -> None:
    if not models:
        raise InputError("no models to compare: give at least one")
    first = models[0].info
    for other in (m.info for m in models[1:]):
        if other.d_vocab != first.d_vocab or other.bos_token_id != first.bos_token_id:
            raise TokenizerMismatchError(
                f"{first.name} (vocabulary {first.d_vocab}, BOS {first.bos_token_id}) and {other.name} (vocabulary "
                f"{other.d_vocab}, BOS {other.bos_token_id}) have different tokenizers: compare models that share one"
            )


def _shared_ids(models: Sequence[LoadedModel], text: str, prepend_bos: bool) -> list[int]:
    ids = tokenize(models[0], text, prepend_bos)
    for other in models[1:]:
        if other.tokenizer is models[0].tokenizer:
            continue
        other_ids = tokenize(other, text, prepend_bos)
        if other_ids != ids:
            at = next((i for i, (x, y) in enumerate(zip(ids, other_ids)) if x != y), min(len(ids), len(other_ids)))
            raise TokenizerMismatchError(
                f"{models[0].info.name} and {other.info.name} tokenise this text differently (first at token {at}): "
                "compare models that share a tokenizer"
            )
    return ids


class Capture:
    """Reduces one forward pass's activations to what :class:`ModelRun` keeps.

    One reducer per hook (``REDUCERS``), each keeping a per-layer reduction
    in ``self.kept[hook tail][layer]``.  Nothing here depends on the target.
    """

    def __init__(self, model: LoadedModel, p: int, keep_patterns: bool):
        self.model, self.p, self.keep_patterns = model, p, keep_patterns
        self.L = model.info.n_layers
        self.kept: dict[str, list] = {}
        self.embed_at_p: list[torch.Tensor] = []
        self.final_resid: torch.Tensor | None = None
        self.final_scale: torch.Tensor | None = None
        self.max_var = 0.0
        self.q_p: torch.Tensor | None = None

    def _keep(self, tail: str, layer: int, value: torch.Tensor) -> None:
        self.kept.setdefault(tail, [None] * self.L)[layer] = value

    def wants(self, name: str) -> bool:
        tail = name.rsplit(".", 1)[-1]
        if tail == "hook_pattern":
            return self.keep_patterns
        return tail in self.REDUCERS or name in ("hook_embed", "hook_pos_embed", "ln_final.hook_scale")

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if not name.startswith("blocks."):
            if name == "ln_final.hook_scale":
                self.final_scale = x[0, :, 0]
            else:  # hook_embed, hook_pos_embed
                self.embed_at_p.append(x[0, self.p].float().clone())
            return
        parts = name.split(".")
        layer, tail = int(parts[1]), parts[-1]
        if tail == "hook_scale":
            tail = f"{parts[2]}.hook_scale"  # ln1 or ln2
        self.REDUCERS[parts[-1]](self, tail, layer, x[0])

    # -- reducers: (self, tail, layer, activation without the batch axis) ----------------------------------------

    def _resid(self, tail: str, layer: int, x: torch.Tensor) -> None:
        xf = x.float()
        self._keep(tail + ".norm", layer, xf.norm(dim=-1))
        self._keep(tail + ".at_p", layer, xf[self.p].clone())  # a copy: a view would keep the whole stream alive
        last = tail == "hook_resid_post" and layer == self.L - 1
        if last:
            self.final_resid = x  # (n, d), the model's dtype: the vocabulary statistics unembed it in chunks
        if self.model.ln_free and (tail != "hook_resid_post" or last):
            self.max_var = max(self.max_var, float(xf.var(-1, unbiased=False).max()))

    def _scale(self, tail: str, layer: int, x: torch.Tensor) -> None:
        self._keep(tail, layer, x[:, 0])

    def _to_first(self, tail: str, layer: int, x: torch.Tensor) -> None:
        self._keep(tail, layer, x.float())  # (H, n)

    def _pattern(self, tail: str, layer: int, x: torch.Tensor) -> None:
        self._keep(tail, layer, x)

    def _q(self, tail: str, layer: int, x: torch.Tensor) -> None:
        self.q_p = x[self.p].float()  # (H, dh), consumed by the keys

    def _k(self, tail: str, layer: int, x: torch.Tensor) -> None:
        """The analysed query's pattern row, ``softmax(q_p . k_s / sqrt(dh))`` over ``s <= p``: O(n), not O(n^2)."""
        info = self.model.info
        div = info.d_head ** 0.5 * ((layer + 1) if self.model.scale_attn_by_inverse_layer_idx else 1)
        scores = torch.einsum("hd,shd->hs", self.q_p, x[: self.p + 1].float()) / div
        self._keep("row_p", layer, scores.softmax(-1))

    def _v(self, tail: str, layer: int, x: torch.Tensor) -> None:
        self._keep(tail, layer, x[: self.p + 1].clone())  # (p+1, H, dh), projected once the target is known

    def _z(self, tail: str, layer: int, x: torch.Tensor) -> None:
        self._keep(tail, layer, x[self.p].float().clone())  # (H, dh)

    def _out_at_p(self, tail: str, layer: int, x: torch.Tensor) -> None:
        self._keep(tail, layer, x[self.p].float().clone())

    REDUCERS = {
        "hook_resid_pre": _resid, "hook_resid_mid": _resid, "hook_resid_post": _resid, "hook_scale": _scale,
        "hook_attn_to_first": _to_first, "hook_pattern": _pattern, "hook_q": _q, "hook_k": _k, "hook_v": _v,
        "hook_z": _z, "hook_attn_out": _out_at_p, "hook_mlp_out": _out_at_p, "hook_post": _out_at_p,
    }

    def stack(self, tail: str) -> torch.Tensor:
        return torch.stack([x.float() for x in self.kept[tail]])


def _attribution(model: LoadedModel, cap: Capture, target: Target, logprobs_p: torch.Tensor) -> AttributionCapture:
    """Project what the forward pass kept onto the target's unembedding direction ``u``."""
    info, w = model.info, model.weights
    L, H, dh = info.n_layers, info.n_heads, info.d_head
    a, b = target.answer_id, target.counterfactual_id
    u = w.unembed_direction(a, b)
    scale = 1.0 if model.ln_free else float(cap.final_scale[cap.p])  # type: ignore[index]
    attn_out, mlp_out = cap.kept["hook_attn_out"], cap.kept["hook_mlp_out"]
    comps = list(cap.embed_at_p) + [x for layer in range(L) for x in (attn_out[layer], mlp_out[layer])]
    labels = ["embed", "pos_embed"] + [f"L{layer} {k}" for layer in range(L) for k in ("attn", "mlp")]
    pre, mid = cap.kept["hook_resid_pre.at_p"], cap.kept["hook_resid_mid.at_p"]
    acc = [x for layer in range(L) for x in (pre[layer], mid[layer])] + [cap.kept["hook_resid_post.at_p"][-1]]
    acc_labels = [f"L{layer} {k}" for layer in range(L) for k in ("pre", "mid")] + ["final"]
    W_O = w.W_O.float().view(L, H, dh, -1)
    head_out = torch.einsum("lhd,lhdm->lhm", cap.stack("hook_z"), W_O)
    Wo_u = W_O @ u  # (L, H, dh)
    head_source = torch.stack([
        cap.kept["row_p"][layer] * torch.einsum("shd,hd->hs", cap.kept["hook_v"][layer].float(), Wo_u[layer])
        for layer in range(L)
    ])
    n = len(cap.kept["hook_resid_pre.norm"][0])
    if head_source.shape[-1] < n:  # sources after p get no attention from p
        head_source = torch.nn.functional.pad(head_source, (0, n - head_source.shape[-1]))
    neurons = cap.stack("hook_post") * (w.W_out.float() @ u)
    b_V = w.b_QKV[:, 2 * info.d_model:].float().view(L, H, dh)
    value_bias_out = torch.einsum("lhd,lhdm->lhm", b_V, W_O)
    source_attention = torch.stack([cap.kept["row_p"][layer] for layer in range(L)])
    if source_attention.shape[-1] < n:
        source_attention = torch.nn.functional.pad(source_attention, (0, n - source_attention.shape[-1]))
    return AttributionCapture(
        logit_diff=float(logprobs_p[a] - logprobs_p[b]), constant=w.unembed_constant(a, b), u=frozen(u), scale=scale,
        components=frozen(torch.stack(comps)), component_labels=tuple(labels),
        head_out=frozen(head_out), value_bias_out=frozen(value_bias_out), source_attention=frozen(source_attention),
        attn_bias=frozen(w.b_O.float()), head_source=frozen(head_source),
        neurons=frozen(neurons), mlp_bias=frozen(w.b_out.float() @ u),
        accumulated=frozen(torch.stack(acc)), accumulated_labels=tuple(acc_labels), eps=info.eps, ln_free=model.ln_free,
    )


def _forward(model: LoadedModel, ids: list[int], p: int, keep_patterns: bool) -> Capture:
    """Run ``model`` once up to its final residual stream (the unembedding is left to :func:`_vocabulary`)."""
    cap = Capture(model, p, keep_patterns)
    model.forward(torch.tensor([ids], dtype=torch.long), observer=cap, wants=cap.wants, return_logits=False)
    return cap


@dataclass
class _VocabStats:
    """One model's full-vocabulary statistics, reduced as the chunks go."""

    entropy: list = field(default_factory=list)
    next_logprobs: list = field(default_factory=list)
    argmax: list = field(default_factory=list)
    final_scale: list = field(default_factory=list)
    position_logprobs: torch.Tensor | None = None
    top: tuple[torch.Tensor, torch.Tensor] | None = None


@torch.inference_mode()
def _vocabulary(models: Sequence[LoadedModel], caps: Sequence[Capture], ids: list[int],
                p: int) -> tuple[list[_VocabStats], dict[tuple[int, int], list]]:
    """Unembed every model's final residual ``chunk`` positions at a time and reduce each chunk at once.

    Per model: entropy, the log-prob of each actual next token, the top-1 token
    at every position, the whole distribution and the top-k at the analysed
    position, and the final LN's scale.  Per pair: KL both ways and JS
    (:func:`~noln_core.divergence.pair_divergences`).  Only ``chunk x vocab``
    logits exist at a time (:func:`vocab_chunk`), so memory does not grow with the text.
    """
    n = len(ids)
    chunk = vocab_chunk(n)
    stats = [_VocabStats() for _ in models]
    pairs: dict[tuple[int, int], list] = {(i, j): [[], [], []] for i in range(len(models)) for j in range(i + 1, len(models))}
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        per_model = []
        for model, cap, st in zip(models, caps, stats):
            def keep_scale(name: str, x: torch.Tensor, st: _VocabStats = st) -> None:
                if name == "ln_final.hook_scale":
                    st.final_scale.append(x[..., 0])

            logits = model.unembed(cap.final_resid[start:stop], observer=keep_scale)  # type: ignore[index]
            lse, probs, ent, top1 = distribution_stats(logits)
            targets = torch.tensor(ids[start + 1:stop + 1] + [0] * (stop - n + 1 if stop == n else 0),
                                   device=logits.device)
            st.entropy.append(ent)
            st.next_logprobs.append(logits.gather(-1, targets[:, None])[:, 0] - lse)
            st.argmax.append(top1)
            if start <= p < stop:
                st.position_logprobs = logits[p - start] - lse[p - start]
                st.top = st.position_logprobs.topk(min(TOP_K, logits.shape[-1]))
            per_model.append((logits, probs, lse, ent))
        for (i, j), out in pairs.items():
            if models[i] is models[j]:  # one model twice (A and C the same): nothing parts them
                zero = per_model[i][2].new_zeros(stop - start)
                values: tuple = (zero, zero, zero)
            else:
                (la, pa, lse_a, ha), (lb, pb, lse_b, hb) = per_model[i], per_model[j]
                if len(pairs) > 1:  # pair_divergences overwrites B's logits and probabilities; other pairs need them
                    lb, pb = lb.clone(), pb.clone()
                values = pair_divergences(la, lb, pa, pb, lse_a, lse_b, ha, hb)
            for kept, value in zip(out, values):
                kept.append(value)
        del per_model
    return stats, pairs


def _model_run(model: LoadedModel, cap: Capture, vocab: _VocabStats, target: Target | None,
               keep_patterns: bool) -> ModelRun:
    ln = not model.ln_free
    top_values, top_ids = vocab.top  # type: ignore[misc]
    if ln:
        cap.final_scale = torch.cat(vocab.final_scale)
    assert vocab.position_logprobs is not None
    return ModelRun(
        info=model.info,
        next_logprobs=frozen(torch.cat(vocab.next_logprobs)[:-1]), entropy=frozen(torch.cat(vocab.entropy)),
        top_ids=frozen(top_ids, np.int64), top_logprobs=frozen(top_values),
        top_tokens=decode_rows(model.tokenizer, [top_ids.tolist()])[0],
        position_logprobs=frozen(vocab.position_logprobs),
        resid_pre_norm=frozen(cap.stack("hook_resid_pre.norm")),
        resid_mid_norm=frozen(cap.stack("hook_resid_mid.norm")),
        resid_post_norm=frozen(cap.stack("hook_resid_post.norm")),
        ln1_scale=frozen(cap.stack("ln1.hook_scale")) if ln else None,
        ln2_scale=frozen(cap.stack("ln2.hook_scale")) if ln else None,
        ln_final_scale=frozen(cap.final_scale) if ln else None,  # type: ignore[arg-type]
        attn_to_first=frozen(cap.stack("hook_attn_to_first")),
        attn_patterns=frozen(cap.stack("hook_pattern")) if keep_patterns else None,
        hf_deviation=trick_deviation(cap.max_var, model.info.eps) if model.ln_free else None,
        attribution=_attribution(model, cap, target, vocab.position_logprobs) if target else None,
    )


def head_pattern(model: LoadedModel, token_ids: Sequence[int], layer: int, head: int) -> np.ndarray:
    """One head's full attention pattern ``(n, n)`` (query x key) on ``token_ids``, read-only.

    A forward pass through blocks ``0..layer`` only, with the explicit
    attention path in ``layer`` alone: what a view of one head needs when a
    run did not keep every pattern (``compare(..., keep_patterns=False)``).
    """
    info = model.info
    if not (0 <= layer < info.n_layers and 0 <= head < info.n_heads):
        raise InputError(f"layer {layer}, head {head} is outside {info.name} ({info.n_layers} layers, "
                         f"{info.n_heads} heads)")
    name = f"blocks.{layer}.attn.hook_pattern"
    kept: list[torch.Tensor] = []
    model.forward(torch.tensor([list(token_ids)], dtype=torch.long), observer=lambda _, x: kept.append(x[0, head]),
                  wants=name.__eq__, stop_at_layer=layer + 1)
    return frozen(kept[0])


def _auto_target(model: LoadedModel, candidates: list[str]) -> Target | None:
    """Model A's top prediction against the next distinct candidate: the app's default pickers."""
    if len(candidates) < 2:
        return None
    a_id, a_pieces, _ = resolve_token(model.tokenizer, model.info.d_vocab, candidates[0], "answer")
    for other in candidates[1:]:
        b_id, b_pieces, _ = resolve_token(model.tokenizer, model.info.d_vocab, other, "counterfactual")
        if b_id != a_id:
            return Target(a_id, b_id, candidates[0], other, a_pieces, b_pieces, chosen_by_run=True)
    return None


def compare(
    models: Sequence[LoadedModel] | LoadedModel,
    text: str,
    answer: str | int | None = None,
    counterfactual: str | int | None = None,
    position: int = -1,
    prepend_bos: bool = True,
    *,
    keep_patterns: bool = True,
    max_pattern_elements: int = MAX_PATTERN_ELEMENTS,
    max_tokens: int | None = None,
    auto_target: bool = False,
) -> RunResult:
    """Run every model once on the same token ids and capture what the analyses need.

    Args:
        models: the loaded models (one or more, sharing a tokenizer).
        text: the prompt.  Longer than the smallest context window: the first
            ``n_ctx`` tokens are kept, with a warning.
        answer, counterfactual: tokens (text such as ``" Paris"``, or ids) whose
            logit difference is attributed.  Text that splits into several tokens
            uses its first, with a warning.  Without both, no attribution is made
            (unless ``auto_target``).
        position: the token whose next-token prediction is analysed (negative
            counts from the end; -1, the last, by default).
        prepend_bos: put ``<|endoftext|>`` first, as GPT-2 was trained to see it.
        keep_patterns: keep full attention patterns (the Attention page's
            view); False skips them, and the fused attention kernel runs.
        max_pattern_elements: keep full attention patterns up to this many floats.
        max_tokens: analyse at most this many tokens (a deployment's limit).
        auto_target: without an answer and a counterfactual, attribute model
            A's top prediction against the next distinct one among every model's
            top predictions (``Target.chosen_by_run``), in the same run.

    Thread safety: no model state is touched, so concurrent calls on the same
    models give the same results as sequential ones.

    Raises:
        InputError: empty text, bad position or token; TokenizerMismatchError
        when the models tokenise differently.
    """
    if isinstance(models, LoadedModel):
        models = [models]
    models = list(models)
    _check_models(models)
    if not isinstance(text, str) or text == "":
        raise InputError("the text is empty: type something to analyse")
    ids = _shared_ids(models, text, prepend_bos)
    warnings: list[str] = []
    n_ctx = min(m.info.n_ctx for m in models)
    limit = min(n_ctx, max_tokens) if max_tokens else n_ctx
    truncated = len(ids) > limit
    if truncated:
        why = "the context window" if limit == n_ctx else "this deployment's limit"
        warnings.append(f"the text is {len(ids)} tokens; only the first {limit} ({why}) are analysed")
        ids = ids[:limit]
        text = models[0].tokenizer.decode(ids[1:] if prepend_bos else ids, skip_special_tokens=False)
    if not ids:
        raise InputError("the text produced no tokens: type something to analyse")
    n = len(ids)
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not -n <= int(position) < n:
        raise InputError(f"position {position} is outside the {n} tokens (use 0..{n - 1}, or -1 for the last)")
    p = int(position) % n

    target = None
    tok, vocab = models[0].tokenizer, models[0].info.d_vocab
    if (answer is None) != (counterfactual is None):
        warnings.append("give both an answer and a counterfactual to get a logit difference and its attribution")
    elif answer is not None:
        a_id, a_pieces, w1 = resolve_token(tok, vocab, answer, "answer")
        b_id, b_pieces, w2 = resolve_token(tok, vocab, counterfactual, "counterfactual")  # type: ignore[arg-type]
        warnings += w1 + w2
        if a_id == b_id:
            warnings.append("the answer and the counterfactual are the same token: their logit difference is 0 by "
                            "definition")
        target = Target(a_id, b_id, a_pieces[0], b_pieces[0], a_pieces, b_pieces)

    keep_patterns = keep_patterns and all(
        m.info.n_layers * m.info.n_heads * n * n <= max_pattern_elements for m in models)
    caps = [_forward(model, ids, p, keep_patterns) for model in models]
    vocab, pair_stats = _vocabulary(models, caps, ids, p)
    if target is None and auto_target:
        candidates: list[str] = []
        for model, v in zip(models, vocab):
            candidates += [t for t in decode_rows(model.tokenizer, [v.top[1].tolist()])[0] if t not in candidates]
        target = _auto_target(models[0], candidates)
    runs = [_model_run(model, cap, v, target, keep_patterns) for model, cap, v in zip(models, caps, vocab)]
    del caps
    for model, run in zip(models, runs):
        if run.hf_deviation is not None and run.hf_deviation > DEVIATION_WARNING:
            warnings.append(
                f"{model.info.name}: the residual stream is so large here that the stored eps-1e12 checkpoint would "
                f"deviate from the exact LN-free model by {run.hf_deviation:.1%} (the follow-up paper's exploding-norm "
                "case)"
            )
    argmax = [torch.cat(v.argmax) for v in vocab]
    pairs = [
        PairDivergence(a=i, b=j, kl_ab=frozen(torch.cat(kl_ab)), kl_ba=frozen(torch.cat(kl_ba)), js=frozen(torch.cat(js)),
                       top1_agree=frozen(argmax[i] == argmax[j], bool))
        for (i, j), (kl_ab, kl_ba, js) in pair_stats.items()
    ]
    decoded, pieces = token_pieces(tok, ids)
    for run in runs:
        warnings += [f"{run.info.name}: {w}" for w in run.info.warnings]
    return RunResult(
        text=text, token_ids=frozen(np.array(ids), np.int64), tokens=decoded, pieces=pieces,
        prepend_bos=prepend_bos, position=p, target=target, runs=tuple(runs), pairs=tuple(pairs),
        truncated=truncated, warnings=tuple(warnings),
    )
