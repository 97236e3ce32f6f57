"""Presentation: Plotly figure builders (:mod:`.figures`) and tidy tables (:mod:`.tables`) of the analyses'
dataclasses.  Pure functions that compute nothing new; no Streamlit."""
from . import figures, tables

__all__ = ["figures", "tables"]
