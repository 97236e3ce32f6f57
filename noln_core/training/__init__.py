"""Training and corpus work, consumers of the core: LayerNorm removal by fine-tuning (:mod:`.removal`), the offline
demo models' builder (:mod:`.demo`) and corpus evaluation (:mod:`.evaluate`).  Imported on demand, never by the run."""
