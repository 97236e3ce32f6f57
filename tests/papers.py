"""The papers' scripts, re-implemented independently of noln_core: the definitions the study must equal.

Each function transcribes one script of ``submarat/removing-layer-norm`` (commit 583a9e6) or of
``sail-sg/Attention-Sink`` onto Hugging Face ``transformers`` (TransformerLens 4 has no
``HookedTransformer``): file and lines are named in each docstring.  Nothing here imports noln_core.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def hf_capture(hf, tokens: torch.Tensor) -> dict:
    """One HF forward: attentions, hidden states, each block's resid_mid, attention z, and the input of ln_f."""
    got: dict = {"z": {}, "mid": {}}
    handles = [hf.transformer.ln_f.register_forward_pre_hook(lambda m, a: got.__setitem__("final", a[0]))]
    for layer, block in enumerate(hf.transformer.h):
        handles.append(block.attn.c_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: got["z"].__setitem__(layer, a[0])))
        handles.append(block.ln_2.register_forward_pre_hook(
            lambda m, a, layer=layer: got["mid"].__setitem__(layer, a[0])))
    try:
        out = hf(tokens, output_attentions=True, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    got.update(logits=out.logits.double(), attn=out.attentions, hidden=out.hidden_states)
    return got


def _centred(v: torch.Tensor) -> torch.Tensor:
    return v - v.mean(-1, keepdim=True)


@torch.no_grad()
def run_analysis_nmae(hf, capture: dict, tokens: torch.Tensor, ln_free: bool) -> tuple[np.ndarray, np.ndarray]:
    """``mech_interp/attention_head_attribution/run_analysis.py``, lines 128-199: per (head, sample) DLA and
    direct ablation effect of the logit of each sequence's last token at the last position.

    The models there are TransformerLens models with ``fold_ln``, ``center_writing_weights``,
    ``center_unembed`` and the default ``fold_value_biases``: each head's output is ``(z - b_V) W_O`` (its
    value bias, ``ln_1``'s bias folded in, belongs to ``b_O``), the unembedding carries ``ln_f``'s weight and
    is centred over the vocabulary, ``b_U = W_E b_f`` centred too.  ``apply_ln_to_stack`` centres and divides
    by the cached final scale; ``apply_layer_norm`` (eps 1e-5) recomputes it.  Returns ``(heads, samples)``.
    """
    cfg = hf.config
    H, d = cfg.n_head, cfg.n_embd
    dh = d // H
    eps = cfg.layer_norm_epsilon
    W_E = hf.transformer.wte.weight.double()
    w_f, b_f = hf.transformer.ln_f.weight.double(), hf.transformer.ln_f.bias.double()
    if ln_free:  # load_models.py, lines 138-145: LN weights / 1e6; lines 148-153: the LNs become identities
        w_f = w_f / 1e6
    W_U = (W_E * w_f).T  # (d, vocab): ln_f's weight folded
    W_U = W_U - W_U.mean(0, keepdim=True)  # fold_ln centres the reading weights
    W_U = W_U - W_U.mean(1, keepdim=True)  # center_unembed
    b_U = W_E @ b_f
    b_U = b_U - b_U.mean()
    target = tokens[:, -1]
    target_W, target_b = W_U[:, target].T, b_U[target]
    final = capture["final"][:, -1].double()

    def apply_layer_norm(v):  # run_analysis.py, lines 105-112
        return _centred(v) / (_centred(v).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()

    scale = 1.0 if ln_free else (_centred(final).pow(2).mean(-1, keepdim=True) + eps).sqrt()  # the cached scale
    scaled_final = final if ln_free else _centred(final) / scale
    logits = (scaled_final * target_W).sum(-1) + target_b
    heads = []
    for layer, block in enumerate(hf.transformer.h):
        W_V = block.attn.c_attn.weight.double()[:, 2 * d:]
        b_V = block.attn.c_attn.bias.double()[2 * d:] + block.ln_1.bias.double() @ W_V  # fold_ln, then b_V
        z = capture["z"][layer][:, -1].double().view(-1, H, dh) - b_V.view(H, dh)  # fold_value_biases
        W_O = block.attn.c_proj.weight.double().view(H, dh, d)
        heads.append(torch.einsum("bhk,hkd->hbd", z, W_O))
    per_head = torch.cat(heads)  # (L*H, batch, d): stack_head_results, layer-major
    scaled_heads = per_head if ln_free else _centred(per_head) / scale
    dla = (scaled_heads * target_W).sum(-1)
    ablated = final - per_head
    scaled_ablated = ablated if ln_free else apply_layer_norm(ablated)
    direct = logits - ((scaled_ablated * target_W).sum(-1) + target_b)
    return dla.numpy(), direct.numpy()


def nmae_from(dla: np.ndarray, direct: np.ndarray) -> tuple[float, np.ndarray]:
    """Global and per-head NMAE (fractions) as ``run_analysis.py``, lines 206-230 (epsilon 1e-10)."""
    abs_diff = np.abs(dla - direct)
    per_head = abs_diff.mean(1) / (np.abs(direct).mean(1) + 1e-10)
    return float(abs_diff.mean() / (np.abs(direct).mean() + 1e-10)), per_head


def papers_bootstrap(DLA_heads, direct_ablation, bootstrap_samples=1000, confidence_level=0.95):
    """``get_global_nmae_with_bootstrap_ci`` (``run_analysis.py``, lines 370-408): ``(heads, samples)`` arrays,
    NumPy's global generator, percentages."""
    DLA_heads, direct_ablation = torch.tensor(DLA_heads), torch.tensor(direct_ablation)
    abs_diff = (DLA_heads - direct_ablation).abs()
    original = abs_diff.mean().item() / (direct_ablation.abs().mean().item() + 1e-10) * 100
    n_heads, n_samples = DLA_heads.shape
    reps = []
    for _ in range(bootstrap_samples):
        head_indices = np.random.choice(n_heads, n_heads, replace=True)
        sample_indices = np.random.choice(n_samples, n_samples, replace=True)
        b_dla = DLA_heads[head_indices][:, sample_indices]
        b_dir = direct_ablation[head_indices][:, sample_indices]
        reps.append((b_dla - b_dir).abs().mean().item() / (b_dir.abs().mean().item() + 1e-10) * 100)
    alpha = 1 - confidence_level
    return original, *np.percentile(reps, [alpha / 2 * 100, (1 - alpha / 2) * 100])


@torch.no_grad()
def residual_norms_first_token(hf, capture: dict, tokens: torch.Tensor, ln_free: bool) -> np.ndarray:
    """``mech_interp/residual_stream/residual_norms.py``, lines 86-97 and 278-281: L2 norms at position 0 of
    ``hook_embed``, ``hook_pos_embed``, each block's ``resid_mid`` and ``resid_post``, ``ln_final.hook_normalized``
    in models loaded with ``center_writing_weights`` (every write centred, so the stream is the centred one).
    Returns ``(samples, hooks)``."""
    eps = hf.config.layer_norm_epsilon
    first = tokens[:, 0]
    out = [_centred(hf.transformer.wte.weight.double()[first]), _centred(hf.transformer.wpe.weight.double()[[0]])
           .expand(len(first), -1)]
    L = hf.config.n_layer
    for layer in range(L):
        out.append(_centred(capture["mid"][layer][:, 0].double()))
        post = capture["final"] if layer == L - 1 else capture["hidden"][layer + 1]
        out.append(_centred(post[:, 0].double()))
    final = _centred(capture["final"][:, 0].double())
    out.append(final if ln_free else final / (final.pow(2).mean(-1, keepdim=True) + eps).sqrt())
    return torch.stack([o.norm(dim=-1) for o in out], 1).numpy()


def calculate_sink_rate(attentions, eps=0.3) -> float:
    """``utils.py``'s ``calculate_sink_rate`` (lines 65-102) on a batch: the batch's mean rate."""
    T, H, L = attentions[0].shape[2], attentions[0].shape[1], len(attentions)
    rate = torch.zeros(attentions[0].shape[0], dtype=torch.float64)
    for attn in attentions:
        rate += (attn[:, :, :, 0] > eps).sum(dim=(1, 2)).double() / T
    return float(rate.mean() / (L * H))


def compute_attention_sink(attentions, epsilon=0.3) -> float:
    """``eval_sink_open_source.py``'s ``compute_attention_sink`` (lines 41-49), for the first token: the share
    of (sample, layer, head) whose ``sum_q attention[q, 0] / (T - 0)`` is above ``epsilon``."""
    scores = torch.stack(attentions, 1).double()  # (samples, layers, heads, T, T)
    T = scores.shape[-1]
    ratios = torch.arange(T, 0, -1, dtype=scores.dtype)[None, None, None, :].expand(*scores.shape)
    importance = (scores / ratios).sum(dim=-2)
    return float((importance > epsilon).double().mean(dim=(0, 1, 2))[0])


def ece_analyse_models(max_probs: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """``analyse_models.py``'s ``calculate_ece_with_ci`` (lines 624-646), without the interval."""
    bin_edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(max_probs, bin_edges) - 1, 0, n_bins - 1)
    conf, acc, counts = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins)
    for i in range(n_bins):
        mask = idx == i
        if np.any(mask):
            conf[i], acc[i], counts[i] = max_probs[mask].mean(), correct[mask].mean(), mask.sum()
    return float(np.sum(counts / counts.sum() * np.abs(conf - acc)))


def entropy_run_inference(logits: torch.Tensor) -> torch.Tensor:
    """``mech_interp/run_inference.py``, lines 94-113: entropy of softmax(logits[:, :-1]) with log(p + 1e-10)."""
    probs = torch.softmax(logits[:, :-1].double(), dim=-1)
    return -(probs * torch.log(probs + 1e-10)).sum(-1)


def load_dataset_rows(dataset, num_samples: int, max_context: int, seed: int = 42) -> list[list[int]]:
    """``mech_interp/load_dataset.py``, lines 59-60 and 72-82: ``shuffle(seed=42).take(num_samples)`` of the
    streamed dataset, each row's ``input_ids`` cut to its first ``max_context`` tokens, no BOS."""
    return [list(ex["input_ids"][:max_context]) for ex in dataset.shuffle(seed=seed).take(num_samples)]


def preprocess_pile_dataset(dataset, num_samples: int, streaming: bool, block_size: int = 1024,
                            encode=None, eot: int = 50256) -> list[list[int]]:
    """``pile_eval.py``'s ``preprocess_pile_dataset``, lines 31-84, for a pre-tokenised dataset, or with ``encode``
    for a text one (lines 59-70: OpenWebText2, Books3 and BookCorpus2 left out by ``meta.pile_set_name``, each text
    followed by EOT); the chunks as a set: line 88's ``random.shuffle`` is unseeded and changes only their order."""
    if streaming:
        dataset = dataset.take(num_samples)
    elif num_samples < len(dataset):
        dataset = dataset.shuffle(seed=42).select(range(num_samples))
    dataset = dataset.shuffle(seed=42)
    all_tokens: list[int] = []
    for example in dataset:
        if encode is None:
            all_tokens.extend(example["input_ids"])
        elif (example.get("meta") or {}).get("pile_set_name") not in ["OpenWebText2", "Books3", "BookCorpus2"]:
            all_tokens.extend(encode(example["text"]) + [eot])
    n_chunks = min(num_samples, len(all_tokens) // block_size)
    return [all_tokens[i * block_size:(i + 1) * block_size] for i in range(n_chunks)]


def prepare_owt(dataset, encode, eot: int, test_size=0.0005, seed=2357, num_proc=32, batch_size=512,
                block=1024) -> list[list[int]]:
    """``prepare_dataset.py``, lines 16-50: the test split of ``train_test_split``, mapped in batches of 512 rows
    by ``num_proc`` processes; each batch's texts + EOT joined and cut into 1024-token chunks."""
    test = dataset.train_test_split(test_size=test_size, seed=seed, shuffle=True)["test"]

    def tokenize_function(examples):
        concatenated = []
        for text in examples["text"]:
            concatenated.extend(encode(text) + [eot])
        n_chunks = len(concatenated) // block
        return {"input_ids": [concatenated[i * block:(i + 1) * block] for i in range(n_chunks)]}

    mapped = test.map(tokenize_function, batched=True, batch_size=batch_size, num_proc=num_proc,
                      remove_columns=test.column_names)
    return [list(row) for row in mapped["input_ids"]]


def sink_rate_inputs(chunks: list[list[int]], length: int = 512) -> list[list[int]]:
    """``sink_rate.py``, line 189: every chunk truncated to its first 512 tokens."""
    return [c[:length] for c in chunks]



@torch.no_grad()
def ablate_all_models(hf, sequences: list[list[int]], tokens: list[int], neurons: list[int],
                      ln_free: bool) -> dict[int, dict[str, np.ndarray]]:
    """``mech_interp/entropy_neurons/ablate_all_models.py`` (``AblationAnalyzer``, lines 75-296) on an HF GPT-2:
    ``mlp_mid`` (the last block's activation) is averaged over ``sequences`` (positions ``:-1``); on ``tokens`` the
    final stream ``resid_pre + attn_out + mlp_mid W_out + b_out`` is rebuilt with each neuron set to its mean, put
    through ``(x - mean) / sqrt(var + 1e-12)`` (no centring for the LN-free model: its ``W_U`` is centred by
    ``fold_ln``), unembedded, and ``|Δ CE|``, ``|Δ entropy|`` (entropy with ``log(p + 1e-10)``) kept per token."""
    block, ln_f = hf.transformer.h[-1], hf.transformer.ln_f
    got = {}
    h1 = block.mlp.c_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("mid", a[0]))
    h2 = ln_f.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0]))
    try:
        mids = []
        for seq in sequences:
            hf(torch.tensor([seq]))
            mids.append(got["mid"][0, :-1])
        mean = torch.cat(mids).double().mean(0)
        hf(torch.tensor([tokens]))
        mid, x = got["mid"][0, :-1].double(), got["x"][0, :-1].double()
    finally:
        h1.remove(), h2.remove()
    W_out = block.mlp.c_proj.weight.double()  # Conv1D: (d_mlp, d)
    b_out = block.mlp.c_proj.bias.double()
    resid_plus_attn = x - (mid @ W_out + b_out)
    weight = ln_f.weight.double() / (1e6 if ln_free else 1.0)
    W_U = hf.lm_head.weight.double()
    targets = torch.tensor(tokens[1:])

    def simulate(mlp_mid):
        xx = resid_plus_attn + mlp_mid @ W_out + b_out
        centred = xx - xx.mean(-1, keepdim=True)  # fold_ln's centred W_U does this for the LN-free model
        if not ln_free:
            centred = centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-12).sqrt()
        logits = (centred * weight + ln_f.bias.double()) @ W_U.T
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        probs = logits.softmax(-1)
        return loss, -(probs * (probs + 1e-10).log()).sum(-1)

    ref_loss, ref_entropy = simulate(mid)
    out = {}
    for idx in neurons:
        ablated = mid.clone()
        ablated[:, idx] = mean[idx]
        loss, entropy = simulate(ablated)
        out[idx] = {"loss_effect": (ref_loss - loss).abs().numpy(), "entropy_effect": (ref_entropy - entropy).abs().numpy()}
    return out


@torch.no_grad()
def svd_comparison(hf, ln_free: bool) -> dict[str, np.ndarray]:
    """``mech_interp/entropy_neurons/svd_comparison.py`` (lines 58-77) on an HF GPT-2 loaded as the papers' factory
    does (``fold_ln``, ``center_writing_weights``, ``center_unembed``): the explicit ``d_mlp x vocab`` matrix of
    cosines, ``torch.var`` over the vocabulary, ``||w_out|| / var``, and ``torch.svd`` of ``W_U``."""
    W_out = hf.transformer.h[-1].mlp.c_proj.weight.double()
    W_out = W_out - W_out.mean(1, keepdim=True)
    weight = hf.transformer.ln_f.weight.double() / (1e6 if ln_free else 1.0)
    W_U = weight[:, None] * hf.lm_head.weight.double().T
    W_U = W_U - W_U.mean(0, keepdim=True)
    W_U = W_U - W_U.mean(1, keepdim=True)
    L2_Wout = torch.norm(W_out, dim=1, keepdim=True)
    norm_Wu_Wout = (W_out / L2_Wout) @ (W_U / torch.norm(W_U, dim=0, keepdim=True))
    var = torch.var(norm_Wu_Wout, axis=1)
    U, S, _ = torch.svd(W_U)
    return {"L2_Wout": L2_Wout[:, 0].numpy(), "var": var.numpy(), "ratio": (L2_Wout[:, 0] / var).numpy(),
            "U": U.numpy(), "S": S.numpy(), "top_indices": np.argsort(-(L2_Wout[:, 0] / var).numpy())}


def ioi_bisymmetric_group(name_1: str, name_2: str, template: str, place: str, obj: str) -> tuple[list, list]:
    """``ioi_utils.get_bisymmetric_prompts_and_answers`` (lines 19-31) for one symmetric draw of
    ``ioi_dataset.gen_prompt_uniform`` (lines 280-335: ``[A]`` = name_1 = IO, ``[B]`` = name_2 = S), its
    ``gen_flipped_prompts(("IO", "S1"))`` (lines 389-396: swap the first occurrences of IO and S by words), the
    interleaving, the last word dropped, and ``reorder_list(..., 4, [0, 3, 1, 2])``."""
    prompt = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
    d1 = [{"text": prompt.replace("[A]", name_1).replace("[B]", name_2), "IO": name_1, "S": name_2},
          {"text": prompt.replace("[A]", name_2).replace("[B]", name_1), "IO": name_2, "S": name_1}]
    d2 = []
    for p in d1:
        t = p["text"].split(" ")
        io_index, s1_index = t.index(p["IO"]), t.index(p["S"])
        t[io_index], t[s1_index] = t[s1_index], t[io_index]
        d2.append(dict(p, text=" ".join(t)))
    c = [item for pair in zip(d1, d2) for item in pair]
    prompts = [m["text"].rsplit(" ", 1)[0] for m in c]
    answers = [(" " + m["IO"], " " + m["S"]) for m in c]
    order = [0, 3, 1, 2]
    return [prompts[j] for j in order], [answers[j] for j in order]


def attr_vs_act_patching(hf, clean: list[int], corrupted: list[int], answer: int, counterfactual: int) -> dict:
    """``attr_vs_act_patching_(per_prompt).py`` on an HF GPT-2: activation patching of ``resid_pre`` (each block's
    input, ``custom_patching.get_act_patch_resid_pre``: one full run per layer and position, minus the corrupted
    logit difference, lines 18-36) and attribution patching (``get_cache_fwd_and_bwd`` then
    ``grad_corrupted * (clean - corrupted)`` summed over d_model, lines 53-88), the metric ``get_logit_diff`` at
    the last position (lines 91-103).  Rows: layers; columns: positions."""
    blocks = hf.transformer.h

    def logit_diff(logits):
        return logits[0, -1, answer] - logits[0, -1, counterfactual]

    def hidden(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def replaced(args, kwargs, x):
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=x))

    def block_inputs(tokens, grad):
        kept = []

        def keep(m, args, kwargs):
            x = hidden(args, kwargs)
            if grad:
                x.retain_grad()
            kept.append(x)

        handles = [b.register_forward_pre_hook(keep, with_kwargs=True) for b in blocks]
        try:
            with torch.set_grad_enabled(grad):
                if grad:
                    out = hf(inputs_embeds=hf.transformer.wte(tokens).detach().requires_grad_(True))
                else:
                    out = hf(tokens)
        finally:
            for h in handles:
                h.remove()
        return out.logits, kept

    clean_t, corrupt_t = torch.tensor([clean]), torch.tensor([corrupted])
    with torch.no_grad():
        clean_logits, clean_in = block_inputs(clean_t, False)
        corrupt_logits, _ = block_inputs(corrupt_t, False)
    corrupt_metric = float(logit_diff(corrupt_logits))
    logits, corrupt_in = block_inputs(corrupt_t, True)
    logit_diff(logits).backward()
    attr = np.array([(x.grad[0] * (c[0] - x.detach()[0])).sum(-1).double().numpy()
                     for x, c in zip(corrupt_in, clean_in)])
    act = np.zeros((len(blocks), len(clean)))
    for layer, block in enumerate(blocks):
        for pos in range(len(clean)):
            def patch(m, args, kwargs, pos=pos, layer=layer):
                x = hidden(args, kwargs).clone()
                x[:, pos] = clean_in[layer][:, pos]
                return replaced(args, kwargs, x)

            handle = block.register_forward_pre_hook(patch, with_kwargs=True)
            try:
                with torch.no_grad():
                    act[layer, pos] = float(logit_diff(hf(corrupt_t).logits)) - corrupt_metric
            finally:
                handle.remove()
    return {"act": act, "attr": attr, "clean": float(logit_diff(clean_logits)), "corrupted": corrupt_metric}


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness ``tasks/hellaswag/utils.py`` ``preprocess`` (lines 6-12)."""
    import re

    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


@torch.no_grad()
def harness_hellaswag(hf, encode, docs: list[dict]) -> tuple[float, float]:
    """(acc, acc_norm) as the harness's ``hellaswag`` task scores them: ``process_docs`` (utils.py lines 15-25),
    ``doc_to_text`` the query, each choice after a space (``target_delimiter``); the log-likelihood of the
    continuation tokens (``HFLM._encode_pair``: the whole string encoded, the context's tokens cut off); ``acc`` the
    arg max, ``acc_norm`` the arg max of log-likelihood over the choice's length in characters (api/task.py)."""
    acc, acc_norm = [], []
    for doc in docs:
        query = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices = [hellaswag_preprocess(e) for e in doc["endings"]]
        lls = []
        for choice in choices:
            whole, context = encode(query + " " + choice), encode(query)
            cont = whole[len(context):]
            logits = hf(torch.tensor([whole])).logits[0].double().log_softmax(-1)
            lls.append(sum(float(logits[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
        gold = int(doc["label"])
        acc.append(int(np.argmax(lls)) == gold)
        acc_norm.append(int(np.argmax(np.array(lls) / np.array([len(c) for c in choices]))) == gold)
    return float(np.mean(acc)), float(np.mean(acc_norm))


@torch.no_grad()
def nanogpt_hellaswag(hf, encode, docs: list[dict]) -> tuple[float, float]:
    """(acc, acc_norm) of build-nanogpt's ``hellaswag.py`` (``render_example``, ``evaluate``): the raw ``ctx``, each
    ending encoded as ``" " + ending``; cross-entropy of the ending's tokens only; ``acc`` by the smallest summed
    loss, ``acc_norm`` by the smallest mean loss."""
    acc, acc_norm = [], []
    for doc in docs:
        ctx = encode(doc["ctx"])
        sums, means = [], []
        for ending in doc["endings"]:
            end = encode(" " + ending)
            tokens = torch.tensor([ctx + end])
            logits = hf(tokens).logits[0, :-1].double()
            losses = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")
            mask = torch.tensor([0] * (len(ctx) - 1) + [1] * len(end), dtype=torch.float64)
            sums.append(float((losses * mask).sum()))
            means.append(sums[-1] / float(mask.sum()))
        label = int(doc["label"])
        acc.append(int(np.argmin(sums)) == label)
        acc_norm.append(int(np.argmin(means)) == label)
    return float(np.mean(acc)), float(np.mean(acc_norm))
