"""The trainable GPT-2 of LayerNorm removal: fake LNs whose divisor is measured, then frozen.

Why a second GPT-2 forward, beside :class:`noln_core.model.LoadedModel`'s?  That
one runs *folded* weights under ``torch.inference_mode``, with no trainable
LayerNorm left, and ``ln_1`` feeds Q, K and V through one fused matrix.  Removal
needs the opposite: unfolded, trainable LN weights and biases; a divisor that is
measured by a moving average and then frozen per LN *and per path* (``ln_1`` on
Q/K is removed before ``ln_1`` on V, so one LN feeds two normalisations); its own
σ for position 0 and for EOT; autograd through all of it.  What the two share is
the checkpoint format, read and written through :mod:`noln_core.checkpoint`; the
tests check that a trained model loads and runs identically in both.

The σ estimate follows ``FakeLayerNorm`` of ``submarat/removing-layer-norm``
(``train.py``) with the choices the papers' runs used; :mod:`.removal` lists them
point by point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import TRICK_EPS, TRICK_SCALE, Checkpoint, check_tensors, read_config, write_checkpoint

STD_EPS = 1e-5
"""Added to the variance when σ is measured, as the papers' ``recompute_average_std`` does."""


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the data-parallel processes (no-op with one), in place; returns it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


class FakeLayerNorm(nn.Module):
    """A LayerNorm that can stop normalising: it then divides by a frozen, measured σ.

    ``calls`` are the calls the papers make per forward: ``("out",)`` for ``ln_2``
    and ``ln_f``; ``("qk", "v", "v_eot")`` for ``ln_1``, whose V path is called a
    second time with EOT's own σ.  Each *call* advances the moving average once
    (so ``ln_1``'s advances three times a forward, as in the papers' code), and a
    call whose path is still live copies the average into the σ that fake paths
    divide by.  Hence ``ln_1``'s σ keeps moving after its Q/K path is removed,
    until its V path is removed too; then it is frozen.

    Buffers (all in ``state_dict``, so checkpoints carry them): ``ema``/``ema_bos``
    (the moving averages of the mean per-token σ over every position, position 0
    and EOT included, and of position 0's σ), ``sigma``/``sigma_bos`` (what fake
    paths divide by), ``fake`` (one flag per path: qk, v / out), ``bos_special``
    (position 0 divides by ``sigma_bos``) and ``eot_special`` (EOT tokens on ln_1's
    V path divide by ``sigma_bos``); both start as ``special`` (off in the released
    code, so EOT's extra ``ln_1`` call then changes nothing but still advances σ).
    """

    def __init__(self, d: int, eps: float = 1e-5, calls: tuple[str, ...] = ("out",), momentum: float = 0.9,
                 special: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps, self.calls, self.momentum = eps, calls, momentum
        self.paths = tuple(dict.fromkeys(c.removesuffix("_eot") for c in calls))
        for name in ("ema", "ema_bos"):
            self.register_buffer(name, torch.tensor(float("nan"), dtype=torch.float64))
        for name in ("sigma", "sigma_bos"):
            self.register_buffer(name, torch.tensor(float("nan")))
        self.register_buffer("fake", torch.zeros(len(self.paths), dtype=torch.bool))
        self.register_buffer("bos_special", torch.tensor(special))
        self.register_buffer("eot_special", torch.tensor(special and "v_eot" in calls))

    def is_fake(self, path: str) -> bool:
        return bool(self.fake[self.paths.index(path)])

    def remove(self, path: str) -> None:
        """From now on ``path`` divides by the σ last copied while a path was live."""
        if torch.isnan(self.sigma):
            raise RuntimeError("σ was never measured: run some training steps before removing an LN")
        self.fake[self.paths.index(path)] = True

    @torch.no_grad()
    def _measure(self, x: torch.Tensor) -> tuple[float, float]:
        """The batch's mean per-token σ (every position) and position 0's mean σ, over all processes."""
        std = (x.float().var(-1, unbiased=False) + STD_EPS).sqrt()
        stats = torch.stack([std.sum(), torch.tensor(float(std.numel()), device=std.device),
                             std[:, 0].sum(), torch.tensor(float(std.shape[0]), device=std.device)]).double()
        s, n, s0, n0 = all_reduce_sum(stats).tolist()
        return s / n, s0 / n0

    @torch.no_grad()
    def _advance(self, value: float, value_bos: float, live: bool) -> None:
        m = self.momentum
        for ema, new in ((self.ema, value), (self.ema_bos, value_bos)):
            ema.fill_(new if torch.isnan(ema) else m * ema.item() + (1 - m) * new)
        if live:
            self.sigma.fill_(self.ema.item())
            self.sigma_bos.fill_(self.ema_bos.item())

    def _divisor(self, shape: torch.Size, sigma: float, sigma_bos: float, eot_mask: torch.Tensor | None,
                 eot_special: bool, device) -> torch.Tensor:
        div = torch.full(shape, sigma, device=device)
        if bool(self.bos_special):
            div[:, 0] = sigma_bos
        if eot_special and eot_mask is not None:
            div = torch.where(eot_mask, torch.tensor(sigma_bos, device=device), div)
        return div

    def forward(self, x: torch.Tensor, eot_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.training:
            value, value_bos = self._measure(x)
        divisors: dict[str, tuple[float, float]] = {}
        for call in self.calls:
            path = call.removesuffix("_eot")
            live = not self.is_fake(path)
            if self.training:
                self._advance(value, value_bos, live)
            if not live and call == path:
                divisors[path] = (self.sigma.item(), self.sigma_bos.item())
        centred = x - x.mean(-1, keepdim=True)
        out: dict[str, torch.Tensor] = {}
        real = None
        for path in self.paths:
            if path in divisors:
                eot = path == "v" and bool(self.eot_special)
                div = self._divisor(x.shape[:2], *divisors[path], eot_mask, eot, x.device)
                y = centred / div[..., None].to(x.dtype)
            else:
                if real is None:
                    real = centred / (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
                y = real
            out[path] = y * self.weight + self.bias
        return out


class RemovalBlock(nn.Module):
    """One pre-LN GPT-2 block whose ``ln_1`` feeds Q/K and V separately (the FSDP wrapping unit)."""

    def __init__(self, d: int, n_heads: int, d_mlp: int, eps: float, momentum: float, special: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = FakeLayerNorm(d, eps, calls=("qk", "v", "v_eot"), momentum=momentum, special=special)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = FakeLayerNorm(d, eps, momentum=momentum, special=special)
        self.c_fc = nn.Linear(d, d_mlp)
        self.mlp_proj = nn.Linear(d_mlp, d)

    def forward(self, x: torch.Tensor, eot_mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.ln_1(x, eot_mask)
        W, b = self.c_attn.weight, self.c_attn.bias
        qk = F.linear(h["qk"], W[: 2 * d], b[: 2 * d])
        v = F.linear(h["v"], W[2 * d:], b[2 * d:])
        q, k = qk.split(d, dim=-1)
        heads = lambda t: t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        z = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.attn_proj(z.transpose(1, 2).reshape(B, T, d))
        m = self.ln_2(x, eot_mask)["out"]
        return x + self.mlp_proj(F.gelu(self.c_fc(m), approximate="tanh"))


class TrainableGPT2(nn.Module):
    """GPT-2 (tied embeddings, pre-LN) with fake LayerNorms; reads and writes HF ``GPT2LMHeadModel`` weights."""

    def __init__(self, config: dict, keep: torch.Tensor | None = None, momentum: float = 0.9,
                 special_sigma: bool = False):
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
        self.blocks = nn.ModuleList(RemovalBlock(d, H, d_mlp, eps, momentum, special_sigma) for _ in range(L))
        self.ln_f = FakeLayerNorm(d, eps, momentum=momentum, special=special_sigma)
        self.final_residual: torch.Tensor | None = None
        """The residual stream entering ``ln_f`` in the last forward (the auxiliary loss reads it)."""

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

    def eot_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens == self.eot

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits over the kept tokens; the residual before ``ln_f`` is kept in ``final_residual``."""
        eot = self.eot_mask(tokens)
        compact = self.remap[tokens]
        embed = self.wte(compact.clamp_min(0)) * (compact >= 0)[..., None]
        x = embed + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x, eot)
        self.final_residual = x
        h = self.ln_f(x, eot)["out"]
        return h @ self.wte.weight.T

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every position over the *full* vocabulary (dropped tokens have logit 0)."""
        logits = logits.reshape(-1, logits.shape[-1]).float()
        targets = self.remap[targets.reshape(-1)]
        lse = torch.logsumexp(logits, -1)
        if self.n_dropped:
            lse = torch.logaddexp(lse, torch.tensor(math.log(self.n_dropped), device=lse.device))
        target_logit = logits.gather(-1, targets.clamp_min(0)[:, None])[:, 0] * (targets >= 0)
        return lse - target_logit

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.token_losses(logits, targets).mean()

    def loss_mask(self, targets: torch.Tensor, eot_loss: bool) -> torch.Tensor:
        """Which predicted positions count in the training loss: all, or (the released code) those whose
        target is not EOT."""
        return torch.ones_like(targets, dtype=torch.bool) if eot_loss else targets != self.eot

    def layer_norms(self) -> Iterator[tuple[str, FakeLayerNorm]]:
        for i, block in enumerate(self.blocks):
            yield f"h.{i}.ln_1", block.ln_1
            yield f"h.{i}.ln_2", block.ln_2
        yield "ln_f", self.ln_f

    def set_momentum(self, momentum: float) -> None:
        for _, ln in self.layer_norms():
            ln.momentum = momentum

    # -- HF format -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: Path, momentum: float = 0.9, special_sigma: bool = False) -> "TrainableGPT2":
        directory = Path(directory)
        config = read_config(directory, str(directory))
        if config.ln_free:
            raise ValueError(f"{directory} is already LN-free")
        ckpt = Checkpoint(directory, str(directory))
        check_tensors(ckpt, config, str(directory))
        sd = {k: ckpt.get(k).float() for k in ckpt.keys()}
        used = sd["wte.weight"].abs().sum(-1) > 0  # rows a corpus-trained model never used are exactly zero
        model = cls(dict(config.raw), keep=None if used.all() else used.nonzero()[:, 0], momentum=momentum,
                    special_sigma=special_sigma)
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
        """HF GPT-2 tensors; ``ln_free`` writes the neutralising trick (weight x 1e6/σ, bias kept, eps 1e12)."""
        wte = torch.zeros(int(self.config["vocab_size"]), self.wte.weight.shape[1])
        wte[self.keep.cpu()] = self.wte.weight.detach().float().cpu()
        sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": self.wpe.weight}

        def ln_weight(ln: FakeLayerNorm) -> torch.Tensor:
            if not ln_free:
                return ln.weight
            if torch.isnan(ln.sigma):
                raise RuntimeError("an LN was never measured")
            return ln.weight.double() * (TRICK_SCALE / ln.sigma.double())

        for i, b in enumerate(self.blocks):
            p = f"transformer.h.{i}."
            for ln, name in ((b.ln_1, "ln_1"), (b.ln_2, "ln_2")):
                sd[p + name + ".weight"], sd[p + name + ".bias"] = ln_weight(ln), ln.bias
            for lin, name in ((b.c_attn, "attn.c_attn"), (b.attn_proj, "attn.c_proj"), (b.c_fc, "mlp.c_fc"),
                              (b.mlp_proj, "mlp.c_proj")):
                sd[p + name + ".weight"], sd[p + name + ".bias"] = lin.weight.T, lin.bias
        sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = ln_weight(self.ln_f), self.ln_f.bias
        return {k: v.detach().float().cpu() for k, v in sd.items()}

    def save_pretrained(self, directory: Path, ln_free: bool, half: bool = False, tokenizer_from: Path | None = None,
                        extra_config: dict | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (float32; large matrices in float16 with ``half``)."""
        directory = Path(directory)
        config = {
            **{k: v for k, v in self.config.items() if not k.startswith("_")},
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
            "layer_norm_epsilon": TRICK_EPS if ln_free else float(self.config.get("layer_norm_epsilon", 1e-5)),
            "tie_word_embeddings": True, "bos_token_id": self.eot, "eos_token_id": self.eot,
            **(extra_config or {}),
        }
        write_checkpoint(directory, self.hf_state_dict(ln_free), config, half=half)
        if tokenizer_from is not None:
            for name in ("vocab.json", "merges.txt", "tokenizer.json"):
                if (Path(tokenizer_from) / name).is_file():
                    (directory / name).write_bytes((Path(tokenizer_from) / name).read_bytes())
