"""The bounded model store: LRU eviction, queued loads, failures not remembered."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from noln_core.store import ModelStore


class FakeModel:
    def __init__(self, spec):
        self.spec = spec


def test_least_recently_used_is_evicted():
    store = ModelStore(2, lambda spec, **_: FakeModel(spec))
    a = store.get("a", "cpu", "float32")
    store.get("b", "cpu", "float32")
    assert store.get("a", "cpu", "float32") is a  # a is now the most recent
    store.get("c", "cpu", "float32")
    assert [k[0] for k in store.resident()] == ["a", "c"] and store.evictions == 1
    assert store.loads == 3


def test_loads_are_queued_one_at_a_time_and_shared():
    active, peak, lock = [0], [0], threading.Lock()

    def slow(spec, **_):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return FakeModel(spec)

    store = ModelStore(8, slow)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: store.get("ab"[i % 2], "cpu", "float32"), range(16)))
    assert peak[0] == 1 and store.loads == 2
    assert len({id(m) for m in got}) == 2


def test_a_failed_load_is_not_remembered():
    calls = []

    def flaky(spec, **_):
        calls.append(spec)
        if len(calls) == 1:
            raise OSError("connection reset during download")
        return FakeModel(spec)

    store = ModelStore(2, flaky)
    with pytest.raises(OSError):
        store.get("a", "cpu", "float32")
    assert store.resident() == []
    assert store.get("a", "cpu", "float32").spec == "a" and len(calls) == 2


def test_at_least_one_model():
    with pytest.raises(ValueError):
        ModelStore(0, lambda spec, **_: None)
