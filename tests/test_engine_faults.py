"""Faults stay contained, aborts free everything, and the repros of the engine-core issue run
to completion with transformers' tokens."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from dsjax import SamplingParams
from dsjax.engine.core import EngineError
from dsjax.executor.batch import DecodeColumns
from tests._engine_helpers import (add_after_tokens, generate, hf_engine, shutdown_all, wait_for,
                                   wait_idle)
from tests._hf_helpers import hf_greedy
from tests.conftest import ENGINE_MAX_NEW, engine_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=ENGINE_MAX_NEW, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


@pytest.fixture
def fresh(hf_opt):
    """Engines a test may break; shut down after it."""
    from dsjax.config import EngineConfig
    from dsjax.engine.core import Engine
    from tests._engine_helpers import TINY
    made = []

    def make(**overrides):
        engine = Engine(EngineConfig(**{**TINY, "model": str(hf_opt[1]), "load_format": "auto",
                                        **overrides}))
        made.append(engine)
        return engine
    yield make
    for engine in made:
        engine.shutdown()


# ---- the repros ------------------------------------------------------------------


def test_logprobs_zero_gives_the_chosen_tokens_logprob(hf_opt):
    """logprobs=0 used to crash the instance (and the server) in _emit_tokens."""
    engine = hf_engine(hf_opt[1])
    prompt = engine_prompts()[2]
    out = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=0,
                                                    ignore_eos=True)).result(timeout=120)
    ids = list(prompt)
    for token, table in zip(out.token_ids, out.logprobs):
        with torch.no_grad():
            ref = torch.log_softmax(hf_opt[0](torch.tensor([ids])).logits[0, -1], -1).numpy()
        assert list(table) == [token]
        assert table[token] == pytest.approx(float(ref[token]), abs=1e-4)
        ids.append(token)
    wait_idle(engine)


def test_chunked_mode_under_memory_pressure_completes(fresh, hf_opt):
    """The issue's repro: 8 blocks of 4 tokens, an 8-token budget; a 28-token prompt arrives
    after the first request's second token. It used to raise KeyError and stop the engine."""
    engine = fresh(mode="chunked", num_blocks=8, decoding_max_tokens_per_batch=8)
    first, second = [5, 17, 300, 45], list(range(40, 68))
    stream = engine.add_request(first, SamplingParams(temperature=0, max_tokens=20,
                                                      ignore_eos=True))
    late = add_after_tokens(stream, 2, lambda: engine.add_request(
        second, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    assert stream.final.token_ids == hf_greedy(hf_opt[0], first, 20)
    assert late.result(timeout=120).token_ids == hf_greedy(hf_opt[0], second, 4)
    assert sum(s["num_preemptions"] for s in engine.stats()) > 0
    wait_idle(engine)


def test_decode_batch_of_one_does_not_wait_forever(fresh, hf_opt):
    """A (running) is swapped out for a block that B (pulled, waiting) holds; with a batch of
    one, B used to wait behind A forever while A waited for B's block. A needs all 17 blocks
    by its end: B, asked for after A's second token, is pulled long before A (about 50 steps
    later) needs B's blocks, however fast the steps run."""
    engine = fresh(num_blocks=17, decoding_max_batch_size=1, min_decode_rows=1)
    a_prompt, b_prompt = [7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23]
    a = engine.add_request(a_prompt, SamplingParams(temperature=0, max_tokens=60,
                                                    ignore_eos=True))
    b = add_after_tokens(a, 2, lambda: engine.add_request(
        b_prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    assert a.final.token_ids == hf_greedy(hf_opt[0], a_prompt, 60)
    assert b.result(timeout=120).token_ids == hf_greedy(hf_opt[0], b_prompt, 4)
    assert engine.stats()[1]["num_preemptions"] > 0
    wait_idle(engine)


def test_a_stuck_prefill_step_does_not_stall_decoding(fresh, hf_opt):
    """A prefill step that takes long (a compile, a huge prompt) while another request waits
    to migrate: the decode instance used to block on the prefill runner's lock."""
    engine = fresh(context_max_batch_size=1)
    runner = engine.local_worker("prefill0").runner
    original, entered, release = runner.prefill, threading.Event(), threading.Event()

    def slow(rows):
        if any(r.token_ids[0] == 999 for r in rows):
            entered.set()
            release.wait(60)
        return original(rows)
    runner.prefill = slow
    try:
        decoding = engine.add_request(engine_prompts()[0], LONG)
        waiting = engine.add_request(engine_prompts()[1], LONG)
        stuck = engine.add_request([999, 5, 6], GREEDY)
        assert entered.wait(60)
        # The decode instance finishes its running request while the prefill step is stuck.
        assert decoding.result(timeout=60).token_ids == hf_greedy(hf_opt[0],
                                                                  engine_prompts()[0], 40)
        assert not release.is_set()
    finally:
        release.set()
    assert waiting.result(timeout=60).token_ids == hf_greedy(hf_opt[0], engine_prompts()[1], 40)
    assert stuck.result(timeout=60).token_ids == hf_greedy(hf_opt[0], [999, 5, 6],
                                                           ENGINE_MAX_NEW)
    wait_idle(engine)


# ---- faults stay contained -------------------------------------------------------------


POISON_SEED = 666


def test_a_request_that_breaks_its_step_fails_alone(fresh, hf_opt, hf_reference):
    engine = fresh()
    runner = engine.local_worker("decode0").runner
    original = runner.dispatch_decode
    carried = []

    def breaks_on_poison(rows, *args):
        # The persistent batch hands its columns; the row-by-row retry hands DecodeRows.
        carried.append(isinstance(rows, DecodeColumns))
        seeds = (rows.sampling.seeds.tolist() if carried[-1] else
                 [r.sampling.seed for r in rows])
        if POISON_SEED in seeds:
            raise FloatingPointError("injected fault in a decode step")
        return original(rows, *args)
    runner.dispatch_decode = breaks_on_poison
    streams = [engine.add_request(p, GREEDY) for p in engine_prompts()[:3]]
    poison = engine.add_request(engine_prompts()[3], SamplingParams(
        temperature=0, max_tokens=ENGINE_MAX_NEW, ignore_eos=True, seed=POISON_SEED))
    with pytest.raises(EngineError, match="injected fault"):
        poison.result(timeout=120)
    assert [s.result(timeout=120).token_ids for s in streams] == hf_reference[:3]
    wait_idle(engine)
    assert engine.health()["ok"]
    assert generate(engine, engine_prompts()[4:], GREEDY) == hf_reference[4:]
    assert any(carried) and not all(carried), "both the carried and the row-by-row path ran"


@pytest.mark.parametrize("where", ["plain row", "logprobs row", "router"])
def test_host_side_failure_of_one_request_fails_it_alone(where, fresh, hf_opt, hf_reference,
                                                         monkeypatch):
    """Recording one request's third token fails, in a step it shares with the others: on
    its decode instance (a plain row's stop check, which runs on a stop id or a row's last
    token, here its third; or a row's log-probabilities), or at the router delivering it.
    That request fails with the error; the others give transformers' tokens, and every block
    is freed."""
    from dsjax.engine.delivery import TrackedRequest
    from dsjax.engine.stopping import StopChecker
    engine = fresh()
    fault = KeyError("injected bookkeeping fault")
    if where == "plain row":
        params = dataclasses.replace(GREEDY, max_tokens=3)   # marks it: the others run on
        check_token = StopChecker.check_token

        def check(self, token_id, num_generated):
            if self._params.max_tokens == params.max_tokens and num_generated >= 3:
                raise fault
            return check_token(self, token_id, num_generated)
        monkeypatch.setattr(StopChecker, "check_token", check)
    elif where == "logprobs row":
        params = dataclasses.replace(GREEDY, logprobs=1)
        worker = engine.local_worker("decode0")
        check_rich = worker._check_rich

        def check(req, *sample):
            if req.request_id == engine.engine_id("poison") and len(req.output_token_ids) >= 3:
                raise fault
            return check_rich(req, *sample)
        worker._check_rich = check
    else:
        params = GREEDY
        add_token = TrackedRequest.add_token

        def add(self, index, *token):
            if self.request_id == "poison" and len(self.sequences[index].token_ids) >= 2:
                raise fault
            return add_token(self, index, *token)
        monkeypatch.setattr(TrackedRequest, "add_token", add)
    poison = engine.add_request(engine_prompts()[0], params, request_id="poison")
    others = [engine.add_request(p, GREEDY) for p in engine_prompts()[1:]]
    with pytest.raises(EngineError, match="bookkeeping"):
        poison.result(timeout=120)
    assert [s.result(timeout=120).token_ids for s in others] == hf_reference[1:]
    wait_idle(engine)


def test_kv_that_cannot_be_laid_out_fails_its_request_alone(fresh, hf_reference, monkeypatch):
    """Laying out one request's arrived KV for its decode instance fails (on its pull's
    waiter thread, off the step loop), every time. That is this instance's fault, not the
    pull's: the request fails once with the error, and is not recomputed (it would fail the
    same way again, forever). The others give transformers' tokens, and every block is
    freed."""
    from dsjax.engine import decode_worker
    engine = fresh()   # recompute on failure: the default
    worker = engine.local_worker("decode0")
    waiter = threading.local()   # which request this waiter thread is receiving
    await_arrival, reshard_pages = worker._await_arrival, decode_worker.reshard_pages
    faults = []

    def receive(request_id, *rest):
        waiter.poison = request_id == engine.engine_id("poison")
        return await_arrival(request_id, *rest)

    def reshard(shards, runner):
        if waiter.poison:
            faults.append(1)
            raise KeyError("injected layout fault")
        return reshard_pages(shards, runner)
    worker._await_arrival = receive
    monkeypatch.setattr(decode_worker, "reshard_pages", reshard)
    poison = engine.add_request(engine_prompts()[0], GREEDY, request_id="poison")
    others = [engine.add_request(p, GREEDY) for p in engine_prompts()[1:]]
    with pytest.raises(EngineError, match="injected layout fault"):
        poison.result(timeout=120)
    assert faults == [1]
    assert [s.result(timeout=120).token_ids for s in others] == hf_reference[1:]
    wait_idle(engine)


@pytest.mark.parametrize("recompute", [True, False])
def test_instance_fault_recomputes_its_requests_or_fails_them(recompute, fresh, hf_opt,
                                                              hf_reference):
    """decode0 loses its device state mid-step. Recompute on (the default): its requests go on
    on decode1 and give transformers' tokens, streamed without a gap or a duplicate. Off: they
    fail with that error. Either way /health names it and decode1 serves what comes next."""
    engine = fresh(num_decode_instances=2, recompute_on_failure=recompute)
    runner = engine.local_worker("decode0").runner

    def device_lost(rows, *args):
        runner.healthy = lambda: False
        raise RuntimeError("INTERNAL: injected device fault")
    runner.dispatch_decode = device_lost
    streams = [engine.add_request(p, GREEDY) for p in engine_prompts()[:4]]
    outcomes = []
    for s in streams:
        try:
            deltas = [o.new_token_ids for o in s]
            assert sum(deltas, []) == s.final.token_ids   # every token streamed once
            outcomes.append(s.final.token_ids)
        except EngineError as e:
            assert "decode0" in str(e) and "injected device fault" in str(e)
            outcomes.append(None)
    if recompute:
        assert outcomes == hf_reference[:4] and engine.recomputations > 0
    else:
        assert None in outcomes, "no request reached the faulty instance"
        assert all(o == ref for o, ref in zip(outcomes, hf_reference) if o is not None)
    health = engine.health()
    assert health["ok"] and health["instances"]["decode0"].startswith("failed")
    assert generate(engine, engine_prompts(), GREEDY) == hf_reference
    wait_idle(engine)


# ---- aborts at every stage ---------------------------------------------------------------


def _abort_and_check(engine, stream, rid):
    assert engine.abort(rid)
    final = stream.result(timeout=60)
    assert final.finished and final.finish_reason == "abort"


def test_abort_while_queued(fresh):
    engine = fresh(context_max_batch_size=1)
    runner = engine.local_worker("prefill0").runner
    original, entered, release = runner.prefill, threading.Event(), threading.Event()

    def held(rows):
        entered.set()
        release.wait(60)
        return original(rows)
    runner.prefill = held
    first = engine.add_request(engine_prompts()[0], GREEDY)
    assert entered.wait(60)
    queued = engine.add_request(engine_prompts()[3], LONG, request_id="queued")
    _abort_and_check(engine, queued, "queued")
    release.set()
    first.result(timeout=60)
    wait_idle(engine)


def test_abort_while_waiting_for_migration(fresh):
    engine = fresh()
    decode, prefill = engine.local_worker("decode0"), engine.local_worker("prefill0")
    decode._request_pulls = lambda: None     # the decode instance takes no offer for now
    stream = engine.add_request(engine_prompts()[3], LONG, request_id="waiting")
    wait_for(lambda: engine.engine_id("waiting") in prefill.held, what="prefill to finish")
    assert prefill.blocks.num_used > 0
    _abort_and_check(engine, stream, "waiting")
    wait_idle(engine)


def test_abort_while_migrating(fresh):
    """The decode side has allocated pages and asked for the KV; the export is slow."""
    engine = fresh()
    prefill, decode = engine.local_worker("prefill0"), engine.local_worker("decode0")
    original, entered, release = prefill.kv.export, threading.Event(), threading.Event()

    def slow_export(runner, blocks):
        entered.set()
        release.wait(60)
        return original(runner, blocks)
    prefill.kv.export = slow_export
    stream = engine.add_request(engine_prompts()[3], LONG, request_id="migrating")
    assert entered.wait(60)
    assert engine.engine_id("migrating") in decode.migrating
    _abort_and_check(engine, stream, "migrating")
    release.set()
    wait_idle(engine)


def test_abort_while_decoding(hf_opt):
    engine = hf_engine(hf_opt[1])
    stream = engine.add_request(engine_prompts()[3], LONG, request_id="decoding")
    seen = 0
    for out in stream:
        seen += len(out.new_token_ids)
        if seen >= 3:
            break
    _abort_and_check(engine, stream, "decoding")
    wait_idle(engine)


def test_abort_while_swapped(fresh, hf_opt):
    engine = fresh(num_blocks=20)
    decode = engine.local_worker("decode0")
    streams = [engine.add_request(p, LONG, request_id=f"s{i}")
               for i, p in enumerate(engine_prompts())]
    swapped = []

    def some_swapped():  # swapped out, its pages already on the host
        swapped[:] = [r.request_id for r in list(decode.scheduler.swapped)
                      if r.request_id in decode.swapped_pages]
        return bool(swapped)
    wait_for(some_swapped, what="a swap")
    victim = engine.caller_id(swapped[0])
    assert engine.abort(victim)
    for i, s in enumerate(streams):
        out = s.result(timeout=300)
        if f"s{i}" == victim:
            assert out.finish_reason == "abort"
        else:
            assert out.token_ids == hf_greedy(hf_opt[0], engine_prompts()[i], 40)
    wait_idle(engine)


@pytest.mark.parametrize("mode,extra", [("colocated", {}),
                                        ("chunked", dict(decoding_max_tokens_per_batch=16))])
def test_abort_in_baselines_frees_blocks(mode, extra, hf_opt):
    """Abort a decoding request and a prompt still being chunked / queued behind it."""
    engine = hf_engine(hf_opt[1], mode=mode, **extra)
    first = engine.add_request(engine_prompts()[3], LONG, request_id=f"{mode}-a")
    second = engine.add_request(engine_prompts()[1] * 3, LONG, request_id=f"{mode}-b")
    seen = 0
    for out in first:
        seen += len(out.new_token_ids)
        if seen >= 2:
            break
    assert engine.abort(f"{mode}-b") and engine.abort(f"{mode}-a")
    assert first.result(timeout=60).finish_reason == "abort"
    assert second.result(timeout=60).finish_reason == "abort"
    wait_idle(engine)


def test_abort_of_unknown_or_finished_request_is_false(hf_opt):
    engine = hf_engine(hf_opt[1])
    out = engine.add_request(engine_prompts()[0], GREEDY, request_id="done").result(timeout=60)
    assert out.finish_reason == "length"
    wait_idle(engine)
    assert not engine.abort("done") and not engine.abort("never-seen")
