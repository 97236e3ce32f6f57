"""noln_core: GPT-2 beside its LayerNorm-free fine-tunes, analysed exactly.

Load -> run -> analyse: :func:`load_model` gives ready models (LayerNorms folded;
none at all for LN-free checkpoints), :func:`compare` runs them side by side on
the same token ids, and each analysis is a pure function of that run.
"""

__version__ = "0.1.0"

from .attention import AttentionSummary, attention
from .attribution import DirectLogitAttribution, direct_logit_attribution
from .compare import ModelRun, RunResult, Target, compare, tokenize
from .direct_effect import HeadDirectEffect, head_direct_effects
from .errors import (
    CorruptCheckpointError, InputError, ModelLoadError, NolnError, NotGPT2Error, OfflineError,
    TokenizerMismatchError, UnknownModelError,
)
from .evaluate import CorpusLoss, corpus_loss
from .loading import load_model
from .logit_diff import LogitDiffAnalysis, logit_difference
from .model import LoadedModel, ModelInfo
from .next_token import NextTokenAnalysis, next_token
from .registry import DEFAULT_PAIR, DEMO_PAIR, REGISTRY, KnownModel, default_pair, list_revisions, parse_spec
from .residual_norms import ResidualNorms, residual_norms

__all__ = [
    "AttentionSummary", "CorpusLoss", "CorruptCheckpointError", "DEFAULT_PAIR", "DEMO_PAIR", "DirectLogitAttribution",
    "HeadDirectEffect", "InputError", "KnownModel", "LoadedModel", "LogitDiffAnalysis", "ModelInfo", "ModelLoadError",
    "ModelRun", "NextTokenAnalysis", "NolnError", "NotGPT2Error", "OfflineError", "REGISTRY", "ResidualNorms",
    "RunResult", "Target", "TokenizerMismatchError", "UnknownModelError", "attention", "compare", "corpus_loss",
    "default_pair", "direct_logit_attribution", "head_direct_effects", "list_revisions", "load_model",
    "logit_difference", "next_token", "parse_spec", "residual_norms", "tokenize",
]
