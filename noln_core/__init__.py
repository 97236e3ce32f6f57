"""noln_core: GPT-2 beside its LayerNorm-free fine-tunes, analysed exactly."""

from .errors import (
    CorruptCheckpointError, InputError, ModelLoadError, NolnError, NotGPT2Error, OfflineError,
    TokenizerMismatchError, UnknownModelError,
)
from .loading import load_model
from .model import LoadedModel, ModelInfo
from .registry import DEFAULT_PAIR, REGISTRY, KnownModel, list_revisions, parse_spec

__version__ = "0.1.0"
from .attention import AttentionSummary, attention
from .attribution import DirectLogitAttribution, direct_logit_attribution
from .compare import ModelRun, RunResult, Target, compare, tokenize
from .direct_effect import HeadDirectEffect, head_direct_effects
from .logit_diff import LogitDiffAnalysis, logit_difference
from .next_token import NextTokenAnalysis, next_token
from .residual_norms import ResidualNorms, residual_norms

from .evaluate import CorpusLoss, corpus_loss
