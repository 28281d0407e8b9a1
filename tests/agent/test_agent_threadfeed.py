"""ThreadFeed: a thread produces ahead of the event loop, never more than ``depth`` items
unconsumed; what it raises reaches the consumer after its items; ``stop`` ends it early, waking a
producer blocked on a full feed or (``interrupt``) on anything else. On asyncio and trio."""

from __future__ import annotations

import threading

import pytest

from corrosion.runtime.threadfeed import Put, ThreadFeed

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


async def test_items_arrive_in_order_and_never_more_than_depth_ahead():
    depth, count = 3, 200
    produced: list[int] = []  # what put accepted, appended by the producing thread

    def produce(put: Put[int]) -> None:
        for i in range(count):
            assert put(i)
            produced.append(i)

    got = []
    async for item in ThreadFeed(produce, depth=depth):
        # the producer is at most depth items ahead of this one (plus the one it holds)
        assert len(produced) <= item + 1 + depth
        got.append(item)
    assert got == list(range(count))


async def test_an_error_reaches_the_consumer_after_the_items_before_it():
    def produce(put: Put[str]) -> None:
        put("a")
        put("b")
        raise ValueError("broken at c")

    got = []
    with pytest.raises(ValueError, match="broken at c"):
        async for item in ThreadFeed(produce, depth=1):
            got.append(item)
    assert got == ["a", "b"]


async def test_stop_wakes_a_producer_blocked_on_a_full_feed():
    refused = threading.Event()

    def produce(put: Put[int]) -> None:
        i = 0
        while put(i):
            i += 1
        refused.set()

    feed = ThreadFeed(produce, depth=2)
    assert await feed.__anext__() == 0
    await feed.stop()  # returns once produce has returned
    assert refused.is_set()
    with pytest.raises(StopAsyncIteration):
        await feed.__anext__()


async def test_stop_interrupts_a_producer_waiting_on_something_else():
    started, interrupted = threading.Event(), threading.Event()

    def produce(put: Put[int]) -> None:
        put(1)
        started.set()
        assert interrupted.wait(60), "never interrupted"
        raise RuntimeError("interrupted")  # what an interrupted statement raises: not seen

    feed = ThreadFeed(produce, depth=2)
    assert await feed.__anext__() == 1
    await feed.stop(interrupted.set)
    assert started.is_set() and interrupted.is_set()


async def test_stop_after_the_end_does_not_interrupt():
    def produce(put: Put[int]) -> None:
        put(1)

    feed = ThreadFeed(produce, depth=1)
    assert [item async for item in feed] == [1]
    calls: list[str] = []
    await feed.stop(lambda: calls.append("interrupt"))
    assert calls == []
