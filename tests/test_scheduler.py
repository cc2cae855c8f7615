"""Schedulers and block bookkeeping: pure Python, no JAX."""
import pytest

from dsjax.engine.block_manager import BlockAllocator, BlockManager, OutOfBlocks
from dsjax.engine.scheduler import BatchLimits, ChunkedScheduler, DecodeScheduler, PrefillScheduler


class FakeRequest:
    can_step = True   # no step of it is in flight
    num_samples = 1

    def __init__(self, rid, prompt_len, generated=0):
        self.request_id = rid
        self.prompt_len = prompt_len
        self.output_token_ids = [0] * generated
        self.num_computed = 0

    @property
    def num_tokens(self):
        return self.prompt_len + len(self.output_token_ids)

    def __repr__(self):
        return self.request_id


def test_allocator_reuses_and_rejects_double_free():
    a = BlockAllocator(4)
    blocks = a.allocate(3)
    assert len(set(blocks)) == 3 and a.num_free == 1
    with pytest.raises(OutOfBlocks):
        a.allocate(2)
    a.free(blocks[:1])
    with pytest.raises(ValueError, match="freed twice"):
        a.free(blocks[:1])
    assert a.num_used == 2


def test_block_manager_grow_is_all_or_nothing():
    bm = BlockManager(3, block_size=4)
    bm.allocate("a", 8)                 # 2 blocks
    assert bm.grow("a", 9) and len(bm.tables["a"]) == 3
    assert not bm.grow("a", 13)         # would need a 4th block: nothing allocated
    assert len(bm.tables["a"]) == 3 and bm.num_free == 0
    assert bm.free("a") and bm.num_free == 3


def test_prefill_batch_limits_and_fcfs():
    bm = BlockManager(100, block_size=4)
    s = PrefillScheduler(BatchLimits(max_batch_size=2, max_tokens_per_batch=20), bm)
    reqs = [FakeRequest(f"r{i}", n) for i, n in enumerate([8, 8, 8, 30])]
    for r in reqs:
        s.add(r)
    assert s.schedule() == reqs[:2]            # batch size limit
    assert s.schedule() == [reqs[2]]           # 8 + 30 > 20 tokens: r3 waits its turn
    assert s.schedule() == [reqs[3]]           # alone it may exceed... only when first
    assert bm.num_used == 2 + 2 + 2 + 8


def test_prefill_back_pressure_from_unpulled_requests():
    bm = BlockManager(4, block_size=4)
    s = PrefillScheduler(BatchLimits(8, 100), bm)
    a, b = FakeRequest("a", 12), FakeRequest("b", 8)
    s.add(a)
    s.add(b)
    assert s.schedule() == [a]                 # b's 2 blocks do not fit beside a's 3
    assert s.schedule() == []                  # a still holds its blocks (not pulled yet)
    bm.free("a")                               # decode pulled a
    assert s.schedule() == [b]


def test_decode_admits_fcfs_and_grows_blocks():
    bm = BlockManager(10, block_size=4)
    s = DecodeScheduler(BatchLimits(max_batch_size=2, max_tokens_per_batch=1000), bm)
    reqs = [FakeRequest(f"r{i}", 4, generated=1) for i in range(3)]
    for r in reqs:
        bm.allocate(r.request_id, r.prompt_len)
        s.add_waiting(r)
    step = s.schedule()
    assert step.batch == reqs[:2] and not step.swap_out
    # position 4 (the 5th token) needs a second block for each running request
    assert [len(bm.tables[r.request_id]) for r in reqs] == [2, 2, 1]


def test_decode_swaps_newest_and_restores_oldest_first():
    bm = BlockManager(4, block_size=4, num_host_blocks=8)
    s = DecodeScheduler(BatchLimits(8, 1000), bm)
    reqs = [FakeRequest(f"r{i}", 4, generated=0) for i in range(4)]
    for r in reqs:
        bm.allocate(r.request_id, 4)
        s.add_waiting(r)
    step = s.schedule()                        # 4 running, every block used
    assert step.batch == reqs and not step.swap_out
    for r in reqs:
        r.output_token_ids.append(1)           # each now needs a 2nd block
    step = s.schedule()
    assert step.swap_out == [reqs[3], reqs[2]]  # newest leave first
    assert step.batch == reqs[:2]
    assert list(s.swapped) == [reqs[2], reqs[3]]  # oldest comes back first
    assert not s.can_pull(4)                   # no new work while requests are swapped
    s.finish(reqs[0])
    step = s.schedule()
    assert step.swap_in == [reqs[2]] and step.batch == [reqs[1], reqs[2]]
    assert "r3" in bm.host_tables and "r3" not in bm.tables


def test_decode_pull_respects_waiting_share_and_reserve():
    bm = BlockManager(40, block_size=4)
    s = DecodeScheduler(BatchLimits(1, 1000), bm)
    assert s.can_pull(8)
    first = FakeRequest("a", 8)
    bm.allocate("a", 8)
    s.add_waiting(first)
    # waiting queue holds 2 blocks = 5% of 40: pull no more until it drains
    assert not s.can_pull(8)
    s.schedule()                               # a is admitted
    assert s.can_pull(8)


def test_no_room_anywhere_drops_only_the_newest_request_with_a_clear_reason():
    bm = BlockManager(2, block_size=4, num_host_blocks=0)
    s = DecodeScheduler(BatchLimits(8, 1000), bm)
    a, b = FakeRequest("a", 4, 1), FakeRequest("b", 4, 1)
    for r in (a, b):
        bm.allocate(r.request_id, 4)
        s.add_waiting(r)
    step = s.schedule()
    assert [r for r, _ in step.dropped] == [b] and "swap" in step.dropped[0][1]
    assert step.batch == [a] and not bm.holds("b") and len(bm.tables["a"]) == 2


def test_pulls_in_flight_count_against_the_waiting_share():
    """A burst of offers: each pull is judged with the pulls already started, so one round
    cannot take every waiting request (it took all of them before)."""
    bm = BlockManager(40, block_size=4)
    s = DecodeScheduler(BatchLimits(8, 1000), bm)
    assert s.can_pull(8, in_flight_blocks=0)
    assert not s.can_pull(8, in_flight_blocks=2)     # 2 blocks = 5% of 40 already coming


def test_swapped_request_that_cannot_return_does_not_block_waiting_ones():
    """decode batch size 1: the running request is swapped out for want of a block that a
    pulled, waiting request holds. The waiting one must run (it used to wait forever)."""
    bm = BlockManager(3, block_size=4, num_host_blocks=8)
    s = DecodeScheduler(BatchLimits(max_batch_size=1, max_tokens_per_batch=1000), bm)
    a = FakeRequest("a", 7, generated=1)     # 8 tokens: 2 blocks
    bm.allocate("a", 8)
    s.add_waiting(a)
    assert s.schedule().batch == [a]
    b = FakeRequest("b", 4, generated=1)
    bm.allocate("b", 4)                      # pulled while a ran: the last free block
    s.add_waiting(b)
    a.output_token_ids.append(0)             # a needs a third block: none is free
    step = s.schedule()
    assert step.swap_out == [a] and step.batch == []
    assert s.schedule().batch == [b]         # a cannot return (b holds a block): b runs
    b.output_token_ids = [0] * 4             # b finishes after growing into a's old block
    s.remove(b)
    bm.free("b")
    step = s.schedule()
    assert step.swap_in == [a] and step.batch == [a]


def test_chunked_budget_decodes_first_then_chunks():
    bm = BlockManager(50, block_size=4)
    s = ChunkedScheduler(BatchLimits(max_batch_size=8, max_tokens_per_batch=10), bm)
    running = FakeRequest("d", 4, generated=1)
    bm.allocate("d", 4)
    s.decode.add_waiting(running)
    long = FakeRequest("p", 20)
    s.add(long)
    step = s.schedule()
    assert step.decode.batch == [running]
    assert step.chunks == [(long, 0, 9)]       # 10 - 1 decode token
    assert not s.chunk_done(long, 9)
    step = s.schedule()
    assert step.chunks == [(long, 9, 9)]
    assert not s.chunk_done(long, 9)
    step = s.schedule()
    assert step.chunks == [(long, 18, 2)]
    assert s.chunk_done(long, 2) and long in s.decode.running


def test_chunked_partial_prompts_yield_pages_to_swapped_requests():
    bm = BlockManager(4, block_size=4, num_host_blocks=8)
    s = ChunkedScheduler(BatchLimits(max_batch_size=8, max_tokens_per_batch=8), bm)
    swapped = FakeRequest("old", 4, generated=1)
    bm.allocate("old", 4)
    bm.swap_out("old")
    s.decode.swapped.append(swapped)
    partial = FakeRequest("p", 16)
    s.add(partial)
    bm.allocate("p", 12)                # 3 of 4 pages held by a half-computed prompt
    partial.num_computed = 12
    step = s.schedule()                 # without preemption nothing could ever run again
    assert step.decode.swap_in == [swapped] and step.decode.batch == [swapped]
    assert partial.num_computed == 0
    assert step.chunks == [(partial, 0, 7)]  # the prompt restarts from its first token


def test_chunked_swap_decision_is_carried_out_exactly_once():
    """Memory pressure in chunked mode: the decode scheduler decides once per step, so every
    swap-out it decides is in the step (a dropped decision made the engine raise KeyError)."""
    bm = BlockManager(8, block_size=4, num_host_blocks=16)
    s = ChunkedScheduler(BatchLimits(max_batch_size=8, max_tokens_per_batch=8), bm)
    a = FakeRequest("a", 4)
    s.add(a)
    step = s.schedule()
    assert step.chunks == [(a, 0, 4)] and s.chunk_done(a, 4)
    a.output_token_ids = [0, 0]               # two tokens generated, as in the bug report
    b = FakeRequest("b", 28)                  # with 4 output tokens b alone fills the 8 pages
    s.add(b)
    limit = {"a": 20, "b": 4}
    seen_out, seen_in, on_host = [], [], set()
    for _ in range(200):
        step = s.schedule()
        seen_out += step.decode.swap_out
        seen_in += step.decode.swap_in
        on_host |= {r.request_id for r in step.decode.swap_out}
        on_host -= {r.request_id for r in step.decode.swap_in}
        # Every request whose pages went to the host was in a returned step's swap_out, so
        # the instance moved its pages (a lost decision left them nowhere).
        assert set(bm.host_tables) == on_host
        for r, first, n in step.chunks:
            if s.chunk_done(r, n):
                r.output_token_ids.append(0)
        for r in step.decode.batch:
            r.output_token_ids.append(0)
            if len(r.output_token_ids) >= limit[r.request_id]:
                s.remove(r)
                bm.free(r.request_id)
        if not len(s):
            break
    assert not len(s) and bm.num_used == 0
    assert len(seen_out) == len(seen_in) > 0


def test_sampling_slots_are_reused_and_taken_from_idle_holders_only():
    from dsjax.engine.sampling_slots import SlotAssignments
    slots = SlotAssignments(2)
    a = slots.assign("a", busy=set())
    b = slots.assign("b", busy=set())
    assert {a, b} == {0, 1} and slots.lookup("a") == a
    # Full: the least recently used holder not running now gives its row up ("b": "a" was
    # just looked up); a running holder never does.
    c = slots.assign("c", busy={"a"})
    assert c == b and slots.lookup("b") is None and slots.lookup("a") == a
    with pytest.raises(RuntimeError, match="held by running"):
        slots.assign("d", busy={"a", "c"})
    slots.release("a")
    assert slots.assign("d", busy=set()) == a and len(slots) == 2
    with pytest.raises(ValueError, match="already holds"):
        slots.assign("d", busy=set())
