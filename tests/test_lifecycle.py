"""Request lifecycle regressions: each case is a repro from a review of main (149fe74), which
failed there (../shared/repros/, named beside each test), and the expected behaviour.
t7_mp_orphans is tests/test_hosts_contract.py::test_mp_instance_exits_with_the_engine_process;
t9_penalty_mix is tests/test_sampling_options.py::test_a_penalised_row_among_plain_rows_runs_in_
the_batched_step.

One place decides a request is finished (the instance producing its tokens, stop strings
included); the engine's ids are its own (no caller id can collide with a sequence's); a
streamed delta never carries text the final output drops; a back-pressured loop waits instead
of spinning; a failed request gives back its routing weight; add_request racing shutdown is
refused or served, never lost; min_tokens bans every stop id, as vLLM does.
"""
from __future__ import annotations

import threading
import time

import pytest

from dsjax import SamplingParams
from dsjax.engine.core import EngineError
from tests._engine_helpers import get_engine, shutdown_all, wait_idle, wait_for
from tests._server_helpers import tiny_engine


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


def first_token_text(engine, prompt) -> str:
    out = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1)).result(60)
    return engine.tokenizer.decode(out.token_ids)


def test_a_sibling_ended_on_its_first_token_never_decodes(  # t1_ghost_sibling, t1b_ghost_timeline, t12_ghost_id_reuse
        ):
    """n=2, greedy: both siblings' first token completes the stop string at the prefill
    instance. Neither is pulled by the decode instance, the request ends at once, and its id
    can be reused at once without touching anything of the first."""
    engine = get_engine()
    prompt = [2, 100, 200, 300]
    stop = first_token_text(engine, prompt)
    params = SamplingParams(n=2, temperature=0, max_tokens=50, stop=[stop], ignore_eos=True)
    out = engine.add_request(prompt, params, request_id="x").result(timeout=60)
    assert [o.finish_reason for o in out.outputs] == ["stop", "stop"]
    assert [o.text for o in out.outputs] == ["", ""]
    again = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=5,
                                                      ignore_eos=True), request_id="x")
    assert len(again.result(timeout=60).token_ids) == 5
    wait_idle(engine)
    decode = next(s for s in engine.stats() if s["instance"] == "decode0")
    assert decode["tokens"] == 4, "decode0 decoded tokens of a finished sibling"


def test_caller_ids_never_collide_with_sequence_ids():   # t13_hash_ids
    engine = get_engine()
    a = engine.add_request([2, 7, 8, 9], SamplingParams(n=2, temperature=1.0, seed=1,
                                                        max_tokens=6, ignore_eos=True),
                           request_id="a")
    b = engine.add_request([2, 7, 8, 9], SamplingParams(temperature=0, max_tokens=6,
                                                        ignore_eos=True), request_id="a#1")
    assert len(a.result(timeout=60).outputs) == 2
    assert len(b.result(timeout=60).token_ids) == 6
    wait_idle(engine)


def test_streamed_text_never_carries_the_start_of_a_stop_string():   # t2_stop_stream
    """A stop string spanning tokens: the deltas held back its first part, so their
    concatenation equals the final text."""
    engine = get_engine()
    prompt = [2, 300, 301, 302]
    full = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=12,
                                                     ignore_eos=True)).result(60).text
    stop = full[3:9]                                   # spans several tokens
    deltas, final = [], None
    for out in engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=12,
                                                         ignore_eos=True, stop=[stop])):
        deltas.append(out.new_text or "")
        final = out
        assert stop[:1] not in out.text[3:] or out.finished
    assert final.finish_reason == "stop" and final.text == full[:3]
    assert "".join(deltas) == final.text
    wait_idle(engine)


def test_min_tokens_bans_stop_token_ids_as_vllm_does():   # t15_min_tokens_stop_ids
    engine = get_engine()
    prompt = [2, 400, 401]
    first = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1)).result(60)
    stop_id = first.token_ids[0]                      # greedy would stop at once
    out = engine.add_request(prompt, SamplingParams(
        temperature=0, max_tokens=8, min_tokens=4, stop_token_ids=[stop_id])).result(60)
    assert stop_id not in out.token_ids[:4] and len(out.token_ids) >= 4
    wait_idle(engine)


def test_a_back_pressured_prefill_loop_waits_instead_of_spinning():   # t4_prefill_spin
    """The decode instance takes one request at a time and the prefill pool is full of
    prompts it holds for it: the prefill loop has work it cannot do, and must block."""
    engine = get_engine(decoding_max_batch_size=1, min_decode_rows=1,
                        max_num_blocks_per_req=128)
    long = engine.add_request([2, 5, 6, 7], SamplingParams(temperature=0, max_tokens=150,
                                                           ignore_eos=True))
    held = [engine.add_request([2] + list(range(1000 + 200 * i, 1119 + 200 * i)),
                               SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
            for i in range(6)]
    worker = engine.local_worker("prefill0")
    wait_for(lambda: next(s for s in engine.stats() if s["instance"] == "prefill0")["held"] > 0,
             what="a prompt held for decode")
    before, start = worker.loop_iterations, time.monotonic()
    time.sleep(1.0)
    rate = (worker.loop_iterations - before) / (time.monotonic() - start)
    assert rate < 200, f"the prefill loop spun {rate:.0f} times a second"
    for s in [long, *held]:
        s.result(timeout=300)
    wait_idle(engine)


def test_a_failed_request_gives_back_its_routing_weight():   # t5_outstanding
    engine = get_engine(num_prefill_instances=2)
    worker = engine.local_worker("prefill0")
    original = worker._sampling_row

    def broken(req, busy=()):
        if req.prompt_token_ids[1] == 666:
            raise RuntimeError("injected fault")
        return original(req, busy)
    worker._sampling_row = broken
    try:
        bad = [engine.add_request([2, 666] + [5] * 40, SamplingParams(max_tokens=2))
               for _ in range(4)]
        failed = 0
        for s in bad:   # those routed to prefill1 are served
            try:
                s.result(timeout=60)
            except EngineError as e:
                assert "injected fault" in str(e)
                failed += 1
        assert failed
    finally:
        worker._sampling_row = original
    wait_idle(engine)
    assert all(i.outstanding == 0 for i in engine.instances.values())


def test_add_request_racing_shutdown_is_refused_or_served():   # t14_shutdown_race
    engine = tiny_engine()
    outcomes, stop = [], threading.Event()

    def submit():
        while not stop.is_set():
            try:
                stream = engine.add_request([2, 5, 6], SamplingParams(max_tokens=2))
            except EngineError:
                outcomes.append("refused")
                return
            outcomes.append(stream)
    threads = [threading.Thread(target=submit) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    engine.shutdown()
    stop.set()
    for t in threads:
        t.join(10)
    streams = [s for s in outcomes if s != "refused"]
    for s in streams:   # every accepted stream ends: served, or aborted by the shutdown
        out = s.result(timeout=30)
        assert out.finished
    assert "refused" in outcomes


def test_result_beside_an_iterating_thread_sees_the_final_output():
    """CI once hung here: an iterating thread took the final output while `result()` waited on
    the same stream, which then waited forever. Every waiter must wake on the final output,
    and on a failure."""
    from types import SimpleNamespace

    from dsjax.engine.core import RequestStream
    for ending in ("finished", "failed"):
        stream = RequestStream("r")
        seen = []
        reader = threading.Thread(target=lambda: seen.extend(_drain(stream)), daemon=True)
        reader.start()
        time.sleep(0.05)   # the reader is now the one blocked on the stream
        for n in range(1, 4):
            stream.put(SimpleNamespace(token_ids=[1] * n, finished=False))
        if ending == "finished":
            stream.put(SimpleNamespace(token_ids=[1] * 4, finished=True))
            assert stream.result(timeout=5).token_ids == [1] * 4
        else:
            stream.put(RuntimeError("instance died"))
            with pytest.raises(EngineError, match="instance died"):
                stream.result(timeout=5)
        reader.join(5)
        assert not reader.is_alive()


def _drain(stream):
    try:
        yield from stream
    except EngineError as e:
        yield e


@pytest.mark.slow
def test_a_stalled_then_dead_prefill_process_fails_only_its_request():   # t6_mp_frozen_prefill, t6b_mp_cascade
    """mp, 2 prefill + 1 decode: the prefill process that exported 'victim' freezes before the
    pull completes, then dies. Decoding of another request never stalls; when the victim's pull
    times out it is recomputed on prefill1 (its tokens: an undisturbed run's); the decode
    instance and prefill1 serve on."""
    import os
    import signal

    from dsjax.engine.messages import KVReady
    engine = get_engine(distributed_executor_backend="mp", num_prefill_instances=2,
                        max_num_blocks_per_req=400, num_blocks=800, kv_pull_timeout_s=3.0)
    pids = {n: i.host.process.pid for n, i in engine.instances.items()}
    original, frozen = engine._on_peer, {}

    def freeze_the_source(peer):
        msg = peer.message
        if isinstance(msg, KVReady) and msg.request_id == engine.engine_id("victim"):
            source = next(n for n in engine._tracked[msg.request_id].location
                          if n.startswith("prefill"))
            os.kill(pids[source], signal.SIGSTOP)
            frozen["source"] = source
        return original(peer)
    engine._on_peer = freeze_the_source
    try:
        # Long enough to decode through both 1.5 s windows (opt-tiny decodes ~250 tokens/s).
        busy = engine.add_request([2, 5, 6, 7], SamplingParams(temperature=0, max_tokens=1500,
                                                               ignore_eos=True))
        counts = []
        threading.Thread(target=lambda: [counts.append(len(o.token_ids)) for o in busy],
                         daemon=True).start()
        wait_for(lambda: len(counts) > 5, what="decoding to start")
        start = counts[-1]
        time.sleep(1.5)
        unhindered = counts[-1] - start   # tokens in 1.5 s on this (shared, noisy) machine
        victim = engine.add_request([2, 8, 9, 10], SamplingParams(temperature=0, max_tokens=5,
                                                                  ignore_eos=True),
                                    request_id="victim")
        wait_for(lambda: frozen, what="the victim's export")
        start = counts[-1]
        time.sleep(1.5)
        during = counts[-1] - start
        assert during >= max(2, unhindered // 3), \
            f"decoding stalled behind a frozen prefill: {during} tokens vs {unhindered}"
        recovered = victim.result(timeout=60).token_ids
        os.kill(pids[frozen["source"]], signal.SIGKILL)
        assert len(busy.result(timeout=120).token_ids) == 1500
        wait_for(lambda: "failed" in engine.health()["instances"][frozen["source"]],
                 what="the killed prefill process to be noticed")
        assert engine.health()["instances"]["decode0"] == "ok"
        undisturbed = engine.add_request([2, 8, 9, 10], SamplingParams(
            temperature=0, max_tokens=5, ignore_eos=True)).result(timeout=60).token_ids
        assert recovered == undisturbed
    finally:
        engine._on_peer = original
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        shutdown_all()
