"""Indirect-object-identification (IOI) prompt pairs, as the papers' attribution-patching study builds them.

``mech_interp/attribution_patching/ioi_utils.py`` of ``submarat/removing-layer-norm`` (@583a9e6, lines 19-31 and
62-77) makes 30 sets of 16 prompts with ``IOIDataset(prompt_type="BABA", N=8, symmetric=True, nb_templates=1)``
(``ioi_dataset.py``, Wang et al. 2022), the flipped copy ``gen_flipped_prompts(("IO", "S1"))``, interleaved and
reordered by ``[0, 3, 1, 2]`` in groups of four.  For two names X, Y, a place and an object, one group is::

    Then, X and Y went to the P. X gave a O to   -> " Y" (against " X")
    Then, X and Y went to the P. Y gave a O to   -> " X"
    Then, Y and X went to the P. X gave a O to   -> " Y"
    Then, Y and X went to the P. Y gave a O to   -> " X"

and ``attr_vs_act_patching_(per_prompt).py`` (lines 141-144) takes each prompt's pair partner (``i + 1`` for even
``i``, ``i - 1`` for odd) as its corrupted prompt: the two differ in one token, the second subject (S2), and their
answers are swapped.  The papers' names, places and objects were drawn with an unseeded ``random``; here a seed
makes the draw repeatable (the structure, and with ``templates=1`` the template, are theirs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from ..errors import InputError

TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)
"""BABA templates of ``ioi_dataset.py`` (lines 129-145) that name the place and end with ``to [A]``; the papers use
the first only (``nb_templates=1``)."""
NAMES = tuple("""Michael Christopher Jessica Matthew Ashley Jennifer Joshua Amanda Daniel David James Robert John Joseph
Andrew Ryan Brandon Jason Justin Sarah William Jonathan Stephanie Brian Nicole Nicholas Anthony Heather Eric Elizabeth
Adam Megan Melissa Kevin Steven Thomas Timothy Christina Kyle Rachel Laura Lauren Amber Brittany Danielle Richard
Kimberly Jeffrey Amy Crystal Michelle Tiffany Jeremy Benjamin Mark Emily Aaron Charles Rebecca Jacob Stephen Patrick
Sean Erin Jamie Kelly Samantha Nathan Sara Dustin Paul Angela Tyler Scott Katherine Andrea Gregory Erica Mary Travis
Lisa Kenneth Bryan Lindsey Kristen Jose Alexander Jesse Katie Lindsay Shannon Vanessa Courtney Christine Alicia Cody
Allison Bradley Samuel""".split())
"""``ioi_dataset.py``'s names (lines 15-115)."""
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
PAPERS_PROMPTS = 480
"""30 sets of 16 (``ioi_utils.py``, line 63)."""


@dataclass(frozen=True)
class IOIPair:
    """One clean prompt, its corrupted partner (the S2 name swapped) and the clean prompt's answers."""

    clean: str
    corrupted: str
    answer: str
    """The indirect object, with its leading space (``" Mary"``)."""
    counterfactual: str
    """The subject."""
    template: int


def ioi_group(template: int, x: str, y: str, place: str, obj: str) -> tuple[IOIPair, ...]:
    """The papers' group of four pairs for names ``x``, ``y`` (module docstring), in their order."""
    base = TEMPLATES[template].replace("[PLACE]", place).replace("[OBJECT]", obj)
    base = base.rsplit(" ", 1)[0]  # the prompt stops before the answer
    head, _, tail = base.rpartition("[B]")  # [B] and [A] in the first clause; the last [B] is the subject S2

    def fill(b: str, a: str, s2: str) -> str:
        return head.replace("[B]", b).replace("[A]", a) + s2 + tail.replace("[A]", a)

    group = [fill(x, y, x), fill(x, y, y), fill(y, x, x), fill(y, x, y)]
    answers = [(y, x), (x, y), (y, x), (x, y)]  # the indirect object is the name S2 is not
    return tuple(IOIPair(group[i], group[i + 1 if i % 2 == 0 else i - 1], " " + answers[i][0], " " + answers[i][1],
                         template) for i in range(4))


def ioi_pairs(n: int = PAPERS_PROMPTS, seed: int = 0, templates: int = 1, tokenizer=None,
              usable: Callable[[int], bool] | None = None) -> tuple[IOIPair, ...]:
    """``n`` clean/corrupted pairs (a multiple of 4: whole groups), in the papers' order (module docstring).

    ``templates``: how many of :data:`TEMPLATES` to draw from (1, the papers' choice, to 8).  With a ``tokenizer``
    only names that are one token after a space are drawn, so that the pair's prompts have equal lengths, and with
    ``usable`` only names whose token id it accepts (a model trained on a small vocabulary knows few names).
    """
    if n < 4 or n % 4:
        raise InputError(f"IOI prompts come in groups of 4: ask for a positive multiple of 4, not {n}")
    if not 1 <= templates <= len(TEMPLATES):
        raise InputError(f"templates must be 1 to {len(TEMPLATES)}, not {templates}")
    names = list(NAMES)
    if tokenizer is not None:
        ids = {x: tokenizer.encode(" " + x, add_special_tokens=False).ids for x in names}
        names = [x for x in names if len(ids[x]) == 1 and (usable is None or usable(ids[x][0]))]
    if len(names) < 2:
        raise InputError("fewer than two of the IOI names are single tokens this model knows")
    rng = random.Random(seed)
    pairs: list[IOIPair] = []
    for _ in range(n // 4):
        t = rng.randrange(templates)
        x, y = rng.sample(names, 2)
        pairs.extend(ioi_group(t, x, y, rng.choice(PLACES), rng.choice(OBJECTS)))
    return tuple(pairs)
