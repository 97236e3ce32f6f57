"""Corpus-level studies: the papers' tables and figures on any models and any corpus.

``corpus`` turns a source into fixed-length sequences; ``measure`` reduces one
batch of every model to per-sequence numbers; ``stats`` keeps exact,
mergeable totals and computes intervals; ``results`` builds the documented
dataclasses and the JSON document; ``engine`` runs the pass (resumable, and
data-parallel under ``accelerate launch``); ``report`` writes the files.
"""

from ..corpus import DEMO_CORPUS, Corpus, parse_corpus, text_corpus
from .engine import Progress, World, run_study
from .measure import METRICS, NMAE_TARGETS, Settings
from .results import ModelStudy, PairStudy, StudyResult, to_json

__all__ = [
    "DEMO_CORPUS", "METRICS", "NMAE_TARGETS", "Corpus", "ModelStudy", "PairStudy", "Progress", "Settings",
    "StudyResult", "World", "parse_corpus", "run_study", "text_corpus", "to_json",
]
