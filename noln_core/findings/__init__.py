"""The papers' other findings, each a run on loaded models that returns a documented frozen dataclass.

* :mod:`.neurons`: entropy ("confidence") neurons of the last MLP layer: their weight signature and what
  mean-ablating them does, split into the direct part and the part through the final LayerNorm's scale
  (Stolfo et al. 2024); for an LN-free model the second part is exactly zero.
* :mod:`.patching`: activation patching against attribution patching (grad x difference) over layer x position of
  ``resid_pre`` and per head (``z``), with the papers' normalisation and the agreement between the two.
* :mod:`.ioi`: the IOI prompt pairs the papers' attribution-patching study uses, from their templates, seeded.

Unlike :mod:`noln_core.analyses` (pure functions of one cached run), each of these needs the model itself: more
forward passes, a backward pass, or its weights.  They import the run layer below them and nothing above.
"""
