"""The server's hand-over of engine outputs onto its event loop (serving/loop_mailbox.py)."""
from __future__ import annotations

import asyncio
import threading

from serving.loop_mailbox import LoopMailbox


def test_a_burst_from_threads_arrives_whole_in_order_with_few_wakeups():
    """Four threads post 500 items each into their own queues: every item arrives once, in
    each thread's order, and the loop is woken far fewer times than items were posted."""
    async def run():
        loop = asyncio.get_running_loop()
        wakeups = []
        schedule = loop.call_soon_threadsafe

        def counted(*a):
            wakeups.append(1)
            return schedule(*a)
        loop.call_soon_threadsafe = counted
        mailbox = LoopMailbox(loop)
        queues = [asyncio.Queue() for _ in range(4)]
        start = threading.Barrier(4)

        def producer(q):
            start.wait()
            for i in range(500):
                mailbox.post(q, i)
        threads = [threading.Thread(target=producer, args=(q,)) for q in queues]
        for t in threads:
            t.start()
        got = [[await asyncio.wait_for(q.get(), 10) for _ in range(500)] for q in queues]
        for t in threads:
            t.join()
        await asyncio.sleep(0)
        assert got == [list(range(500))] * 4
        assert all(q.empty() for q in queues)
        return len(wakeups)

    wakeups = asyncio.run(run())
    assert 1 <= wakeups < 2000 / 4, wakeups


def test_posting_after_the_loop_closed_is_dropped_quietly():
    loop = asyncio.new_event_loop()
    mailbox = LoopMailbox(loop)
    queue = asyncio.Queue()
    loop.close()
    for i in range(100):   # the server is gone: nothing raises into the engine's thread,
        mailbox.post(queue, i)   # and nothing is held for a drain that cannot come
    assert queue.empty() and not mailbox._items
