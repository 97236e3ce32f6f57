"""The papers' removal recipes: when each LayerNorm goes, and the optimiser around it.

Numbers are those of ``config.py`` in ``submarat/removing-layer-norm`` (the ``*_aux``
configurations, which the released ``schaeff/gpt2-*_LNFree*`` models used) and of
``shared/reference/PAPERS.md``:

    preset  starts ln_2/qk/v/ln_f  gaps   λ     lr    min lr  warm-up  batch    steps
    small   20 / 44 / 68 / 104     2/2/3  0.1   6e-4  3e-4    25       32 × 16  300
    medium  20 / 68 / 116 / 188    2/2/3  0.1   6e-4  3e-4    10       22 × 23  500
    large   30 / 174 / 318 / 534   4/4/6  0.03  3e-4  4e-5    15       28 × 18  600
    xl      50 / 242 / 434 / 722   4/4/6  0.01  1e-4  2e-5    20       18 × 28  800

Each phase starts when the previous one has removed every layer
(``start_qk = start_ln2 + n_layers * gap_ln2``...), EOT's own σ ends 2 steps after
``ln_f`` goes and position 0's 10 steps later.  The batch is the papers'
per-device batch × gradient-accumulation steps (sequences of 1024 tokens), so a
global batch of about 2¹⁹ tokens.  Steps are those of the released checkpoints
(``LNFree300``... ``LNFree800``); large and XL decayed their learning rate over
the 1200 steps of their configuration, so the presets do too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Schedule:
    """When each LayerNorm stops normalising (steps count from 0; an event at step s happens before step s)."""

    start_ln2: int
    start_qk: int
    start_v: int
    start_lnf: int
    gap_ln2: int
    gap_qk: int
    gap_v: int
    end_eot: int
    """From this step EOT tokens on ``ln_1``'s V path divide by the common σ (papers: ``start_lnf + 2``)."""
    end_bos: int
    """From this step position 0 divides by the common σ in every LN (papers: ``start_lnf + 12``)."""

    @classmethod
    def staggered(cls, n_layers: int, start_ln2: int, gaps: tuple[int, int, int], eot_after: int = 2,
                  bos_after: int = 12) -> "Schedule":
        """The papers' layout: each phase starts when the one before has gone through every layer."""
        g2, gqk, gv = gaps
        qk = start_ln2 + n_layers * g2
        v = qk + n_layers * gqk
        lnf = v + n_layers * gv
        return cls(start_ln2, qk, v, lnf, g2, gqk, gv, lnf + eot_after, lnf + bos_after)

    @classmethod
    def fitted(cls, n_layers: int, steps: int) -> "Schedule":
        """GPT-2 small's recipe (start 20, gaps 2/2/3, EOT +2, BOS +12 of 300 steps) scaled to ``steps``.

        For models and budgets no paper used; every gap is at least one step.
        """
        scale = steps / 300
        at_least = lambda x: max(1, round(x * scale))  # noqa: E731
        s = cls.staggered(n_layers, at_least(20), (at_least(2), at_least(2), at_least(3)), at_least(2), at_least(12))
        if s.end_bos >= steps:
            raise ValueError(f"{steps} steps are too few to remove the LNs of {n_layers} layers: the schedule needs "
                             f"{s.end_bos + 1}; raise --steps")
        return s

    @property
    def last_event(self) -> int:
        return max(self.start_lnf, self.end_eot, self.end_bos)

    def events(self, n_layers: int, special_sigma: bool = True) -> dict[int, list[tuple[str, int]]]:
        """``{step: [(what, layer), ...]}``; ``what`` is a phase, or (with ``special_sigma``) ``eot-sigma-ends`` or
        ``bos-sigma-ends``."""
        out: dict[int, list[tuple[str, int]]] = {}
        for layer in range(n_layers):
            out.setdefault(self.start_ln2 + layer * self.gap_ln2, []).append(("ln_2", layer))
            out.setdefault(self.start_qk + layer * self.gap_qk, []).append(("ln_1.qk", layer))
            out.setdefault(self.start_v + layer * self.gap_v, []).append(("ln_1.v", layer))
        out.setdefault(self.start_lnf, []).append(("ln_f", -1))
        if special_sigma:
            out.setdefault(self.end_eot, []).append(("eot-sigma-ends", -1))
            out.setdefault(self.end_bos, []).append(("bos-sigma-ends", -1))
        return out

    def describe(self) -> str:
        return (f"ln_2 from {self.start_ln2} every {self.gap_ln2}, ln_1 Q/K from {self.start_qk} every {self.gap_qk}, "
                f"ln_1 V from {self.start_v} every {self.gap_v}, ln_f at {self.start_lnf}; EOT's own σ ends at "
                f"{self.end_eot}, position 0's at {self.end_bos}")


@dataclass(frozen=True)
class Recipe:
    """Everything of a run but the model and the data; a preset is one, and explicit flags replace its fields."""

    steps: int = 300
    batch: int = 16
    """Sequences per optimiser step, over all processes and accumulation steps (the global batch)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step; each process forwards ``batch / (grad_accum * processes)`` sequences."""
    seq_len: int = 1024
    lr: float = 6e-4
    min_lr: float = 3e-4
    warmup: int = 20
    decay_steps: int | None = None
    """Steps of the cosine decay (default ``steps``)."""
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    aux_lambda: float = 0.1
    momentum: float = 0.9
    """Of the σ moving average: ``ema = momentum * ema + (1 - momentum) * batch σ``."""
    start_ln2: int | None = None
    gaps: tuple[int, int, int] | None = None
    preset: str | None = None
    seed: int = 0
    special_sigma: bool = False
    """Position 0 (every LN) and EOT (``ln_1``'s V path) divide by a σ of their own until ``ln_f`` + 12 / + 2.
    This project's option, after the Apollo fork; the released code has none (see :mod:`.removal`)."""
    ln_gain_decay: bool | None = None
    """Weight decay on the LN gains.  None: the released code's rule, decayed when removing LN (its
    ``FakeLayerNorm`` is no ``nn.LayerNorm``, so ``transformers``' Trainer decays it) and not in the control."""
    eot_loss: bool = False
    """Count the positions whose target is EOT in the loss; the released code leaves them out (its collator's
    padding token is EOS, so their labels are -100)."""

    def decays_ln_gains(self, control: bool) -> bool:
        """Whether the LN gains are decayed in this run (:attr:`ln_gain_decay`, or the released code's rule)."""
        return (not control) if self.ln_gain_decay is None else self.ln_gain_decay

    def schedule(self, n_layers: int) -> Schedule:
        if self.start_ln2 is None or self.gaps is None:
            fitted = Schedule.fitted(n_layers, self.steps)
            start = fitted.start_ln2 if self.start_ln2 is None else self.start_ln2
            gaps = (fitted.gap_ln2, fitted.gap_qk, fitted.gap_v) if self.gaps is None else self.gaps
            eot, bos = fitted.end_eot - fitted.start_lnf, fitted.end_bos - fitted.start_lnf
        else:
            start, gaps, eot, bos = self.start_ln2, self.gaps, 2, 12
        s = Schedule.staggered(n_layers, start, gaps, eot, bos)
        if s.last_event >= self.steps:
            raise ValueError(f"{self.steps} steps are too few for this schedule ({s.describe()}): raise --steps to "
                             f"at least {s.last_event + 1}")
        return s

    def lr_at(self, step: int) -> float:
        """``transformers``' ``cosine_with_min_lr`` with linear warm-up from 0, as the papers' Trainer ran it."""
        if step < self.warmup:
            return self.lr * step / max(1, self.warmup)
        total = self.decay_steps or self.steps
        progress = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


def _preset(name: str, start: int, gaps: tuple[int, int, int], aux: float, lr: float, min_lr: float, warmup: int,
            micro: int, accum: int, steps: int, decay: int | None = None) -> Recipe:
    return Recipe(steps=steps, batch=micro * accum, grad_accum=accum, seq_len=1024, lr=lr, min_lr=min_lr,
                  warmup=warmup, decay_steps=decay, aux_lambda=aux, momentum=0.9 if name in ("small", "medium")
                  else 0.9 ** (micro / 32), start_ln2=start, gaps=gaps, preset=name)


PRESETS: dict[str, Recipe] = {
    "small": _preset("small", 20, (2, 2, 3), 0.1, 6e-4, 3e-4, 25, 32, 16, 300),
    "medium": _preset("medium", 20, (2, 2, 3), 0.1, 6e-4, 3e-4, 10, 22, 23, 500),
    "large": _preset("large", 30, (4, 4, 6), 0.03, 3e-4, 4e-5, 15, 28, 18, 600, 1200),
    "xl": _preset("xl", 50, (4, 4, 6), 0.01, 1e-4, 2e-5, 20, 18, 28, 800, 1200),
}
"""The papers' recipe per GPT-2 size (see the module docstring)."""


SIZES = {"small": (12, 768), "medium": (24, 1024), "large": (36, 1280), "xl": (48, 1600)}
"""``(n_layers, d_model)`` of each GPT-2 size."""


def size_of(n_layers: int, d_model: int) -> str | None:
    return next((name for name, shape in SIZES.items() if shape == (n_layers, d_model)), None)


def recipe(preset: str | None = None, **overrides) -> Recipe:
    """A preset (or the generic defaults) with ``overrides`` (the flags the user gave; ``None`` ones are ignored)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else Recipe()
    given = {k: v for k, v in overrides.items() if v is not None}
    if "lr" in given and "min_lr" not in given:  # keep the preset's ratio of minimum to peak
        given["min_lr"] = given["lr"] * base.min_lr / base.lr
    if "batch" in given and "grad_accum" not in given and given["batch"] % base.grad_accum:
        given["grad_accum"] = 1
    return replace(base, **given)
