"""Remove LayerNorm from a GPT-2 checkpoint by fine-tuning, as the papers did.

Method (Heimersheim 2024, arXiv:2409.13710; Baroni et al. 2025, arXiv:2507.02559,
code at ``submarat/removing-layer-norm``):

* Every LayerNorm becomes a *fake LN*: it keeps mean-centring and its affine
  weight and bias, but divides by a standard deviation ``sigma`` measured on
  data.  While the LN is live, ``sigma`` is updated by an exponential moving
  average of the batch's per-token standard deviation; at its removal step it
  is frozen, and from then on the LN is a fixed linear map.
* LNs are removed in the papers' order, staggered by ``gap`` steps per layer:
  ``ln_2`` (the MLP's) of each layer, then ``ln_1`` on the Q/K path, then
  ``ln_1`` on the V path, then ``ln_f``.
* Position 0 and EOT tokens, whose residual norm is far from the others', keep
  their own ``sigma`` (estimated and frozen the same way) until ``special_until``;
  after it every position uses the common ``sigma``.
* Until ``ln_f`` is removed, an auxiliary loss ``lambda * E[(sigma_pos - sigma_hat)^2]``
  pulls the per-position standard deviation of the final residual stream
  towards the common estimate (position 0 and EOT excluded).
* The result is written in the published checkpoints' format: LN weight
  ``x 1e6 / sigma``, bias unchanged, ``layer_norm_epsilon = 1e12``, so that
  :func:`noln_core.load_model` (and ``transformers``) treat it exactly like
  ``apollo-research/gpt2_noLN``.

The same :class:`TrainableGPT2` with every LN live trains a GPT-2 from scratch
(:func:`train`), which the demo pair uses.

Why a second GPT-2 forward, beside :class:`noln_core.model.LoadedModel`'s?
That one runs *folded* weights (each LayerNorm's centring, weight and bias
multiplied into the next matrix) under ``torch.inference_mode``, with no
trainable LayerNorm parameters left to hold, and ``ln_1`` feeds Q, K and V
through one fused matrix.  Removal needs the opposite: unfolded, trainable LN
weights and biases; a divisor that is measured by a running average and then
frozen per LN *and per path* (``ln_1`` on Q/K is removed before ``ln_1`` on V,
so one LN must feed two different normalisations); separate σ for position 0
and EOT; autograd through all of it.  What the two share is the checkpoint
format: both read and write it through :mod:`noln_core.checkpoint`, and the
tests check that a trained model loads and runs identically in both.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import TRICK_EPS, TRICK_SCALE, Checkpoint, check_tensors, read_config, write_checkpoint


# --------------------------------------------------------------------------- model


class FakeLayerNorm(nn.Module):
    """A LayerNorm whose divisor can be frozen; ``ln_1`` serves two paths (Q/K and V), frozen separately."""

    def __init__(self, d: int, eps: float = 1e-5, paths: tuple[str, ...] = ("out",), momentum: float = 0.9):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps, self.paths, self.momentum = eps, paths, momentum
        self.register_buffer("sigma", torch.tensor(float("nan")))  # common estimate
        self.register_buffer("sigma_special", torch.tensor(float("nan")))  # position 0 and EOT
        self.fake = {p: False for p in paths}
        self.special = True  # position 0 / EOT use their own sigma

    def _update(self, x: torch.Tensor, special_mask: torch.Tensor) -> None:
        with torch.no_grad():
            std = (x.float().var(-1, unbiased=False) + self.eps).sqrt()
            normal, special = std[~special_mask], std[special_mask]
            for buf, values in ((self.sigma, normal), (self.sigma_special, special)):
                if values.numel():
                    new = values.mean()
                    buf.copy_(new if torch.isnan(buf) else self.momentum * buf + (1 - self.momentum) * new)

    def forward(self, x: torch.Tensor, special_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training and not any(self.fake.values()):  # frozen at the first removal, shared by both paths
            self._update(x, special_mask)
        centred = x - x.mean(-1, keepdim=True)
        out = {}
        live = None
        for path in self.paths:
            if self.fake[path]:
                sigma = self.sigma.expand(special_mask.shape)
                if self.special and not torch.isnan(self.sigma_special):
                    sigma = torch.where(special_mask, self.sigma_special, sigma)
                y = centred / sigma[..., None].to(x.dtype)
            else:
                if live is None:
                    live = centred / (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
                y = live
            out[path] = y * self.weight + self.bias
        return out

    def remove(self, path: str) -> None:
        """Freeze ``sigma`` for ``path``: from now on this path divides by the constant."""
        if torch.isnan(self.sigma):
            raise RuntimeError("sigma was never measured: run some training steps before removing an LN")
        self.fake[path] = True


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, d_mlp: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = FakeLayerNorm(d, eps, paths=("qk", "v"))
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = FakeLayerNorm(d, eps)
        self.c_fc = nn.Linear(d, d_mlp)
        self.mlp_proj = nn.Linear(d_mlp, d)

    def forward(self, x: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.ln_1(x, special)
        W, b = self.c_attn.weight, self.c_attn.bias
        qk = F.linear(h["qk"], W[: 2 * d], b[: 2 * d])
        v = F.linear(h["v"], W[2 * d:], b[2 * d:])
        q, k = qk.split(d, dim=-1)
        heads = lambda t: t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        z = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.attn_proj(z.transpose(1, 2).reshape(B, T, d))
        m = self.ln_2(x, special)["out"]
        return x + self.mlp_proj(F.gelu(self.c_fc(m), approximate="tanh"))


class TrainableGPT2(nn.Module):
    """GPT-2 (tied embeddings, pre-LN) with fake LayerNorms; reads and writes HF ``GPT2LMHeadModel`` weights."""

    def __init__(self, config: dict, keep: torch.Tensor | None = None):
        """``keep``: the token ids whose embedding rows are trained; every other row is fixed at zero.

        A zero row gives its token a logit of exactly 0, so the full-vocabulary
        softmax is ``logsumexp(kept logits, log n_dropped)``: exact, at the cost
        of the kept rows only.  A small model trained on one corpus keeps the
        ~10k tokens the corpus uses (instead of all 50,257).
        """
        super().__init__()
        self.config = dict(config)
        d, L, H = config["n_embd"], config["n_layer"], config["n_head"]
        d_mlp = config.get("n_inner") or 4 * d
        eps = float(config.get("layer_norm_epsilon", 1e-5))
        self.eot = int(config.get("eos_token_id", 50256))
        vocab = int(config["vocab_size"])
        keep = torch.arange(vocab) if keep is None else torch.unique(torch.as_tensor(keep, dtype=torch.long))
        remap = torch.full((vocab,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        self.register_buffer("keep", keep, persistent=True)
        self.register_buffer("remap", remap, persistent=True)
        self.n_dropped = vocab - len(keep)
        self.wte = nn.Embedding(len(keep), d)
        self.wpe = nn.Embedding(config["n_positions"], d)
        self.blocks = nn.ModuleList(Block(d, H, d_mlp, eps) for _ in range(L))
        self.ln_f = FakeLayerNorm(d, eps)

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            else:
                scale = std / math.sqrt(2 * len(self.blocks)) if name.endswith("proj.weight") else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)

    def special_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens == self.eot
        mask[:, 0] = True
        return mask

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over the kept tokens and the final residual stream (for the auxiliary loss)."""
        special = self.special_mask(tokens)
        compact = self.remap[tokens]
        embed = self.wte(compact.clamp_min(0)) * (compact >= 0)[..., None]
        x = embed + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x, special)
        h = self.ln_f(x, special)["out"]
        return h @ self.wte.weight.T, x

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the *full* vocabulary (dropped tokens have logit 0)."""
        logits = logits.reshape(-1, logits.shape[-1]).float()
        targets = self.remap[targets.reshape(-1)]
        lse = torch.logsumexp(logits, -1)
        if self.n_dropped:
            lse = torch.logaddexp(lse, torch.tensor(math.log(self.n_dropped)))
        target_logit = logits.gather(-1, targets.clamp_min(0)[:, None])[:, 0] * (targets >= 0)
        return (lse - target_logit).mean()

    def layer_norms(self) -> Iterator[FakeLayerNorm]:
        for block in self.blocks:
            yield block.ln_1
            yield block.ln_2
        yield self.ln_f

    # -- HF format -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: Path) -> "TrainableGPT2":
        directory = Path(directory)
        config = read_config(directory, str(directory))
        if config.ln_free:
            raise ValueError(f"{directory} is already LN-free")
        ckpt = Checkpoint(directory, str(directory))
        check_tensors(ckpt, config, str(directory))
        sd = {k: ckpt.get(k).float() for k in ckpt.keys()}
        used = sd["wte.weight"].abs().sum(-1) > 0  # rows a corpus-trained model never used are exactly zero
        model = cls(dict(config.raw), keep=None if used.all() else used.nonzero()[:, 0])
        model.load_hf_state_dict(sd)
        return model

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.wte.weight.copy_(sd["wte.weight"][self.keep])
            self.wpe.weight.copy_(sd["wpe.weight"])
            for i, b in enumerate(self.blocks):
                p = f"h.{i}."
                for ln, name in ((b.ln_1, "ln_1"), (b.ln_2, "ln_2")):
                    ln.weight.copy_(sd[p + name + ".weight"])
                    ln.bias.copy_(sd[p + name + ".bias"])
                for lin, name in ((b.c_attn, "attn.c_attn"), (b.attn_proj, "attn.c_proj"), (b.c_fc, "mlp.c_fc"),
                                  (b.mlp_proj, "mlp.c_proj")):
                    lin.weight.copy_(sd[p + name + ".weight"].T)  # HF Conv1D stores (in, out)
                    lin.bias.copy_(sd[p + name + ".bias"])
            self.ln_f.weight.copy_(sd["ln_f.weight"])
            self.ln_f.bias.copy_(sd["ln_f.bias"])

    def hf_state_dict(self, ln_free: bool) -> dict[str, torch.Tensor]:
        """HF GPT-2 tensors; ``ln_free`` writes the neutralising trick (weight x 1e6/sigma, eps 1e12)."""
        wte = torch.zeros(int(self.config["vocab_size"]), self.wte.weight.shape[1])
        wte[self.keep] = self.wte.weight.detach()
        sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": self.wpe.weight}

        def ln_weight(ln: FakeLayerNorm) -> torch.Tensor:
            if not ln_free:
                return ln.weight
            if torch.isnan(ln.sigma):
                raise RuntimeError("an LN was never measured")
            return ln.weight * (TRICK_SCALE / ln.sigma)

        for i, b in enumerate(self.blocks):
            p = f"transformer.h.{i}."
            for ln, name in ((b.ln_1, "ln_1"), (b.ln_2, "ln_2")):
                sd[p + name + ".weight"], sd[p + name + ".bias"] = ln_weight(ln), ln.bias
            for lin, name in ((b.c_attn, "attn.c_attn"), (b.attn_proj, "attn.c_proj"), (b.c_fc, "mlp.c_fc"),
                              (b.mlp_proj, "mlp.c_proj")):
                sd[p + name + ".weight"], sd[p + name + ".bias"] = lin.weight.T, lin.bias
        sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = ln_weight(self.ln_f), self.ln_f.bias
        return {k: v.detach() for k, v in sd.items()}

    def save_pretrained(self, directory: Path, ln_free: bool, half: bool = True, tokenizer_from: Path | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (large matrices in float16 when ``half``)."""
        directory = Path(directory)
        config = {
            **{k: v for k, v in self.config.items() if not k.startswith("_")},
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
            "layer_norm_epsilon": TRICK_EPS if ln_free else float(self.config.get("layer_norm_epsilon", 1e-5)),
            "tie_word_embeddings": True, "bos_token_id": self.eot, "eos_token_id": self.eot,
        }
        write_checkpoint(directory, self.hf_state_dict(ln_free), config, half=half)
        if tokenizer_from is not None:
            for name in ("vocab.json", "merges.txt", "tokenizer.json"):
                if (Path(tokenizer_from) / name).is_file():
                    (directory / name).write_bytes((Path(tokenizer_from) / name).read_bytes())


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """When each LayerNorm is removed (steps count from 0)."""

    mlp_start: int
    """Step at which layer 0's ``ln_2`` is removed; layer ``l`` follows at ``mlp_start + l * gap``."""
    qk_start: int
    """Likewise for ``ln_1`` on the Q/K path."""
    v_start: int
    """Likewise for ``ln_1`` on the V path."""
    lnf_start: int
    """Step at which ``ln_f`` is removed."""
    gap: int
    special_until: int
    """Position 0 and EOT keep their own sigma before this step."""
    aux_lambda: float = 0.1
    """Weight of the auxiliary loss on the final standard deviation (before ``ln_f`` is removed)."""

    @classmethod
    def for_model(cls, n_layers: int, steps: int) -> "Schedule":
        """The papers' GPT-2 small schedule (20 / 44 / 68 / 104, gap 2, over 300 steps) scaled to ``steps``.

        Starts are pushed later where ``n_layers`` staggered removals would overlap the next phase.
        """
        scale = steps / 300
        gap = max(1, round(2 * scale))
        mlp = max(1, round(20 * scale))
        qk = max(mlp + n_layers * gap, round(44 * scale))
        v = max(qk + n_layers * gap, round(68 * scale))
        lnf = max(v + n_layers * gap, round(104 * scale))
        special_until = lnf + (steps - lnf) // 2
        if special_until >= steps - 1 or lnf >= steps:
            raise ValueError(f"{steps} steps are too few to remove the LNs of {n_layers} layers (ln_f alone starts at {lnf})")
        return cls(mlp, qk, v, lnf, gap, special_until=special_until)

    def events(self, n_layers: int) -> dict[int, list[tuple[str, int]]]:
        out: dict[int, list[tuple[str, int]]] = {}
        for layer in range(n_layers):
            out.setdefault(self.mlp_start + layer * self.gap, []).append(("ln_2", layer))
            out.setdefault(self.qk_start + layer * self.gap, []).append(("ln_1.qk", layer))
            out.setdefault(self.v_start + layer * self.gap, []).append(("ln_1.v", layer))
        out.setdefault(self.lnf_start, []).append(("ln_f", -1))
        return out


def apply_event(model: TrainableGPT2, what: str, layer: int) -> None:
    if what == "ln_f":
        model.ln_f.remove("out")
    elif what == "ln_2":
        model.blocks[layer].ln_2.remove("out")
    else:
        model.blocks[layer].ln_1.remove(what.split(".")[1])


# --------------------------------------------------------------------------- data and training


def batches(tokens: np.ndarray, block: int, batch: int, seed: int, bos: int) -> Iterator[torch.Tensor]:
    """Endless random windows of ``block - 1`` tokens, each with BOS first (as the models are used)."""
    rng = np.random.default_rng(seed)
    n = len(tokens) - block
    while True:
        starts = rng.integers(0, n, size=batch)
        rows = np.stack([np.concatenate([[bos], tokens[s:s + block - 1]]) for s in starts])
        yield torch.from_numpy(rows.astype(np.int64))


@dataclass
class TrainConfig:
    steps: int
    batch: int = 16
    block: int = 128
    lr: float = 6e-4
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    checkpoint_every: int = 50


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: TrainableGPT2,
    tokens: np.ndarray,
    cfg: TrainConfig,
    out: Path,
    schedule: Schedule | None = None,
    progress=None,
) -> list[dict]:
    """Train (or, with a ``schedule``, remove LN by fine-tuning); resumable from ``out/checkpoint.pt``.

    Writes ``out/loss_log.jsonl`` (one line a step: loss, aux loss, lr, what was removed).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        for ln, flags in zip(model.layer_norms(), state["fake"]):
            ln.fake, ln.special = dict(flags["fake"]), flags["special"]
    events = schedule.events(len(model.blocks)) if schedule else {}
    log_path = out / "loss_log.jsonl"
    log: list[dict] = []
    bos = model.eot
    data = batches(tokens, cfg.block, cfg.batch, cfg.seed + start, bos)
    model.train()
    bar = progress  # a tqdm-like bar (update, set_postfix, close), or None
    if bar is not None and start:
        bar.update(start)
    for step in range(start, cfg.steps):
        removed = []
        for what, layer in events.get(step, []):
            apply_event(model, what, layer)
            removed.append(f"{what}@{layer}" if layer >= 0 else what)
        if schedule and step == schedule.special_until:
            for ln in model.layer_norms():
                ln.special = False
            removed.append("special-sigma-merged")
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        batch = next(data)
        logits, resid = model(batch[:, :-1])
        loss = model.loss(logits, batch[:, 1:])
        aux = torch.zeros(())
        if schedule and not model.ln_f.fake["out"]:
            special = model.special_mask(batch[:, :-1])
            std = (resid.var(-1, unbiased=False) + model.ln_f.eps).sqrt()
            target = model.ln_f.sigma.detach()
            if not torch.isnan(target):
                aux = schedule.aux_lambda * (std[~special] - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        entry = {"step": step, "loss": round(loss.item(), 5), "aux": round(aux.item(), 6), "lr": _lr(cfg, step),
                 "removed": removed, "time": time.time()}
        log.append(entry)
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                        "fake": [{"fake": ln.fake, "special": ln.special} for ln in model.layer_norms()],
                        "config": asdict(cfg)}, ckpt_path)
    if bar is not None:
        bar.close()
    return log


def remove_layernorm(
    base: Path, data_tokens: np.ndarray, out: Path, steps: int = 300, schedule: Schedule | None = None,
    cfg: TrainConfig | None = None, progress=None,
) -> Path:
    """Fine-tune ``base`` (a GPT-2 directory) with the removal schedule and write the LN-free checkpoint to ``out``."""
    model = TrainableGPT2.from_pretrained(Path(base))
    schedule = schedule or Schedule.for_model(len(model.blocks), steps)
    cfg = cfg or TrainConfig(steps=steps)
    train(model, data_tokens, cfg, Path(out) / "_training", schedule=schedule, progress=progress)
    if not all(all(ln.fake.values()) for ln in model.layer_norms()):
        raise RuntimeError("the schedule ended before every LayerNorm was removed")
    model.save_pretrained(Path(out), ln_free=True, tokenizer_from=Path(base))
    (Path(out) / "removal_schedule.json").write_text(json.dumps(asdict(schedule), indent=2) + "\n")
    return Path(out)
