"""Training and corpus work, consumers of the core: LayerNorm removal by fine-tuning (:mod:`.removal`), the offline
demo models' builder (:mod:`.demo`); corpus evaluation is the study (:mod:`noln_core.study`).  Imported on demand, never by the run."""
