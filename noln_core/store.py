"""A bounded, thread-safe store of loaded models for servers with many sessions.

* At most ``max_models`` models stay resident; the least recently used is
  evicted first.  A run that still holds an evicted model keeps it alive until
  it finishes (models are immutable), so eviction never breaks a run.
* Loads are queued, first come first served, one at a time: a burst of
  sessions asking for different models cannot exhaust memory by loading them
  all at once.  A waiting session is told its place in the queue
  (``on_wait``).  A session asking for a model that a session ahead of it
  loaded gets that one.
* With a byte budget (``max_bytes`` and an ``estimate`` of a model's size from
  its config), the store evicts *before* it loads, so the models alive during a
  load never exceed the budget, and a model that cannot fit is refused at once
  with one line instead of an out-of-memory kill.
* A failed load is not remembered: the next request tries again, so an
  interrupted download or a transient hub error never poisons the store.
* The budget counts every model still alive, not only the resident ones: a
  model evicted while a run (or anything else) still holds it keeps taking
  memory, so the store follows each model it handed out with a weak reference
  (:meth:`live_bytes`).  When eviction cannot make room because evicted models
  are still in use, a load waits for them to be released (up to ``max_wait``),
  then is refused with one line.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections import OrderedDict
from typing import Callable

from .errors import ModelLoadError
from .model import LoadedModel

Key = tuple[str, str, str]
"""(spec, device, dtype): everything that makes two loads differ."""


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


class ModelStore:
    def __init__(self, max_models: int, loader: Callable[..., LoadedModel], max_bytes: int | None = None,
                 estimate: Callable[[str, str, str], int] | None = None):
        """``loader(spec, device=..., dtype=...)`` loads one model (``noln_core.load_model`` or a wrapper).

        ``max_bytes``: the memory all resident models may take; ``estimate(spec, device, dtype)`` says what a
        model will take before it is loaded (:func:`noln_core.loading.estimate_bytes`), and must be given with it.
        """
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        if (max_bytes is None) != (estimate is None):
            raise ValueError("give max_bytes and estimate together")
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._loader = loader
        self._estimate = estimate
        self._sizes: dict[Key, int] = {}
        self._models: OrderedDict[Key, LoadedModel] = OrderedDict()
        self._cond = threading.Condition()  # guards _models and _queue
        self._queue: list[object] = []  # one ticket per request waiting to load, the loading one first
        self._handed: list[tuple[weakref.ref, int]] = []  # every model loaded, while alive, and its bytes
        self.loads = 0
        self.evictions = 0
        self.waits = 0

    def _resident(self, key: Key) -> LoadedModel | None:
        with self._cond:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def get(self, spec: str, device: str, dtype: str,
            on_wait: Callable[[int], None] | None = None, max_wait: float | None = None) -> LoadedModel:
        """The model for ``(spec, device, dtype)``, loading it in turn if it is not resident.

        ``on_wait(n)`` is called (from this thread) whenever the number of
        loads ahead of this one changes while it waits; never when it need not wait.
        ``max_wait``: seconds to wait for a turn before giving up with a one-line
        :class:`~noln_core.errors.ModelLoadError` (the request leaves the queue).
        """
        key = (spec, device, dtype)
        model = self._resident(key)
        if model is not None:
            return model
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
        deadline = None if max_wait is None else time.monotonic() + max_wait
        try:
            told = None
            while True:
                with self._cond:
                    ahead = self._queue.index(ticket)
                    if ahead == 0:
                        break
                if deadline is not None and time.monotonic() > deadline:
                    raise ModelLoadError(
                        f"the server is busy loading other models ({ahead} ahead of {spec}) and waited {max_wait:.0f} s: "
                        "try again in a minute"
                    )
                if on_wait is not None and ahead != told:
                    on_wait(ahead)
                    told = ahead
                with self._cond:
                    if self._queue.index(ticket) == ahead:
                        self._cond.wait(timeout=0.5)
            model = self._resident(key)  # loaded by a session ahead of this one
            if model is not None:
                return model
            if self.max_bytes is not None:
                self._make_room(spec, self._estimate(spec, device, dtype), dtype, deadline)  # type: ignore[misc]
            model = self._loader(spec, device=device, dtype=dtype)
            with self._cond:
                self.loads += 1
                self._models[key] = model
                self._sizes[key] = getattr(model, "nbytes", 0)
                self._handed.append((weakref.ref(model), self._sizes[key]))
                while len(self._models) > self.max_models:
                    self._evict_oldest()
            return model
        finally:
            with self._cond:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _evict_oldest(self) -> None:
        key, _ = self._models.popitem(last=False)
        self._sizes.pop(key, None)
        self.evictions += 1

    def _make_room(self, spec: str, need: int, dtype: str, deadline: float | None) -> None:
        """Evict the least recently used models until ``need`` more bytes fit the budget with every model still
        alive; wait for evicted models in use to be released; refuse what never fits."""
        assert self.max_bytes is not None
        if need > self.max_bytes:
            raise ModelLoadError(
                f"{spec} needs about {_size(need)} as {dtype}, more than the {_size(self.max_bytes)} this server keeps "
                "for models: pick a smaller model, or bfloat16"
            )
        waited = False
        deadline = time.monotonic() + 60 if deadline is None else deadline
        while True:
            with self._cond:
                while self._models and self.live_bytes() + need > self.max_bytes:
                    self._evict_oldest()
                if self.live_bytes() + need <= self.max_bytes:
                    return
            gc.collect()  # an evicted model held only by a reference cycle
            if self.live_bytes() + need <= self.max_bytes:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise ModelLoadError(
                    f"the server's memory for models is held by runs in progress ({_size(self.live_bytes())} of "
                    f"{_size(self.max_bytes)}); {spec} does not fit yet: try again in a minute"
                )
            if not waited:
                self.waits += 1
                waited = True
            with self._cond:
                self._cond.wait(timeout=0.2)

    def resident_bytes(self) -> int:
        """Bytes of the resident models' weights."""
        with self._cond:
            return sum(self._sizes.values())

    def live_bytes(self) -> int:
        """Bytes of every model this store loaded that is still alive: the resident ones, and evicted ones that
        something (a run in progress, a session) still holds."""
        with self._cond:
            self._handed = [(ref, size) for ref, size in self._handed if ref() is not None]
            return sum(size for _, size in self._handed)

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
            self._sizes.clear()
