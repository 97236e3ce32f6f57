"""A bounded, thread-safe store of loaded models for servers with many sessions.

* At most ``max_models`` models stay resident; the least recently used is
  evicted first.  A run that still holds an evicted model keeps it alive until
  it finishes (models are immutable), so eviction never breaks a run.
* Loads are queued, first come first served, one at a time: a burst of
  sessions asking for different models cannot exhaust memory by loading them
  all at once.  A waiting session is told its place in the queue
  (``on_wait``).  A session asking for a model that a session ahead of it
  loaded gets that one.
* A failed load is not remembered: the next request tries again, so an
  interrupted download or a transient hub error never poisons the store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from .model import LoadedModel

Key = tuple[str, str, str]
"""(spec, device, dtype): everything that makes two loads differ."""


class ModelStore:
    def __init__(self, max_models: int, loader: Callable[..., LoadedModel]):
        """``loader(spec, device=..., dtype=...)`` loads one model (``noln_core.load_model`` or a wrapper)."""
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models = max_models
        self._loader = loader
        self._models: OrderedDict[Key, LoadedModel] = OrderedDict()
        self._cond = threading.Condition()  # guards _models and _queue
        self._queue: list[object] = []  # one ticket per request waiting to load, the loading one first
        self.loads = 0
        self.evictions = 0

    def _resident(self, key: Key) -> LoadedModel | None:
        with self._cond:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def get(self, spec: str, device: str, dtype: str,
            on_wait: Callable[[int], None] | None = None) -> LoadedModel:
        """The model for ``(spec, device, dtype)``, loading it in turn if it is not resident.

        ``on_wait(n)`` is called (from this thread) whenever the number of
        loads ahead of this one changes while it waits; never when it need not wait.
        """
        key = (spec, device, dtype)
        model = self._resident(key)
        if model is not None:
            return model
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
        try:
            told = None
            while True:
                with self._cond:
                    ahead = self._queue.index(ticket)
                    if ahead == 0:
                        break
                if on_wait is not None and ahead != told:
                    on_wait(ahead)
                    told = ahead
                with self._cond:
                    if self._queue.index(ticket) == ahead:
                        self._cond.wait(timeout=0.5)
            model = self._resident(key)  # loaded by a session ahead of this one
            if model is not None:
                return model
            model = self._loader(spec, device=device, dtype=dtype)
            with self._cond:
                self.loads += 1
                self._models[key] = model
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
                    self.evictions += 1
            return model
        finally:
            with self._cond:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def waiting(self) -> int:
        """Requests queued to load, the one loading now included."""
        with self._cond:
            return len(self._queue)

    def resident(self) -> list[Key]:
        with self._cond:
            return list(self._models)

    def clear(self) -> None:
        with self._cond:
            self._models.clear()
