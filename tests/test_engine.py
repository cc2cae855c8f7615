"""The disaggregated engine on 8 virtual CPU devices: placements, migration, swap, abort."""
from __future__ import annotations

import contextlib
import threading

import jax
import jax._src.array as jax_array
import numpy as np
import pytest

from dsjax import SamplingParams
from dsjax.engine.request import Status
from dsjax.executor.kv_migration import migrate
from tests._engine_helpers import get_engine, shutdown_all, wait_for, wait_idle

PROMPT_LENGTHS = [3, 17, 9, 30, 5, 12]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(4, 1000, n).tolist() for n in PROMPT_LENGTHS]


def generate(engine, prompt_list, params=GREEDY):
    streams = [engine.add_request(p, params) for p in prompt_list]
    outs = [s.result(timeout=300) for s in streams]
    wait_idle(engine)
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens generated one request at a time on a single colocated instance."""
    engine = get_engine(mode="colocated")
    return [generate(engine, [p])[0] for p in prompts()]


PLACEMENTS = {
    "tp2->1": dict(context_tensor_parallel_size=2),
    "tp1->2": dict(decoding_tensor_parallel_size=2),
    "tp2->2": dict(context_tensor_parallel_size=2, decoding_tensor_parallel_size=2),
    "pp2->1": dict(context_pipeline_parallel_size=2),
    "pp1->2": dict(decoding_pipeline_parallel_size=2),
    "2prefill+1decode": dict(num_prefill_instances=2),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_disaggregated_placements_match_reference(name, reference):
    engine = get_engine(mode="disaggregated", **PLACEMENTS[name])
    assert generate(engine, prompts()) == reference
    assert engine.migrations["count"] >= len(PROMPT_LENGTHS)


@pytest.mark.parametrize("mode", ["colocated", "chunked"])
def test_baselines_batched_match_reference(mode, reference):
    # chunked: a 16-token budget splits the longer prompts into several chunks
    extra = dict(decoding_max_tokens_per_batch=16) if mode == "chunked" else {}
    assert generate(get_engine(mode=mode, **extra), prompts()) == reference


def test_seeded_sampling_repeats_across_placements():
    params = SamplingParams(temperature=1.0, top_k=50, seed=123, max_tokens=8, ignore_eos=True)
    a = generate(get_engine(mode="disaggregated", decoding_tensor_parallel_size=2), prompts(),
                 params)
    b = generate(get_engine(mode="colocated"), prompts(), params)
    assert a == b


def test_lifetime_events_in_order():
    engine = get_engine(mode="disaggregated")
    out = engine.add_request(prompts()[1], GREEDY).result(timeout=120)
    kinds = [e["event_type"] for e in out.lifetime_events]
    assert kinds == ["issued", "context_begin", "context_end", "migration_begin",
                     "migration_end", "decoding_begin", "decoding_end"]
    times = [e["timestamp"] for e in out.lifetime_events]
    assert times == sorted(times)
    assert len(out.token_timestamps) == GREEDY.max_tokens
    assert out.token_timestamps[0] <= times[2] + 1e-3  # first token comes with the prefill
    wait_idle(engine)


LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_memory_pressure_swaps_and_completes_correctly():
    # 20 blocks of 4 tokens per instance cannot hold six requests of up to 70 tokens at once
    expected = [generate(get_engine(mode="colocated"), [p], LONG)[0] for p in prompts()]
    engine = get_engine(mode="disaggregated", num_blocks=20)
    assert generate(engine, prompts(), LONG) == expected
    assert engine.decode_instances[0].num_swap_outs > 0


def test_submission_is_thread_safe(reference):
    engine = get_engine(mode="disaggregated", decoding_tensor_parallel_size=2)
    results = {}

    def submit(i, p):
        results[i] = engine.add_request(p, GREEDY).result(timeout=300).token_ids

    threads = [threading.Thread(target=submit, args=(i, p)) for i, p in enumerate(prompts())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(threads))] == reference
    wait_idle(engine)


def test_streaming_delivers_every_token_once():
    engine = get_engine(mode="disaggregated")
    stream = engine.add_request(prompts()[0], GREEDY)
    seen = []
    for out in stream:
        seen.extend(out.new_token_ids)
    assert seen == stream.final.token_ids and len(seen) == GREEDY.max_tokens
    wait_idle(engine)


# ---- aborts at every stage ---------------------------------------------------------------


def _abort_and_check(engine, stream, rid):
    assert engine.abort(rid)
    final = stream.result(timeout=60)
    assert final.finished and final.finish_reason == "abort"
    wait_idle(engine)


@contextlib.contextmanager
def held(instance):
    """Keep an instance from stepping, to observe a request at the stage before it."""
    instance.paused.set()
    try:
        yield
    finally:
        instance.paused.clear()


def test_abort_while_queued():
    engine = get_engine(mode="disaggregated")
    with held(engine.prefill_instances[0]):
        stream = engine.add_request(prompts()[3], LONG, request_id="queued")
        assert engine.requests["queued"].status is Status.QUEUED
        _abort_and_check(engine, stream, "queued")


def test_abort_while_waiting_for_migration():
    engine = get_engine(mode="disaggregated")
    with held(engine.decode_instances[0]):
        stream = engine.add_request(prompts()[3], LONG, request_id="waiting")
        req = engine.requests["waiting"]
        wait_for(lambda: req.status is Status.WAITING_MIGRATION, what="prefill to finish")
        assert engine.prefill_instances[0].blocks.num_used > 0
        _abort_and_check(engine, stream, "waiting")


@pytest.mark.parametrize("stage", ["prefilling", "migrating"])
def test_abort_during_device_work(stage, monkeypatch):
    """Abort while the prefill step or the KV copy is running: the owner frees on return."""
    engine = get_engine(mode="disaggregated")
    entered, release = threading.Event(), threading.Event()
    if stage == "prefilling":
        runner = engine.prefill_instances[0].runner
        original = runner.prefill

        def held(*args, **kw):
            entered.set()
            release.wait(30)
            return original(*args, **kw)
        monkeypatch.setattr(runner, "prefill", held)
    else:
        import dsjax.engine.worker as instances

        def held(*args, **kw):
            entered.set()
            release.wait(30)
            return migrate(*args, **kw)
        monkeypatch.setattr(instances, "migrate", held)
    stream = engine.add_request(prompts()[3], LONG, request_id=stage)
    assert entered.wait(60)
    assert engine.abort(stage)
    release.set()
    assert stream.result(timeout=60).finish_reason == "abort"
    wait_idle(engine)


def test_abort_while_decoding():
    engine = get_engine(mode="disaggregated")
    stream = engine.add_request(prompts()[3], LONG, request_id="decoding")
    req = engine.requests["decoding"]
    wait_for(lambda: len(req.output_token_ids) >= 3, what="decoding to start")
    assert req.status is Status.DECODING
    _abort_and_check(engine, stream, "decoding")


def test_abort_while_swapped():
    engine = get_engine(mode="disaggregated", num_blocks=20)
    decode = engine.decode_instances[0]
    streams = [engine.add_request(p, LONG, request_id=f"s{i}") for i, p in enumerate(prompts())]
    swapped = []

    def some_swapped():  # swapped out, its pages already on the host
        with engine.lock:
            swapped[:] = [r.request_id for r in decode.scheduler.swapped
                          if r.request_id in decode.swap_space.pages]
        return bool(swapped)
    wait_for(some_swapped, what="a swap")
    victim = swapped[0]
    assert engine.abort(victim)
    for i, s in enumerate(streams):
        out = s.result(timeout=300)
        assert out.finish_reason == ("abort" if f"s{i}" == victim else "length")
    wait_idle(engine)


# ---- migration ---------------------------------------------------------------------------


def _fill_pages(runner, seed):
    for i, stage in enumerate(runner.stages):
        pool = stage.pool
        pool.k = jax.device_put(jax.random.normal(jax.random.key(seed + i), pool.k.shape),
                                pool.sharding)
        pool.v = jax.device_put(jax.random.normal(jax.random.key(seed + 50 + i), pool.v.shape),
                                pool.sharding)


def _pages(runner, blocks):
    k = np.concatenate([np.asarray(s.pool.k)[:, blocks] for s in runner.stages])
    v = np.concatenate([np.asarray(s.pool.v)[:, blocks] for s in runner.stages])
    return k, v


@pytest.fixture
def count_host_fetches(monkeypatch):
    """Counts reads of a jax.Array's host value: what a device_put between mismatched
    shardings does to move data through the host (on CPU transfer_guard cannot see it)."""
    calls = {"n": 0}
    original = jax_array.ArrayImpl._value

    def counting(self):
        calls["n"] += 1
        return original.fget(self)
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(counting))
    return calls


@pytest.mark.parametrize("name", ["tp2->1", "tp1->2", "tp2->2", "pp2->1", "pp1->2"])
def test_migration_is_bit_identical_and_device_to_device(name, count_host_fetches):
    engine = get_engine(mode="disaggregated", **PLACEMENTS[name])
    src, dst = engine.prefill_instances[0].runner, engine.decode_instances[0].runner
    _fill_pages(src, 1)
    src_blocks, dst_blocks = [5, 2, 9], [7, 0, 3]
    before = _pages(src, src_blocks)
    count_host_fetches["n"] = 0
    migrate(src, src_blocks, dst, dst_blocks)
    dst.block_until_ready()
    assert count_host_fetches["n"] == 0, "KV went through host memory"
    after = _pages(dst, dst_blocks)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_host_fetch_counter_sees_a_naive_reshard(count_host_fetches):
    """The guard above can fail: a plain device_put between TP 2 and TP 1 layouts of the
    gathered pages is caught by the counter."""
    engine = get_engine(mode="disaggregated", **PLACEMENTS["tp2->1"])
    src, dst = engine.prefill_instances[0].runner, engine.decode_instances[0].runner
    k, _ = src.gather_pages([1, 2])[0]
    count_host_fetches["n"] = 0
    jax.device_put(k, dst.stages[0].pool.sharding)
    assert count_host_fetches["n"] > 0


def test_pallas_kernels_under_tensor_parallelism_match_reference(reference):
    """The kernel backend (interpreted on CPU) runs per device on its heads via shard_map."""
    engine = get_engine(mode="disaggregated", attention_backend="pallas",
                        context_tensor_parallel_size=2, decoding_tensor_parallel_size=2)
    assert generate(engine, prompts()[:3]) == reference[:3]


def test_stop_string_cuts_text_and_frees_blocks():
    engine = get_engine(mode="disaggregated")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = engine.add_request("Paged attention", params).result(timeout=120)
    assert len(full.text) > 6
    stop = full.text[3:6]
    out = engine.add_request("Paged attention", SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])).result(timeout=120)
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop)]
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    assert len(out.token_ids) == len(out.token_timestamps) < len(full.token_ids)
    wait_idle(engine)


def test_pipeline_stages_hold_only_their_layers_on_their_devices():
    engine = get_engine(mode="disaggregated", **PLACEMENTS["pp1->2"])
    runner = engine.decode_instances[0].runner
    for stage in runner.stages:
        devices = set(stage.mesh.devices.flat)
        for leaf in jax.tree_util.tree_leaves(stage.params):
            assert set(leaf.sharding.device_set) == devices
        kernel = stage.params["layers"]["fc1"]["kernel"]
        start, end = stage.layer_range
        assert kernel.shape[0] == end - start
    assert "embed_positions" in runner.stages[0].params
    assert "embed_positions" not in runner.stages[-1].params


@pytest.mark.parametrize("mode,extra", [("colocated", {}),
                                        ("chunked", dict(decoding_max_tokens_per_batch=16))])
def test_abort_in_baselines_frees_blocks(mode, extra):
    """Abort a decoding request and a prompt still being chunked / queued behind it."""
    engine = get_engine(mode=mode, **extra)
    first = engine.add_request(prompts()[3], LONG, request_id=f"{mode}-a")
    second = engine.add_request(prompts()[1] * 3, LONG, request_id=f"{mode}-b")
    req = engine.requests[f"{mode}-a"]
    wait_for(lambda: len(req.output_token_ids) >= 2, what="decoding to start")
    assert engine.abort(f"{mode}-b") and engine.abort(f"{mode}-a")
    assert first.result(timeout=60).finish_reason == "abort"
    assert second.result(timeout=60).finish_reason == "abort"
    wait_idle(engine)
