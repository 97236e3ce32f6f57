"""One side-by-side run: tokenise once, run every model once, keep what the analyses need.

``compare`` returns a :class:`RunResult`: frozen dataclasses holding read-only
NumPy arrays on the CPU, the same token ids for every model.  The analysis
modules (:mod:`noln_core.next_token`, :mod:`~noln_core.logit_diff`,
:mod:`~noln_core.residual_norms`, :mod:`~noln_core.attribution`,
:mod:`~noln_core.direct_effect`, :mod:`~noln_core.attention`) are pure
functions of it.

Only what an analysis reads is captured, reduced as the forward pass goes
(norms instead of residual streams, one query row of each attention pattern
instead of all of them), so a 1024-token run of GPT-2 small keeps a few MB
per model rather than the gigabyte a full cache would hold.  Full attention
patterns are kept while they fit ``max_pattern_elements``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import InputError, TokenizerMismatchError
from .model import LoadedModel, ModelInfo
from .next_token import entropy, js_divergence, kl_divergence

TOP_K = 10
MAX_PATTERN_ELEMENTS = 16_000_000
"""Full attention patterns (layers x heads x n x n floats) are kept up to this size (64 MB)."""


def _frozen(x: torch.Tensor | np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """A read-only CPU copy, so results can be shared between threads and cached safely."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
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


@dataclass(frozen=True)
class AttributionCapture:
    """Everything one model's attribution analyses need at the target position ``p``.

    ``u`` is the (centred) unembedding direction of the logit difference and
    ``scale`` the final LN's divisor at ``p`` (1 for LN-free models), so a
    residual-stream vector ``x`` contributes ``x . u / scale``.
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
    """(L, H, d_model) each head's write to the residual stream at ``p`` (``z_h W_O^h``)."""
    attn_bias: np.ndarray
    """(L, d_model) ``b_O``: the part of each attention layer's output that belongs to no head."""
    head_source: np.ndarray
    """(L, H, n) DLA of each head split by source token: ``pattern[p, s] * v_s W_O^h . u / scale``."""
    neurons: np.ndarray
    """(L, d_mlp) DLA of each MLP neuron: ``post[p, i] * W_out[i] . u / scale``."""
    mlp_bias: np.ndarray
    """(L,) DLA of each MLP's output bias."""
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
    """(n, k) most likely next tokens at each position."""
    top_logprobs: np.ndarray
    """(n, k) their log-probabilities."""
    top_tokens: tuple[tuple[str, ...], ...]
    """(n, k) the same tokens as text."""
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
    """(L, H, n, n) full patterns, or None when larger than ``max_pattern_elements``."""
    hf_deviation: float | None
    """LN-free only: the largest relative gap ``1 - 1/sqrt(1 + var/eps)`` between the stored checkpoint (run with
    its eps-1e12 LayerNorms) and this exact LN-free model, over every LN input of this run."""
    attribution: AttributionCapture | None
    """Present when the run has a :class:`Target`."""

    @property
    def name(self) -> str:
        return self.info.name


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


def tokenize(model: LoadedModel, text: str, prepend_bos: bool = True) -> list[int]:
    """Token ids of ``text`` with the model's tokenizer, BOS (``<|endoftext|>``) first if asked."""
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    return ([model.info.bos_token_id] if prepend_bos else []) + list(ids)


def token_pieces(model: LoadedModel, ids: Sequence[int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(decoded, pieces)`` for each id: its text alone and its byte-level BPE piece."""
    tok = model.tokenizer
    decoded = tuple(tok.decode([int(i)], skip_special_tokens=False) for i in ids)
    pieces = tuple(tok.id_to_token(int(i)) or f"<{int(i)}>" for i in ids)
    return decoded, pieces


def resolve_token(model: LoadedModel, token: str | int, what: str) -> tuple[int, tuple[str, ...], list[str]]:
    """Turn an answer/counterfactual into one token id, warning if it splits into several."""
    warnings: list[str] = []
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        if not 0 <= int(token) < model.info.d_vocab:
            raise InputError(f"{what} token id {token} is outside the vocabulary (0..{model.info.d_vocab - 1})")
        piece = model.tokenizer.decode([int(token)], skip_special_tokens=False)
        return int(token), (piece,), warnings
    if not isinstance(token, str) or token == "":
        raise InputError(f"the {what} is empty: give a token such as ' Paris' (mind the leading space)")
    ids = model.tokenizer.encode(token, add_special_tokens=False).ids
    if not ids:
        raise InputError(f"the {what} {token!r} produced no tokens")
    pieces = tuple(model.tokenizer.decode([i], skip_special_tokens=False) for i in ids)
    if len(ids) > 1:
        warnings.append(
            f"the {what} {token!r} is {len(ids)} tokens {list(pieces)}; its first token {pieces[0]!r} is used"
        )
    return int(ids[0]), pieces, warnings


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
        other_ids = tokenize(other, text, prepend_bos)
        if other_ids != ids:
            at = next((i for i, (x, y) in enumerate(zip(ids, other_ids)) if x != y), min(len(ids), len(other_ids)))
            raise TokenizerMismatchError(
                f"{models[0].info.name} and {other.info.name} tokenise this text differently (first at token {at}): "
                "compare models that share a tokenizer"
            )
    return ids


class _Capture:
    """Reduces one forward pass's activations to what :class:`ModelRun` keeps."""

    def __init__(self, model: LoadedModel, n: int, p: int, u: torch.Tensor | None, keep_patterns: bool):
        info = model.info
        self.model, self.p, self.u, self.keep_patterns = model, p, u, keep_patterns
        L = info.n_layers
        self.norms = {k: [None] * L for k in ("resid_pre", "resid_mid", "resid_post")}
        self.scales = {k: [None] * L for k in ("ln1", "ln2")}
        self.final_scale: torch.Tensor | None = None
        self.to_first: list = [None] * L
        self.patterns: list = [None] * L
        self.v_proj: list = [None] * L  # (H, n): v_s W_O^h . u, waiting for the pattern
        self.at_p: dict[str, list] = {k: [None] * L for k in ("resid_pre", "resid_mid", "attn_out", "mlp_out")}
        self.final_resid: torch.Tensor | None = None
        self.head_out: list = [None] * L
        self.head_source: list = [None] * L
        self.neurons: list = [None] * L
        self.max_var = 0.0

    def wants(self, name: str) -> bool:
        tail = name.rsplit(".", 1)[-1]
        if tail in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_scale", "hook_pattern"):
            return True
        return self.u is not None and tail in ("hook_z", "hook_v", "hook_attn_out", "hook_mlp_out", "hook_post", "hook_embed", "hook_pos_embed")

    def __call__(self, name: str, x: torch.Tensor) -> None:
        parts = name.split(".")
        if parts[0] != "blocks":
            if name == "ln_final.hook_scale":
                self.final_scale = x[0, :, 0]
            elif name in ("hook_embed", "hook_pos_embed"):
                self.at_p.setdefault(name, x[0, self.p])
            return
        layer, tail = int(parts[1]), parts[-1]
        w = self.model.weights
        if tail in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
            key = tail.removeprefix("hook_")
            xf = x[0].float()
            self.norms[key][layer] = xf.norm(dim=-1)
            if key != "resid_post":
                self.at_p[key][layer] = xf[self.p]
            if self.model.ln_free and (key != "resid_post" or layer == self.model.info.n_layers - 1):
                self.max_var = max(self.max_var, float((xf - xf.mean(-1, keepdim=True)).pow(2).mean(-1).max()))
            if key == "resid_post" and layer == self.model.info.n_layers - 1:
                self.final_resid = xf[self.p]
        elif tail == "hook_scale":
            self.scales["ln1" if parts[2] == "ln1" else "ln2"][layer] = x[0, :, 0]
        elif tail == "hook_pattern":
            pat = x[0]  # (H, n, n)
            self.to_first[layer] = pat[:, :, 0]
            if self.u is not None:
                self.head_source[layer] = pat[:, self.p, :].float() * self.v_proj[layer]
            if self.keep_patterns:
                self.patterns[layer] = pat
        elif tail == "hook_v":
            # head_source = pattern[h, p, s] * (v[s, h] . W_O^h u), finished when the pattern arrives.
            H, dh = self.model.info.n_heads, self.model.info.d_head
            Wo_u = (w.W_O[layer].float() @ self.u).view(H, dh)  # (H, dh)
            self.v_proj[layer] = torch.einsum("shd,hd->hs", x[0].float(), Wo_u)
        elif tail == "hook_z":
            H, dh = self.model.info.n_heads, self.model.info.d_head
            z = x[0, self.p].float()  # (H, dh)
            Wo = w.W_O[layer].float().view(H, dh, -1)
            self.head_out[layer] = torch.einsum("hd,hdm->hm", z, Wo)
        elif tail in ("hook_attn_out", "hook_mlp_out"):
            self.at_p[tail.removeprefix("hook_")][layer] = x[0, self.p].float()
        elif tail == "hook_post":
            self.neurons[layer] = x[0, self.p].float() * (w.W_out[layer].float() @ self.u)


def _decode_rows(model: LoadedModel, rows: list[list[int]]) -> tuple[tuple[str, ...], ...]:
    flat = model.tokenizer.decode_batch([[i] for row in rows for i in row], skip_special_tokens=False)
    k = len(rows[0]) if rows else 0
    return tuple(tuple(flat[r * k:(r + 1) * k]) for r in range(len(rows)))


def _stack(xs: list) -> torch.Tensor:
    return torch.stack([x.float() for x in xs])


def _attribution(model: LoadedModel, cap: _Capture, target: Target, logprobs_p: torch.Tensor) -> AttributionCapture:
    info, w = model.info, model.weights
    L = info.n_layers
    a, b = target.answer_id, target.counterfactual_id
    scale = 1.0 if model.ln_free else float(cap.final_scale[cap.p])  # type: ignore[index]
    comps = [cap.at_p["hook_embed"].float(), cap.at_p["hook_pos_embed"].float()]
    labels = ["embed", "pos_embed"]
    for layer in range(L):
        comps += [cap.at_p["attn_out"][layer], cap.at_p["mlp_out"][layer]]
        labels += [f"L{layer} attn", f"L{layer} mlp"]
    acc, acc_labels = [], []
    for layer in range(L):
        acc += [cap.at_p["resid_pre"][layer], cap.at_p["resid_mid"][layer]]
        acc_labels += [f"L{layer} pre", f"L{layer} mid"]
    acc.append(cap.final_resid)
    acc_labels.append("final")
    u = cap.u
    assert u is not None
    mlp_bias = (w.b_out.float() @ u) / scale
    return AttributionCapture(
        logit_diff=float(logprobs_p[a] - logprobs_p[b]),
        constant=w.unembed_constant(a, b),
        u=_frozen(u), scale=scale,
        components=_frozen(_stack(comps)), component_labels=tuple(labels),
        head_out=_frozen(_stack(cap.head_out)), attn_bias=_frozen(w.b_O.float()),
        head_source=_frozen(_stack(cap.head_source) / scale),
        neurons=_frozen(_stack(cap.neurons) / scale), mlp_bias=_frozen(mlp_bias),
        accumulated=_frozen(_stack(acc)), accumulated_labels=tuple(acc_labels),
        eps=info.eps, ln_free=model.ln_free,
    )


def _run_one(
    model: LoadedModel, ids: list[int], p: int, target: Target | None, keep_patterns: bool
) -> tuple[ModelRun, torch.Tensor]:
    """Run ``model`` once; return its :class:`ModelRun` and the full (n, vocab) log-probs for the pair stats."""
    tokens = torch.tensor([ids], dtype=torch.long)
    u = model.weights.unembed_direction(target.answer_id, target.counterfactual_id) if target else None
    cap = _Capture(model, len(ids), p, u, keep_patterns)
    logits = model.forward(tokens, observer=cap, wants=cap.wants)
    assert logits is not None
    logprobs = logits[0].float().log_softmax(-1)
    top = logprobs.topk(min(TOP_K, logprobs.shape[-1]), dim=-1)
    nxt = torch.tensor(ids[1:], device=logprobs.device)
    next_lp = logprobs[:-1].gather(-1, nxt[:, None])[:, 0] if len(ids) > 1 else logprobs.new_zeros(0)
    ln = not model.ln_free
    hf_dev = None
    if model.ln_free:
        hf_dev = float(1.0 - (1.0 + cap.max_var / model.info.eps) ** -0.5)
    run = ModelRun(
        info=model.info,
        next_logprobs=_frozen(next_lp), entropy=_frozen(entropy(logprobs)),
        top_ids=_frozen(top.indices, np.int64), top_logprobs=_frozen(top.values),
        top_tokens=_decode_rows(model, top.indices.tolist()),
        position_logprobs=_frozen(logprobs[p]),
        resid_pre_norm=_frozen(_stack(cap.norms["resid_pre"])),
        resid_mid_norm=_frozen(_stack(cap.norms["resid_mid"])),
        resid_post_norm=_frozen(_stack(cap.norms["resid_post"])),
        ln1_scale=_frozen(_stack(cap.scales["ln1"])) if ln else None,
        ln2_scale=_frozen(_stack(cap.scales["ln2"])) if ln else None,
        ln_final_scale=_frozen(cap.final_scale) if ln else None,  # type: ignore[arg-type]
        attn_to_first=_frozen(_stack(cap.to_first)),
        attn_patterns=_frozen(_stack(cap.patterns)) if keep_patterns else None,
        hf_deviation=hf_dev,
        attribution=_attribution(model, cap, target, logprobs[p]) if target else None,
    )
    return run, logprobs


def compare(
    models: Sequence[LoadedModel] | LoadedModel,
    text: str,
    answer: str | int | None = None,
    counterfactual: str | int | None = None,
    position: int = -1,
    prepend_bos: bool = True,
    *,
    max_pattern_elements: int = MAX_PATTERN_ELEMENTS,
    max_tokens: int | None = None,
) -> RunResult:
    """Run every model once on the same token ids and capture what the analyses need.

    Args:
        models: the loaded models (one or more, sharing a tokenizer).
        text: the prompt.  Longer than the smallest context window: the first
            ``n_ctx`` tokens are kept, with a warning.
        answer, counterfactual: tokens (text such as ``" Paris"``, or ids) whose
            logit difference is attributed.  Text that splits into several tokens
            uses its first, with a warning.  Without both, no attribution is made.
        position: the token whose next-token prediction is analysed (negative
            counts from the end; -1, the last, by default).
        prepend_bos: put ``<|endoftext|>`` first, as GPT-2 was trained to see it.
        max_pattern_elements: keep full attention patterns up to this many floats.
        max_tokens: analyse at most this many tokens (a deployment's limit).

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
        n_ctx = limit
        ids = ids[:n_ctx]
        text = models[0].tokenizer.decode(ids[1:] if prepend_bos else ids, skip_special_tokens=False)
    if not ids:
        raise InputError("the text produced no tokens: type something to analyse")
    n = len(ids)
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not -n <= int(position) < n:
        raise InputError(f"position {position} is outside the {n} tokens (use 0..{n - 1}, or -1 for the last)")
    p = int(position) % n

    target = None
    if (answer is None) != (counterfactual is None):
        warnings.append("give both an answer and a counterfactual to get a logit difference and its attribution")
    elif answer is not None:
        a_id, a_pieces, w1 = resolve_token(models[0], answer, "answer")
        b_id, b_pieces, w2 = resolve_token(models[0], counterfactual, "counterfactual")  # type: ignore[arg-type]
        warnings += w1 + w2
        if a_id == b_id:
            warnings.append("the answer and the counterfactual are the same token: their logit difference is 0 by definition")
        target = Target(a_id, b_id, a_pieces[0], b_pieces[0], a_pieces, b_pieces)

    keep_patterns = all(m.info.n_layers * m.info.n_heads * n * n <= max_pattern_elements for m in models)
    runs, logprobs = [], []
    for model in models:
        run, lp = _run_one(model, ids, p, target, keep_patterns)
        runs.append(run)
        logprobs.append(lp.cpu())
        if run.hf_deviation is not None and run.hf_deviation > 1e-3:
            warnings.append(
                f"{model.info.name}: the residual stream is so large here that the stored eps-1e12 checkpoint would "
                f"deviate from the exact LN-free model by {run.hf_deviation:.1%} (the follow-up paper's exploding-norm case)"
            )
    pairs = []
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            la, lb = logprobs[i], logprobs[j]
            pairs.append(PairDivergence(
                a=i, b=j, kl_ab=_frozen(kl_divergence(la, lb)), kl_ba=_frozen(kl_divergence(lb, la)),
                js=_frozen(js_divergence(la, lb)), top1_agree=_frozen(la.argmax(-1) == lb.argmax(-1), bool),
            ))
    decoded, pieces = token_pieces(models[0], ids)
    for arr_run in runs:
        for w in arr_run.info.warnings:
            warnings.append(f"{arr_run.info.name}: {w}")
    return RunResult(
        text=text, token_ids=_frozen(np.array(ids), np.int64), tokens=decoded, pieces=pieces,
        prepend_bos=prepend_bos, position=p, target=target, runs=tuple(runs), pairs=tuple(pairs),
        truncated=truncated, warnings=tuple(warnings),
    )
