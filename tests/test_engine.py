"""The engine on 8 virtual CPU devices against transformers: every placement, swap under memory
pressure in each mode, streaming, lifetime events, KV migration bit for bit."""
from __future__ import annotations

import dataclasses
import threading
import types

import jax
import jax._src.array as jax_array
import numpy as np
import pytest

from dsjax import SamplingParams
from dsjax.executor.batch import DecodeRow, PrefillRow, SamplingRow
from dsjax.executor.kv_migration import migrate
from tests._engine_helpers import (generate, get_engine, hf_engine, shutdown_all, wait_idle,
                                   watch_swaps)
from tests._hf_helpers import hf_greedy
from tests.conftest import ENGINE_MAX_NEW, engine_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=ENGINE_MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _engines():
    yield
    shutdown_all()


PLACEMENTS = {
    "tp1->1": dict(),
    "tp2->1": dict(context_tensor_parallel_size=2),
    "tp1->2": dict(decoding_tensor_parallel_size=2),
    "tp2->2": dict(context_tensor_parallel_size=2, decoding_tensor_parallel_size=2),
    # The CPU default: decode batches of 1, 2, 3 and 4 rows as the prompts arrive and finish.
    "tp1->2 1-row buckets": dict(decoding_tensor_parallel_size=2, min_decode_rows=1),
    "pp2->1": dict(context_pipeline_parallel_size=2),
    "pp1->2": dict(decoding_pipeline_parallel_size=2),
    "tp2pp2->tp2pp2": dict(context_tensor_parallel_size=2, context_pipeline_parallel_size=2,
                           decoding_tensor_parallel_size=2, decoding_pipeline_parallel_size=2),
    "2prefill+1decode": dict(num_prefill_instances=2),
    "1prefill+2decode": dict(num_decode_instances=2),
    "colocated": dict(mode="colocated"),
    "colocated-tp2pp2": dict(mode="colocated", context_tensor_parallel_size=2,
                             context_pipeline_parallel_size=2),
    "chunked-16": dict(mode="chunked", decoding_max_tokens_per_batch=16),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_placement_matches_transformers(name, hf_opt, hf_reference):
    engine = hf_engine(hf_opt[1], **PLACEMENTS[name])
    assert generate(engine, engine_prompts(), GREEDY) == hf_reference
    if PLACEMENTS[name].get("mode", "disaggregated") == "disaggregated":
        assert engine.migrations["count"] >= len(hf_reference)
    if PLACEMENTS[name].get("mode") != "chunked":   # chunked steps hold decode rows as chunks
        # Which small batches occur depends on timing; the warm-up test checks them exactly.
        assert min(decode_batch_buckets(engine)) >= PLACEMENTS[name].get("min_decode_rows", 8)


def decode_batch_buckets(engine) -> set[int]:
    """The padded row counts of the decode programs the engine's runners compiled (the first
    packed input, the token ids, is [rows])."""
    runners = [engine.local_worker(name).runner for name in engine.instances]
    # A single-stage instance runs decode and its sampler as one program ("decode+sample").
    layouts = [key[1] if kind == "forward" else key[0] for r in runners for s in r.stages
               for kind, *key in s.fns
               if (kind == "forward" and key[0] == "decode") or kind == "decode+sample"]
    return {layout[1][0][1][0] for layout in layouts}


def test_every_decode_batch_pads_to_a_bucket_warm_up_compiles():
    """Up to 8 rows a batch pads to the powers of two and 3 and 6 (a padded row costs a real
    one's attention on a CPU), past them to the next power of two; warm-up's batches reach
    every bucket a step's forward can pad to, a pipeline's micro-batches included."""
    from dsjax.executor.runner import ModelRunner, small_decode_buckets

    def runner(pp, smallest=1):   # what ModelRunner.__init__ sets for these
        return types.SimpleNamespace(spec=types.SimpleNamespace(pp=pp),
                                     min_decode_rows=smallest,
                                     small_decode_buckets=small_decode_buckets(pp))

    def buckets(r, largest):
        return ModelRunner.decode_buckets(r, largest)

    def micro_buckets(r, total):
        """The buckets of a batch's micro-batches, as the runner splits and pads it."""
        return {ModelRunner.decode_bucket(r, len(part))
                for part in ModelRunner._split(r, list(range(total)))}

    def gaps(r):
        warmed = set().union(*(micro_buckets(r, t) for t in buckets(r, 64)))
        return {n for n in range(1, 65) if not micro_buckets(r, n) <= warmed}

    assert buckets(runner(1), 64) == [1, 2, 3, 4, 6, 8, 16, 32, 64]
    assert [ModelRunner.decode_bucket(runner(1), n) for n in range(1, 10)] == \
        [1, 2, 3, 4, 6, 6, 8, 8, 16]
    assert buckets(runner(1, smallest=8), 64) == [8, 16, 32, 64]   # accelerators
    assert buckets(runner(2), 16) == [1, 2, 4, 8, 16]   # a pipeline: powers of two
    for smallest in (1, 2, 8):
        for largest in (1, 5, 8, 9, 100):
            warmed = buckets(runner(1, smallest), largest)
            for n in range(1, largest + 1):
                assert n <= ModelRunner.decode_bucket(runner(1, smallest), n) in warmed
    assert gaps(runner(1)) == gaps(runner(2)) == gaps(runner(3)) == set()
    # The small buckets under a pipeline would leave 11 rows (5 + 6) without a program.
    small_under_pp = runner(2)
    small_under_pp.small_decode_buckets = small_decode_buckets(1)
    assert 11 in gaps(small_under_pp)


@pytest.mark.parametrize("mode,extra", [
    ("disaggregated", dict(num_blocks=24)),
    ("colocated", dict(num_blocks=24)),
    ("chunked", dict(num_blocks=24, decoding_max_tokens_per_batch=16)),
])
def test_memory_pressure_swaps_and_matches_transformers(mode, extra, hf_opt):
    """24 blocks of 4 tokens cannot hold six requests of up to 70 tokens at once. A swapped
    request keeps on the host exactly the pages of its blocks (a gather's are padded to a
    power of two), so host memory is what swap_space counts."""
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [hf_greedy(hf_opt[0], p, 40) for p in engine_prompts()]
    engine = hf_engine(hf_opt[1], mode=mode, **extra)
    with watch_swaps(engine) as held:
        assert generate(engine, engine_prompts(), long) == expected
    preemptions = sum(s.get("num_preemptions", 0) for s in engine.stats())
    assert preemptions > 0, "the test did not put the engine under memory pressure"
    # A cut copy owns its memory (a view would keep the padded gather alive).
    assert held and all(pages == {blocks} and (owned or not blocks & (blocks - 1))
                        for pages, _, blocks, owned in held), held
    assert any(blocks & (blocks - 1) for _, _, blocks, _ in held), \
        f"no swapped request held a block count a gather pads: {held}"


def test_seeded_sampling_repeats_across_placements(hf_opt):
    params = SamplingParams(temperature=1.0, top_k=50, seed=123, max_tokens=8, ignore_eos=True)
    a = generate(hf_engine(hf_opt[1], **PLACEMENTS["tp1->2"]), engine_prompts(), params)
    b = generate(hf_engine(hf_opt[1], mode="colocated"), engine_prompts(), params)
    assert a == b and len({tuple(t) for t in a}) > 1


def test_lifetime_events_in_order(hf_opt):
    engine = hf_engine(hf_opt[1])
    out = engine.add_request(engine_prompts()[1], GREEDY).result(timeout=120)
    kinds = [e["event_type"] for e in out.lifetime_events]
    assert kinds == ["issued", "context_begin", "context_end", "migration_begin",
                     "migration_end", "decoding_begin", "decoding_end"]
    times = [e["timestamp"] for e in out.lifetime_events]
    assert times == sorted(times)
    assert len(out.token_timestamps) == GREEDY.max_tokens
    assert out.token_timestamps[0] <= times[2] + 1e-3  # first token comes with the prefill
    wait_idle(engine)


def test_submission_from_many_threads(hf_opt, hf_reference):
    engine = hf_engine(hf_opt[1], **PLACEMENTS["tp1->2"])
    results = {}

    def submit(i, p):
        results[i] = engine.add_request(p, GREEDY).result(timeout=300).token_ids

    threads = [threading.Thread(target=submit, args=(i, p))
               for i, p in enumerate(engine_prompts())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(threads))] == hf_reference
    wait_idle(engine)


def test_streaming_delivers_every_token_once(hf_opt, hf_reference):
    engine = hf_engine(hf_opt[1])
    stream = engine.add_request(engine_prompts()[0], GREEDY)
    seen = []
    for out in stream:
        seen.extend(out.new_token_ids)
    assert seen == stream.final.token_ids == hf_reference[0]
    wait_idle(engine)


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


def test_pallas_kernels_under_tensor_parallelism_match_transformers(hf_opt, hf_reference):
    """The kernel backend (interpreted on CPU) runs per device on its heads via shard_map."""
    engine = hf_engine(hf_opt[1], attention_backend="pallas", **PLACEMENTS["tp2->2"])
    assert generate(engine, engine_prompts()[:3], GREEDY) == hf_reference[:3]


@pytest.mark.parametrize("name", ["tp1->1", "pp1->2"])
def test_rows_reading_the_last_steps_samples_on_the_device_get_them_in_any_order(name, hf_opt):
    """Three prompts prefilled and decoded a step on the decode runner, then an overlapped
    step whose rows take that step's uncollected samples in another order (prev_rows 2 and 0)
    beside a row whose token the host gives: every row continues its own sequence as
    transformers does. One stage reads the samples in its decode program; a pipeline selects
    them on its last stage first."""
    engine = hf_engine(hf_opt[1], **PLACEMENTS[name])
    wait_idle(engine)
    runner = engine.local_worker("decode0").runner
    greedy = SamplingRow(SamplingParams(temperature=0.0), 0, 0)
    # Prompts whose second greedy tokens differ (else the rows' order could not show).
    rng, prompts, want = np.random.default_rng(11), [], []
    while len(prompts) < 3:
        prompt = rng.integers(4, 1000, 5).tolist()
        tokens = hf_greedy(hf_opt[0], prompt, 3)
        if tokens[1] not in {w[1] for w in want}:
            prompts.append(prompt)
            want.append(tokens)
    tables = [(0, 1), (2, 3), (4, 5)]
    first = runner.prefill([PrefillRow(tuple(p), t, (greedy,)) for p, t in zip(prompts, tables)])
    assert first.tokens.tolist() == [w[0] for w in want]
    step = runner.dispatch_decode([DecodeRow(int(token), 5, table, greedy)
                                   for token, table in zip(first.tokens, tables)])
    overlapped = runner.dispatch_decode(
        [DecodeRow(-1, 6, tables[2], greedy, 2), DecodeRow(-1, 6, tables[0], greedy, 0),
         DecodeRow(want[1][1], 6, tables[1], greedy)], step)
    assert runner.collect(step).tokens.tolist() == [w[1] for w in want]
    assert runner.collect(overlapped).tokens.tolist() == [want[2][2], want[0][2], want[1][2]]


# ---- migration ---------------------------------------------------------------------------


def _runners(engine):
    return engine.local_worker("prefill0").runner, engine.local_worker("decode0").runner


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
    shardings does to move data through the host (on CPU transfer_guard cannot see it). This
    is all a CPU run can prove of "device to device"; docs/architecture.md says so."""
    calls = {"n": 0}
    original = jax_array.ArrayImpl._value

    def counting(self):
        calls["n"] += 1
        return original.fget(self)
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(counting))
    return calls


MIGRATION_PLACEMENTS = ["tp2->1", "tp1->2", "tp2->2", "pp2->1", "pp1->2", "tp2pp2->tp2pp2"]


@pytest.mark.parametrize("name", MIGRATION_PLACEMENTS)
def test_migration_is_bit_identical_without_host_fetch(name, count_host_fetches):
    engine = get_engine(mode="disaggregated", **PLACEMENTS[name])
    src, dst = _runners(engine)
    _fill_pages(src, 1)
    src_blocks, dst_blocks = [5, 2, 9], [7, 0, 3]
    before = _pages(src, src_blocks)
    count_host_fetches["n"] = 0
    migrate(src, src_blocks, dst, dst_blocks)
    jax.block_until_ready([(s.pool.k, s.pool.v) for s in dst.stages])
    assert count_host_fetches["n"] == 0, "KV went through host memory"
    after = _pages(dst, dst_blocks)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize("name", MIGRATION_PLACEMENTS)
def test_warm_up_cuts_zero_shards_as_the_source_exports_its_pages(name):
    """What warm-up reshards to compile a pull (kv_migration.layout_shards) has the boxes,
    shapes, dtypes and devices of the shards the source really exports."""
    from dsjax.executor.kv_migration import SourceLayout, export_shards, layout_shards
    src, dst = _runners(get_engine(mode="disaggregated", **PLACEMENTS[name]))

    def cut(shards):
        return [(s.box, s.k.shape, s.v.shape, s.k.dtype, s.k.devices()) for s in shards]
    layout = SourceLayout(src.spec.tp, src.spec.pp, src.spec.devices)
    assert cut(layout_shards(dst, layout, 4)) == cut(export_shards(src, [5, 2, 9]))


def test_transfer_server_link_is_bit_identical():
    """The inter-process transport, exercised in one process: the destination pulls the
    source's shards from its transfer server (TP 2 -> TP 1 through PP 2). They arrive on the
    destination's first device, where the reshard's slices and joins were compiled by the
    warm-up a decode process runs."""
    from dsjax.config import WARMUP_ALL
    from dsjax.executor.compile_watch import CompileWatch
    from dsjax.executor.kv_migration import SourceLayout
    from dsjax.executor.remote_kv import TransferServerKVLink
    from dsjax.executor.warmup import warm_up_fixed_programs, warm_up_pulls
    engine = get_engine(mode="disaggregated", context_tensor_parallel_size=2,
                        decoding_pipeline_parallel_size=2)
    src, dst = _runners(engine)
    _fill_pages(src, 3)
    link = TransferServerKVLink("127.0.0.1")
    assert link.address.startswith("127.0.0.1:")
    payload = link.export(src, [4, 1])
    assert payload.address == link.address and len(payload.shards) == 2
    # A reshard per page bucket, 1 to 64 pages (max_num_blocks_per_req)
    warm_up_fixed_programs(dst, "decode")                 # what a decode process warms
    # A reshard per page bucket, 1 to 64 pages (prompts of the whole context, 64 pages of 4)
    whole = dataclasses.replace(engine.config, warmup_max_prompt_len=WARMUP_ALL)
    assert warm_up_pulls(dst, [SourceLayout(2, 1)], whole) == 7
    with CompileWatch() as watch:
        link.import_pages(dst, payload, [6, 8])
    assert watch.count == 0, f"the pull compiled: {watch.describe()}"
    before, after = _pages(src, [4, 1]), _pages(dst, [6, 8])
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_host_fetch_counter_sees_a_naive_reshard(count_host_fetches):
    """The guard above can fail: a plain device_put between TP 2 and TP 1 layouts of the
    gathered pages is caught by the counter."""
    engine = get_engine(mode="disaggregated", **PLACEMENTS["tp2->1"])
    src, dst = _runners(engine)
    k, _ = src.gather_pages([1, 2])[0]
    count_host_fetches["n"] = 0
    jax.device_put(k, dst.stages[0].pool.sharding)
    assert count_host_fetches["n"] > 0


def test_pipeline_stages_hold_only_their_layers_on_their_devices():
    engine = get_engine(mode="disaggregated", **PLACEMENTS["pp1->2"])
    runner = engine.local_worker("decode0").runner
    for stage in runner.stages:
        devices = set(stage.mesh.devices.flat)
        for leaf in jax.tree_util.tree_leaves(stage.params):
            assert set(leaf.sharding.device_set) == devices
        kernel = stage.params["layers"]["mlp"]["fc1"]["kernel"]
        start, end = stage.layer_range
        assert kernel.shape[0] == end - start
        # On a CPU, decode programs take each layer's params as arrays of their own.
        # (its vectors packed into one array, unpacked here as a step does)
        decode_params = stage.decode_params.unpack()
        layers = [k for k in decode_params if k.startswith("layers")]
        assert sorted(layers) == sorted(f"layers_{i}" for i in range(end - start))
        bias = stage.params["layers"]["mlp"]["fc1"]["bias"]
        for i, k in enumerate(sorted(layers, key=lambda k: int(k.split("_")[1]))):
            np.testing.assert_array_equal(decode_params[k]["mlp"]["fc1"]["kernel"], kernel[i])
            np.testing.assert_array_equal(decode_params[k]["mlp"]["fc1"]["bias"], bias[i])
    assert "embed_positions" in runner.stages[0].params
    assert "embed_positions" not in runner.stages[-1].params


@pytest.mark.parametrize("mode", ["disaggregated", "colocated", "chunked"])
def test_warm_up_compiles_what_the_configured_workload_reaches(mode, hf_opt):
    """Requests within the warm-up workload (prompts <= 32 tokens, contexts <= 64, 2 prompts
    per prefill, 8 decode rows) find every step program compiled before the engine is ready."""
    extra = dict(decoding_max_tokens_per_batch=32) if mode == "chunked" else {}
    if mode == "disaggregated":
        extra = dict(min_decode_rows=1)  # 1-row buckets: warm-up compiles 1, 2, 3, 4 and 6 too
    # A set budget: a measured one follows this machine's speed (its own test is below).
    engine = hf_engine(hf_opt[1], mode=mode, warmup_max_prompt_len=32,
                       warmup_max_context_len=64, warmup_max_prefill_batch=2,
                       warmup_max_decode_batch=8, prefill_token_budget=64, **extra)
    runners = [engine.local_worker(name).runner for name in engine.instances]
    compiled = [len(s.fns) for r in runners for s in r.stages]
    assert min(compiled) > 0
    if mode != "chunked":
        assert decode_batch_buckets(engine) == (
            {1, 2, 3, 4, 6, 8} if mode == "disaggregated" else {8})
    generate(engine, [p[:16] for p in engine_prompts()[:2]], SamplingParams(
        temperature=0.7, max_tokens=20, ignore_eos=True, seed=1))
    assert [len(s.fns) for r in runners for s in r.stages] == compiled
    # Contexts far past the warmed 64 tokens: the XLA attention's block tables have one width,
    # so decode and chunked steps at any context compile nothing either.
    assert all(r.fixed_table_width for r in runners)
    generate(engine, [engine_prompts()[0][:16]], SamplingParams(
        temperature=0, max_tokens=100, ignore_eos=True))
    assert [len(s.fns) for r in runners for s in r.stages] == compiled


def test_prefill_budget_follows_the_ttft_slo(hf_opt):
    """The measured budget: within a quarter of the TTFT SLO, unless a step's fixed cost alone
    nearly fills it (then 2x that cost: a smaller batch would not help)."""
    from dsjax.executor.warmup import budget_from_timings
    # 1 ms + 10 us per token: a 5 ms target admits 400 tokens, so 256 (a power of two).
    timings = [(16, 0.00116), (512, 0.00612), (64, 0.00164)]
    assert budget_from_timings(timings, 4096, 0.005) == 256
    assert budget_from_timings(timings, 128, 0.005) == 128
    # A 1 us target: no batch meets it; 2 ms (twice the fixed cost) admits 100 tokens -> 64.
    assert budget_from_timings(timings, 4096, 1e-6) == 64
    engine = hf_engine(hf_opt[1], mode="colocated", ttft_slo=1e-6, warmup_max_prompt_len=16,
                       warmup_max_context_len=32, warmup_max_prefill_batch=2,
                       warmup_max_decode_batch=8)
    budget = engine.stats()[0]["token_budget"]
    assert budget & (budget - 1) == 0 and 16 <= budget <= 256
    assert generate(engine, engine_prompts()[:3], GREEDY)[1:] == [
        hf_greedy(hf_opt[0], p, ENGINE_MAX_NEW) for p in engine_prompts()[1:3]]


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_synchronous_scheduling_matches_transformers(mode, hf_opt, hf_reference):
    """async_scheduling off: every step read before the next is dispatched (the default
    overlaps them; every other test here runs that way)."""
    engine = hf_engine(hf_opt[1], mode=mode, async_scheduling=False)
    assert generate(engine, engine_prompts(), GREEDY) == hf_reference


def test_a_pipelined_decode_instance_compiles_nothing_after_ready():
    """A pipeline splits each decode batch into micro-batches, and the next step's token
    selection compiles per combination of their buckets: 17-24 rows under pp 2 run as 8 + 16,
    which no warm-up batch (8, 16, 32 rows: 4 + 4, 8 + 8, 16 + 16) splits into; 1 row runs
    as one micro-batch. Batches here shrink from 22 rows to 1 as requests of different
    lengths finish. The prefill instance has another layout (tp 2, one stage), so each pull
    slices layers and joins heads (kv_migration.reshard_pages), one program per page bucket:
    prompts of 2-16 tokens pull 1, 2 and 4 pages."""
    from dsjax.executor.compile_watch import CompileWatch
    engine = get_engine(context_tensor_parallel_size=2,
                        decoding_pipeline_parallel_size=2, decoding_max_batch_size=24,
                        context_max_batch_size=8, warmup_max_prompt_len=16,
                        warmup_max_context_len=48, warmup_max_prefill_batch=8,
                        warmup_max_decode_batch=24)
    try:
        rng = np.random.default_rng(5)
        prompts = [rng.integers(4, 1000, 2 + i % 15).tolist() for i in range(22)]
        with CompileWatch() as watch:
            streams = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=2 + i,
                                                            ignore_eos=True))
                       for i, p in enumerate(prompts)]
            assert [len(s.result(timeout=300).token_ids) for s in streams] == \
                [2 + i for i in range(22)]
            wait_idle(engine)
        assert watch.count == 0, f"programs compiled after ready: {watch.describe()}"
    finally:
        shutdown_all()
