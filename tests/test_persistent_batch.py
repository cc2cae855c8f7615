"""The persistent decode batch: every step's carried columns equal the rows built from the
requests from scratch (the row path the runner also takes), through joins, finishes, forks,
copies on write, swaps and async steps; and the tokens still match transformers."""
from __future__ import annotations

import numpy as np
import pytest

from dsjax import SamplingParams
from dsjax.engine.persistent_batch import PersistentBatch
from dsjax.executor.batch import DecodeColumns, DecodeRow, SamplingRow
from tests._engine_helpers import add_after_tokens, hf_engine, shutdown_all, wait_idle
from tests._hf_helpers import hf_greedy
from tests.conftest import engine_prompts


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


class FakeRequest:
    """What the persistent batch reads of a request: its id and last token."""

    def __init__(self, rid: str, token: int):
        self.request_id, self.last_token_id = rid, token


def _row(rid_index: int, position: int, table, step: int, prev_row: int = -1,
         token: int = 0) -> DecodeRow:
    params = SamplingParams(temperature=0.5 + rid_index, top_k=rid_index + 1, min_tokens=3,
                            logprobs=rid_index % 2)
    return DecodeRow(token, position, tuple(table), SamplingRow(params, 100 + rid_index, step),
                     prev_row)


def _assert_same(got: DecodeColumns, want: DecodeColumns) -> None:
    for name, a, b in zip(DecodeColumns._fields[:-1], got[:-1], want[:-1]):
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name, a, b in zip(got.sampling._fields, got.sampling, want.sampling):
        np.testing.assert_array_equal(a, b, err_msg=f"sampling.{name}")


def test_rows_carried_forward_match_rows_built_afresh():
    """Hand-written steps: a batch of three, then one leaves, one joins, the order changes and
    one table gains a page; with the last step's tokens on the host, then on the device."""
    width = 8
    a, b, c, d = (FakeRequest(x, 10 + i) for i, x in enumerate("abcd"))
    tables = {"a": [1], "b": [2, 3], "c": [4], "d": [5, 6, 7]}
    state = {"a": (0, 2, 0), "b": (1, 5, 1), "c": (2, 3, 0), "d": (3, 9, 4)}  # index, pos, step
    built = []

    def rows_of(requests, prev=lambda r: -1):
        built.extend(r.request_id for r in requests)
        return [_row(state[r.request_id][0], state[r.request_id][1],
                     tables[r.request_id], state[r.request_id][2], prev(r),
                     r.last_token_id) for r in requests]

    pb = PersistentBatch(width)
    first = [a, b, c]
    _assert_same(pb.next_step(first, rows_of, tables, [], False),
                 DecodeColumns.of_rows(rows_of(first), width))
    assert built == ["a", "b", "c"] * 2
    # Next step: c finished, d joins in front, a's table gained a page; tokens read on host.
    for r in (a, b):
        i, pos, step = state[r.request_id]
        state[r.request_id] = (i, pos + 1, step + 1)
        r.last_token_id += 100
    tables["a"].append(8)
    second = [d, b, a]
    built.clear()
    got = pb.next_step(second, rows_of, tables, [2], False)
    assert built == ["d"], "only the new row is built from its request"
    _assert_same(got, DecodeColumns.of_rows(rows_of(second), width))
    # Next step with that step in flight: kept rows read their token from its samples.
    for r in (d, b, a):
        i, pos, step = state[r.request_id]
        state[r.request_id] = (i, pos + 1, step + 1)
    third = [a, d]
    built.clear()
    got = pb.next_step(third, rows_of, tables, [], True)
    assert built == []
    want = DecodeColumns.of_rows(rows_of(third, prev=lambda r: second.index(r)), width)
    want.tokens[:] = got.tokens   # placeholders where the device supplies the token
    _assert_same(got, want)
    np.testing.assert_array_equal(got.prev_rows, [2, 0])
    pb.reset()
    built.clear()
    pb.next_step(third, rows_of, tables, [], False)
    assert built == ["a", "d"], "after a reset every row is built again"


def _check_every_step(engine) -> list:
    """Wrap each decode-capable instance's persistent batch so that every step's columns are
    compared with the rows the worker builds from scratch for the same requests."""
    checked, mismatches = [], []
    for name in engine.instances:
        worker = engine.local_worker(name)
        if not hasattr(worker, "persistent"):
            continue
        pb = worker.persistent
        carried = pb.next_step

        def checking(batch, build_rows, tables, rewritten, tokens_on_device,
                     _worker=worker, _pb=pb, _carried=carried):
            # The step whose samples rows read is the one in flight (the worker's, not the
            # carried batch's idea of it).
            last = ({id(r): i for i, r in enumerate(_worker._inflight.requests)}
                    if tokens_on_device else {})
            # Any exception would only send the worker down its row path, hiding the fault:
            # every one is recorded.
            try:
                got = _carried(batch, build_rows, tables, rewritten, tokens_on_device)
            except Exception as e:
                mismatches.append(e)
                raise
            try:
                want = DecodeColumns.of_rows([_worker._decode_row(r, last.get(id(r), -1))
                                              for r in batch], _pb.width)
                on_device = want.prev_rows >= 0
                want.tokens[on_device] = got.tokens[on_device]
                _assert_same(got, want)
                checked.append(len(batch))
            except Exception as e:  # noqa: BLE001
                mismatches.append(e)
            return got
        pb.next_step = checking
    return checked, mismatches


@pytest.mark.parametrize("mode,extra", [
    # Several pulls in flight at once (the default share admits about one into 24 blocks):
    # with the shortest prompts first, batches of 7-8 rows form before the swaps begin.
    ("disaggregated", dict(async_scheduling=True, decoding_waiting_share=0.5)),
    ("disaggregated", dict(async_scheduling=False, decoding_waiting_share=0.5)),
    ("colocated", dict(async_scheduling=True)),
])
def test_every_carried_step_matches_its_rows_built_afresh(mode, extra, hf_opt):
    """Few blocks (swaps), prompts of different lengths and output lengths (rows join and
    leave), n=2 (forked sequences copy their shared block on write), penalties and min_tokens
    (sampling slots), logprobs; greedy requests still match transformers."""
    engine = hf_engine(hf_opt[1], mode=mode, num_blocks=24, **extra)
    checked, mismatches = _check_every_step(engine)
    prompts = engine_prompts()
    lengths = [40, 30, 36, 24, 38, 18][:len(prompts)]
    greedy = [(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
              for p, n in zip(prompts, lengths)]
    varied = [(prompts[0], SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=14,
                                          ignore_eos=True)),
              (prompts[1], SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=11,
                                          ignore_eos=True, logprobs=2)),
              (prompts[3], SamplingParams(temperature=0.7, seed=9, presence_penalty=0.5,
                                          min_tokens=5, max_tokens=9)),
              (prompts[2], SamplingParams(temperature=1.0, top_p=0.8, seed=3, max_tokens=20,
                                          ignore_eos=True))]
    # Shortest prompts first: the first arrivals then fit side by side, so batches of more than
    # 4 rows form before the long prompts bring the memory pressure (and the swaps).
    requests = greedy + varied
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    streams = {i: engine.add_request(*requests[i]) for i in order}
    outs = [streams[i].result(timeout=300) for i in range(len(requests))]
    wait_idle(engine)
    for p, n, out in zip(prompts, lengths, outs):
        assert out.token_ids == hf_greedy(hf_opt[0], p, n)
    pair, penalised = outs[len(greedy)], outs[len(greedy) + 1]
    assert [len(o.token_ids) for o in pair.outputs] == [14, 14]
    assert penalised.token_ids == hf_greedy(hf_opt[0], prompts[1], 11, repetition_penalty=1.3)
    assert not mismatches, mismatches[0]
    assert len(checked) > 20 and max(checked) > 4, checked
    preemptions = sum(s.get("num_preemptions", 0) for s in engine.stats())
    assert preemptions > 0, "the test did not put the engine under memory pressure"


def test_a_slot_taken_by_a_colocated_prefill_is_not_kept_by_a_carried_row(hf_opt):
    """Four penalised sequences decode (slots 0-3 of 64); a prompt with n=61 and penalties is
    prefilled beside them and needs 61 slots, so it takes the least recently used running
    one's. That sequence's next row must look its slot up again (and be refilled from its
    tokens), not keep sampling with the newcomer's state: its tokens stay transformers'."""
    engine = hf_engine(hf_opt[1], mode="colocated", decoding_max_batch_size=64,
                       context_max_batch_size=64, num_blocks=2048, max_num_blocks_per_req=32)
    prompts = engine_prompts()[:4]
    penalised = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                               repetition_penalty=1.8)
    first = engine.add_request(prompts[0], penalised)
    rest = [engine.add_request(p, penalised) for p in prompts[1:]]
    wide = add_after_tokens(first, 4, lambda: engine.add_request(
        prompts[1], SamplingParams(n=61, temperature=1.0, seed=5, max_tokens=6,
                                   ignore_eos=True, presence_penalty=1.0)))
    outs = [first.final] + [s.result(timeout=300) for s in rest]
    assert len(wide.result(timeout=300).outputs) == 61
    wait_idle(engine)
    assert sum(w.slots.evictions for w in map(engine.local_worker, engine.instances)) > 0, \
        "no running sequence lost its slot: the test did not reach the case"
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf_opt[0], p, 24, repetition_penalty=1.8)
