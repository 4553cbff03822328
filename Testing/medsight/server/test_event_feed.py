"""`EventFeed`: the engine thread's stream events reach the event loop complete and in order, those produced before
the job's result is settled included, and a burst of events wakes the loop once, not once per event."""

from __future__ import annotations

import asyncio
import threading

from medsight.server.responses import EventFeed


async def _feed_from_a_thread(events: int) -> tuple[list, int, int]:
    feed = EventFeed()
    loop = feed.loop
    wakeups = 0
    schedule = loop.call_soon_threadsafe

    def counting(callback, *args):
        nonlocal wakeups
        wakeups += 1
        return schedule(callback, *args)

    loop.call_soon_threadsafe = counting  # an instance attribute: only this loop, only this test
    settled = asyncio.get_running_loop().create_future()
    seen_at_settle = []

    def worker() -> None:
        for i in range(events):
            feed.put("token", str(i))
        schedule(settle)

    def settle() -> None:  # what the stream does when the job's future is done
        feed.flush()
        seen_at_settle.append(feed.queue.qsize())
        settled.set_result(None)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()  # the loop is busy (here: joining; in the server: sending) while the worker produces a burst
    await settled
    del loop.call_soon_threadsafe
    received = [feed.queue.get_nowait() for _ in range(feed.queue.qsize())]
    return received, seen_at_settle[0], wakeups


def test_a_burst_arrives_whole_in_order_with_one_wakeup():
    events = 500
    received, queued_at_settle, wakeups = asyncio.run(_feed_from_a_thread(events))
    assert received == [("token", str(i)) for i in range(events)]
    assert queued_at_settle == events  # all of them were in the queue when the result was read
    assert wakeups == 1  # waking the loop per token made the loop and the model's thread fight over the GIL
