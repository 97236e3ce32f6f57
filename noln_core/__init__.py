"""noln_core: GPT-2 beside its LayerNorm-free fine-tunes, analysed exactly.

Load -> run -> analyse -> draw, each a layer that imports only the ones below it:

* the core (this folder): :func:`load_model` (:mod:`.loading`, reading through
  :mod:`.checkpoint`, folding in :mod:`.model`, tokenising in :mod:`.tokenizer`),
  the :data:`REGISTRY`, the :class:`~noln_core.store.ModelStore`, and
  :func:`compare`, which runs models side by side on the same token ids;
* :mod:`noln_core.analyses`: one module per analysis, each a pure function of a run;
* :mod:`noln_core.viz`: figures and tables of the analyses' dataclasses;
* :mod:`noln_core.training`: LayerNorm removal, the demo builder, corpus evaluation.
"""

__version__ = "0.2.0"

from .analyses import (
    ANALYSES, AttentionSummary, DirectLogitAttribution, HeadDirectEffect, LogitDiffAnalysis, NextTokenAnalysis,
    ResidualNorms, attention, direct_logit_attribution, head_direct_effects, logit_difference, next_token,
    residual_norms,
)
from .compare import ModelRun, RunResult, Target, compare
from .errors import (
    CorruptCheckpointError, InputError, ModelLoadError, NolnError, NotGPT2Error, OfflineError,
    TokenizerMismatchError, UnknownModelError, UnsafeCheckpointError,
)
from .loading import load_model
from .model import LoadedModel, ModelInfo
from .interop import to_transformer_lens, to_transformers
from .registry import DEFAULT_PAIR, DEMO_PAIR, REGISTRY, KnownModel, default_pair, list_revisions, parse_spec
from .tokenizer import tokenize


__all__ = [
    "to_transformer_lens",
    "to_transformers",
    "ANALYSES", "AttentionSummary", "CorruptCheckpointError", "DEFAULT_PAIR", "DEMO_PAIR",
    "DirectLogitAttribution", "HeadDirectEffect", "InputError", "KnownModel", "LoadedModel", "LogitDiffAnalysis",
    "ModelInfo", "ModelLoadError", "ModelRun", "NextTokenAnalysis", "NolnError", "NotGPT2Error", "OfflineError",
    "REGISTRY", "ResidualNorms", "RunResult", "Target", "TokenizerMismatchError", "UnknownModelError",
    "UnsafeCheckpointError", "attention", "compare", "default_pair", "direct_logit_attribution",
    "head_direct_effects", "list_revisions", "load_model", "logit_difference", "next_token", "parse_spec",
    "residual_norms", "tokenize",
]
