"""A bounded, thread-safe store of loaded models for servers with many sessions.

* At most ``max_models`` models stay resident; the least recently used is
  evicted first.  A run that still holds an evicted model keeps it alive until
  it finishes (models are immutable), so eviction never breaks a run.
* Loads are queued: one at a time, so that a burst of sessions asking for
  different models cannot exhaust memory by loading them all at once.  A
  session asking for a model another session is loading waits for it.
* A failed load is not remembered: the next request tries again, so an
  interrupted download or a transient hub error never poisons the store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from .model import LoadedModel

Key = tuple[str, str, str]
"""(spec, device, dtype)."""


class ModelStore:
    def __init__(self, max_models: int, loader: Callable[..., LoadedModel]):
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models = max_models
        self._loader = loader
        self._models: OrderedDict[Key, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards _models
        self._load_lock = threading.Lock()  # one load at a time
        self.loads = 0
        self.evictions = 0

    def get(self, spec: str, device: str, dtype: str, **kwargs) -> LoadedModel:
        key = (spec, device, dtype)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        with self._load_lock:
            with self._lock:  # loaded by another session while this one waited
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            model = self._loader(spec, device=device, dtype=dtype, **kwargs)
            self.loads += 1
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
                    self.evictions += 1
            return model

    def resident(self) -> list[Key]:
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
