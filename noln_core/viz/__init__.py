"""Presentation: Plotly figure builders (:mod:`.figures`, :mod:`.study`) and tidy tables (:mod:`.tables`) of the
analyses' and the study's dataclasses.  Pure functions that compute nothing new; no Streamlit."""
from . import figures, study, tables

__all__ = ["figures", "study", "tables"]
