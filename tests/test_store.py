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


def test_waiting_sessions_are_told_their_place_in_the_queue():
    """Three loads queue behind a slow one; each waiter hears how many are ahead, counting down, first come first served."""
    release = threading.Event()
    order: list[str] = []

    def loader(spec, **_):
        order.append(spec)
        if spec == "slow":
            release.wait(10)
        time.sleep(0.2)  # long enough for every waiter to hear each step of the countdown
        return FakeModel(spec)

    store = ModelStore(8, loader)
    heard: dict[str, list[int]] = {"b": [], "c": [], "d": []}
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(store.get, "slow", "cpu", "float32")
        while store.waiting() < 1:
            time.sleep(0.01)
        futures = []
        for spec in "bcd":
            futures.append(pool.submit(store.get, spec, "cpu", "float32", heard[spec].append))
            while store.waiting() < 2 + "bcd".index(spec):
                time.sleep(0.01)
        time.sleep(0.2)
        assert [h[-1] for h in heard.values()] == [1, 2, 3]  # places while the slow load holds the queue
        release.set()
        assert first.result().spec == "slow" and [f.result().spec for f in futures] == ["b", "c", "d"]
    assert order == ["slow", "b", "c", "d"]
    assert heard["d"] == [3, 2, 1] and heard["b"] == [1]
    assert store.waiting() == 0


def test_a_resident_model_never_waits():
    store = ModelStore(2, lambda spec, **_: FakeModel(spec))
    store.get("a", "cpu", "float32")
    told: list[int] = []
    store.get("a", "cpu", "float32", on_wait=told.append)
    assert told == []


class SizedModel(FakeModel):
    def __init__(self, spec, nbytes):
        super().__init__(spec)
        self.nbytes = nbytes


def test_a_byte_budget_evicts_before_loading():
    """Never more than the budget alive: the oldest model goes before the new one is loaded, not after."""
    sizes = {"a": 40, "b": 40, "c": 50}
    alive_during_load: list[int] = []
    store: ModelStore

    def loader(spec, **_):
        alive_during_load.append(store.resident_bytes())
        return SizedModel(spec, sizes[spec])

    store = ModelStore(8, loader, max_bytes=100, estimate=lambda spec, device, dtype: sizes[spec])
    store.get("a", "cpu", "float32")
    store.get("b", "cpu", "float32")
    store.get("c", "cpu", "float32")
    assert [k[0] for k in store.resident()] == ["b", "c"] and store.resident_bytes() == 90
    assert alive_during_load == [0, 40, 40]  # a was evicted before c loaded: 40 + 50 <= 100 at every moment


def test_a_model_larger_than_the_budget_is_refused_at_once():
    from noln_core import ModelLoadError

    loads = []
    store = ModelStore(8, lambda spec, **_: loads.append(spec) or SizedModel(spec, 10), max_bytes=6_000_000_000,
                       estimate=lambda spec, device, dtype: 6_230_000_000)
    with pytest.raises(ModelLoadError, match=r"needs about 6.2 GB as float32, more than the 6.0 GB this server keeps"):
        store.get("gpt2-xl", "cpu", "float32")
    assert loads == [] and store.waiting() == 0


def test_budget_and_estimate_come_together():
    with pytest.raises(ValueError):
        ModelStore(2, lambda spec, **_: None, max_bytes=10)


def test_waiting_for_a_turn_is_time_limited():
    from noln_core import ModelLoadError

    release = threading.Event()
    store = ModelStore(4, lambda spec, **_: release.wait(10) and FakeModel(spec) if spec == "slow" else FakeModel(spec))
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(store.get, "slow", "cpu", "float32")
        while store.waiting() < 1:
            time.sleep(0.01)
        with pytest.raises(ModelLoadError, match=r"busy loading other models \(1 ahead of b\) .* try again"):
            store.get("b", "cpu", "float32", max_wait=0.3)
        assert store.waiting() == 1  # the request that gave up left the queue
        release.set()
        assert slow.result().spec == "slow"


def test_the_budget_counts_evicted_models_that_are_still_held():
    """An evicted model a run still holds takes memory: a load that would pass the budget with it waits, then is
    refused; once it is released, the load goes through."""
    from noln_core.errors import ModelLoadError

    store = ModelStore(8, lambda spec, **_: SizedModel(spec, 10), max_bytes=25, estimate=lambda *_: 10)
    a, b = store.get("a", "cpu", "float32"), store.get("b", "cpu", "float32")
    with pytest.raises(ModelLoadError, match="held by runs in progress"):
        store.get("c", "cpu", "float32", max_wait=0.3)
    assert store.live_bytes() == 20 and store.resident() == []  # evicted, yet alive
    del a
    c = store.get("c", "cpu", "float32", max_wait=0.3)
    assert store.live_bytes() == 20 and {m.spec for m in (b, c)} == {"b", "c"}


def test_a_load_waits_for_a_held_model_to_be_released():
    store = ModelStore(8, lambda spec, **_: SizedModel(spec, 10), max_bytes=25, estimate=lambda *_: 10)
    held = [store.get("a", "cpu", "float32"), store.get("b", "cpu", "float32")]
    started = time.monotonic()

    def release() -> None:  # once the load is waiting for room, the runs holding the two models end
        while store.waits < 1 and time.monotonic() - started < 5:
            time.sleep(0.01)
        time.sleep(0.2)
        held.clear()

    threading.Thread(target=release).start()  # whatever the machine's load, the release comes after the wait began
    assert store.get("c", "cpu", "float32", max_wait=10).spec == "c"
    assert 0.1 < time.monotonic() - started < 5 and store.waits == 1 and store.live_bytes() <= 25
