"""``Engine.abort``, the engine half of freeing a slot when a client goes away: a waiting
request leaves at once, a running one at the start of the next step (before new
requests are admitted), also when it is called from another thread mid-step."""

from __future__ import annotations

import threading

import pytest

from local_backend.engine import Engine, Request


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load("tiny", kernels="default", device="cpu", max_slots=2)


def long(prompt: str) -> Request:
    return Request(prompt=prompt, max_tokens=50, ignore_eos=True)


def test_abort_waiting_and_running_requests(engine):
    a, b, c = long("one"), long("two"), long("three")
    for request in (a, b, c):
        engine.add_request(request)
    engine.step()  # a and b run, c waits
    assert engine.backlog() == (2, 1, 49 + 49 + 50)
    assert engine.abort(c.request_id)  # waiting: gone at once
    assert engine.backlog()[:2] == (2, 0)
    assert engine.abort(a.request_id)  # running: gone at the next step
    assert engine.backlog()[:2] == (1, 0)  # no longer counted as work
    assert engine.cache.free_slots == 0
    d = long("four")
    engine.add_request(d)
    engine.step()  # a's slot is freed first, then d takes it
    assert engine.cache.free_slots == 0 and engine.backlog()[:2] == (2, 0)
    done = {}
    while engine.has_unfinished():
        done.update((r.request_id, r) for r in engine.step())
    assert set(done) == {b.request_id, d.request_id}
    assert all(len(r.token_ids) == 50 for r in done.values())
    assert engine.cache.free_slots == 2
    assert not engine.abort(b.request_id) and not engine.abort("no-such-id")


def test_abort_from_another_thread_during_steps(engine):
    requests = [long(f"story {i}") for i in range(6)]
    for request in requests:
        engine.add_request(request)
    stepping = threading.Event()
    finished: list[str] = []

    def run() -> None:
        for _ in range(200):  # bounded: 6 requests of 50 tokens in 2 slots need ~150
            if not engine.has_unfinished():
                return
            finished.extend(r.request_id for r in engine.step())
            stepping.set()

    thread = threading.Thread(target=run)
    thread.start()
    stepping.wait(30)
    for request in requests:  # some running, some waiting, mid-step or not
        engine.abort(request.request_id)
    thread.join(60)
    assert not thread.is_alive()
    assert not engine.has_unfinished() and engine.cache.free_slots == 2
    assert engine.backlog() == (0, 0, 0)
    assert len(finished) <= 2  # at most what finished while abort() ran
