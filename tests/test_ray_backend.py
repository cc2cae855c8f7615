"""The "ray" executor backend on a local Ray cluster of CPU actors (real processes, each with its
own XLA host devices): greedy tokens against transformers', KV bit for bit across actors, and
a killed decode actor failing only its requests. One cluster for the module (Ray starts slowly).
"""
from __future__ import annotations

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import ray

from benchmarks.bench_kv_transfer import endpoint
from dsjax import SamplingParams
from dsjax.config import EngineConfig
from dsjax.engine.core import Engine, EngineError, resolve_model
from dsjax.engine.instance_hosts import params_loader
from dsjax.executor.kernels import get_attention_backend
from dsjax.executor.kv_migration import migrate
from dsjax.executor.parallel import InstancePlan, InstanceSpec, plan_placement
from dsjax.executor.runner import ModelRunner
from dsjax.executor.stage_group import StageServer, TransferChannel, build_stage, stage_placer
from tests._engine_helpers import TINY, generate, outcomes_after_a_kill, wait_idle
from tests.conftest import ENGINE_MAX_NEW, engine_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=ENGINE_MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    # Logical CPUs: a bundle asks for one per XLA host device of its actor.
    ray.init(num_cpus=16, include_dashboard=False)
    yield
    ray.shutdown()


def processes_titled(prefix: str) -> list[int]:
    """Pids of the processes whose title (Ray titles its workers by actor class) starts so."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(prefix.encode()):
                    pids.append(int(pid))
        except OSError:   # it exited meanwhile
            pass
    return pids


def ray_engine(model_dir, **placement) -> Engine:
    return Engine(EngineConfig(**{**TINY, "model": str(model_dir), "load_format": "auto",
                                  "distributed_executor_backend": "ray", **placement}))


@pytest.fixture(scope="module")
def tp_engine(cluster, hf_opt):
    """prefill TP1 -> two decode instances of TP2: three actors. The fault test, last in this
    module, kills one of them."""
    engine = ray_engine(hf_opt[1], decoding_tensor_parallel_size=2, num_decode_instances=2)
    yield engine
    engine.shutdown()


def test_tp1_to_tp2_across_actors_matches_transformers(tp_engine, hf_reference):
    pids = {pid for inst in tp_engine.instances.values() for pid in inst.host.pids()}
    assert len(pids) == 3 and os.getpid() not in pids
    assert generate(tp_engine, engine_prompts(), GREEDY) == hf_reference
    assert tp_engine.migrations["count"] >= len(hf_reference)


def test_pipeline_stages_in_separate_actors_match_transformers(cluster, hf_opt, hf_reference):
    """Prefill PP2 and decode PP2, each stage its own actor (prefill's by a plan's stage_nodes,
    decode's by ray_stage_actors), pinned to this node: activations cross between actors, and
    the KV of the second stages relays through each instance's first actor. Then decode's
    stage actor is killed: its instance fails its request, naming the lost stage, and the
    prefill instance's pages are freed."""
    ip = ray.util.get_node_ip_address()
    engine = ray_engine(hf_opt[1], context_pipeline_parallel_size=2,
                        decoding_pipeline_parallel_size=2, ray_stage_actors=True,
                        instances=(dict(role="prefill", index=0, stage_nodes=[ip, ip]),
                                   dict(role="decode", index=0, node=ip)))
    try:
        for name in ("prefill0", "decode0"):
            assert engine.instances[name].host.bundles == [{"CPU": 1, f"node:{ip}": 0.001}] * 2
        stage_pids = [engine.instances[n].host.pids()[1] for n in ("prefill0", "decode0")]
        assert sorted(stage_pids) == sorted(processes_titled("ray::StageActor"))
        assert generate(engine, engine_prompts(), GREEDY) == hf_reference

        stream = engine.add_request(engine_prompts()[0], GREEDY)
        assert next(iter(stream)).new_token_ids     # prefilled: decode0 will pull it
        os.kill(stage_pids[1], signal.SIGKILL)
        with pytest.raises(EngineError, match="decode0"):
            stream.result(timeout=120)
        assert "its stage 1 died" in engine.health()["instances"]["decode0"]
        assert engine.health()["instances"]["prefill0"] == "ok"
        assert engine.blocks_in_use() == {"prefill0": 0}
    finally:
        engine.shutdown()


def test_plan_file_assigns_nodes(tmp_path):
    """A plan's [[instances]] tables: one node per instance, or one per pipeline stage."""
    plan = tmp_path / "plan.toml"
    plan.write_text('distributed_executor_backend = "ray"\n'
                    'context_pipeline_parallel_size = 2\nnum_decode_instances = 2\n'
                    '[[instances]]\nrole = "prefill"\nindex = 0\n'
                    'stage_nodes = ["10.0.0.1", "10.0.0.2"]\n'
                    '[[instances]]\nrole = "decode"\nindex = 1\nnode = "10.0.0.2"\n')
    config = EngineConfig.from_file(plan)
    assert config.nodes_for("prefill", 0).stage_nodes == ("10.0.0.1", "10.0.0.2")
    assert config.nodes_for("decode", 1).node == "10.0.0.2"
    assert config.nodes_for("decode", 0) is None
    for bad, why in [(dict(role="decode", index=2, node="n"), "no such instance"),
                     (dict(role="prefill", index=0, stage_nodes=["n"]), "one node per"),
                     (dict(role="prefill", index=0), "either node or stage_nodes"),
                     (dict(role="decode", index=0, host="n"), "takes role, index")]:
        with pytest.raises(ValueError, match=why):
            EngineConfig.from_file(plan, instances=[bad])
    with pytest.raises(ValueError, match="need distributed_executor_backend"):
        EngineConfig.from_file(plan, distributed_executor_backend="mp")


def test_the_kv_budget_comes_from_the_nodes_memory_not_the_drivers(cluster, monkeypatch):
    """Launching on Ray sizes the CPU KV cache from the memory free on the nodes, each read
    by a task pinned there: here the driver's reading is made to say 1 GiB (which would give
    the 256 MiB floor) and the launched instances get the node's share instead."""
    from dsjax.engine import ray_hosts
    from dsjax.executor import kv_cache
    gib = 1 << 30
    ip = ray.util.get_node_ip_address()
    nodes = ray_hosts.node_memory()
    # The cluster's one node, with the 16 logical CPUs it was started with (this machine has
    # fewer), and the memory this machine has free.
    assert list(nodes) == [ip] and nodes[ip][0] == 16
    assert abs(nodes[ip][1] - kv_cache.available_memory_bytes()) < gib
    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda: gib)
    config = EngineConfig(model="opt-tiny", distributed_executor_backend="ray",
                          compilation_cache_dir="")
    hosts = ray_hosts.RayHost.launch(config, None, None, None, None)
    budgets = {host._args[0].cpu_kv_cache_bytes for host in hosts}
    # (free memory drifts between two readings: within one 256 MiB granule of the node's)
    assert len(budgets) == 1 and abs(budgets.pop() - kv_cache.auto_cpu_kv_bytes(
        2, available=nodes[ip][1])) <= kv_cache.CPU_KV_GRANULE_BYTES
    assert kv_cache.auto_cpu_kv_bytes(2, available=nodes[ip][1]) > kv_cache.CPU_KV_MIN_BYTES, \
        "the node had too little memory to tell its reading from the driver's"
    # The driver's reading still sizes a fixed page count's engine (unused there) and a set one.
    fixed = ray_hosts.RayHost.launch(dataclasses.replace(config, num_blocks=64), None, None,
                                     None, None)
    assert fixed[0]._args[0].cpu_kv_cache_bytes == kv_cache.CPU_KV_MIN_BYTES


def test_the_kv_budget_counts_the_devices_a_plan_pins_to_each_node(monkeypatch):
    """A plan that pins every actor: each node's share is over the devices pinned there
    (a pipeline's stage actors counted on their own nodes); one actor left to Ray: every
    node that could host it counts, with as many devices as fit on it."""
    from dsjax.engine import ray_hosts
    gib = 1 << 30
    nodes = {"10.0.0.1": (16, 40 * gib), "10.0.0.2": (16, 10 * gib)}
    monkeypatch.setattr(ray_hosts, "node_memory", lambda: nodes)
    config = EngineConfig(model="opt-tiny", distributed_executor_backend="ray",
                          context_pipeline_parallel_size=2, instances=[
                              dict(role="prefill", index=0,
                                   stage_nodes=["10.0.0.1", "10.0.0.2"]),
                              dict(role="decode", index=0, node="10.0.0.1")])
    plans = plan_placement(config.mode, 3, **config.placement_kwargs())
    # Node 1: a prefill stage and the decode instance (2 devices): 0.3 x 40 / 2 = 6 -> 4 GiB
    # (the cap); node 2: one stage (1 device): 0.3 x 10 = 3 GiB.
    assert ray_hosts.cluster_cpu_kv_bytes(config, plans, 3) == 3 * gib
    unpinned = dataclasses.replace(config, instances=(config.instances[0],))
    # The decode actor may land on node 2 too: 3 devices there, 0.3 x 10 / 3 = 1 GiB.
    assert ray_hosts.cluster_cpu_kv_bytes(unpinned, plans, 3) == gib


@pytest.mark.parametrize("src,dst", [((1, 1), (2, 1)), ((1, 2), (2, 1))])
def test_kv_pulled_between_actors_arrives_bit_identical(cluster, src, dst):
    """The decode side's pull from the prefill side's transfer server (bound to the node's
    address), resharded for another TP/PP layout: every page equal bit for bit."""
    config = EngineConfig(**{**TINY, "compilation_cache_dir": ""})
    a, b = endpoint(config, src), endpoint(config, dst)
    try:
        blocks, dest = [3, 4, 9, 17, 30], [40, 2, 11, 12, 5]
        ray.get(a.fill.remote(blocks, 1))
        ray.get(b.pull.remote(a.export.remote(blocks), dest))
        sent, got = ray.get([a.pages.remote(blocks), b.pages.remote(dest)])
        assert np.abs(sent[0]).sum() > 0
        for x, y in zip(sent, got):
            np.testing.assert_array_equal(x, y)
    finally:
        ray.kill(a)
        ray.kill(b)


def _tiny_runners(**model):
    """(make(plan, devices, stage_devices=None), the model config): runners of the tiny OPT,
    or of `model` (EngineConfig's model and load_format); with `stage_devices`, its stage 1
    runs in a StageServer on them (in this process, reached through transfer channels as a Ray
    stage actor is) and the runner holds stage 0 only."""
    config = EngineConfig(**{**TINY, **model})
    mc, model_dir = resolve_model(config.model, config.load_format)
    dtype = jnp.float32
    load = params_loader(config, mc, model_dir, dtype)
    sizes = dict(dtype=dtype, num_pages=config.num_blocks, page_size=config.block_size)

    def attention(tp):
        return get_attention_backend("xla", num_heads=mc.num_attention_heads // tp,
                                     num_kv_heads=mc.cache_kv_heads(tp) // tp,
                                     head_dim=mc.head_dim, page_size=config.block_size,
                                     dtype=dtype)

    def make(plan, devices, stage_devices=None):
        hook = {}
        if stage_devices is not None:
            def servers(head_runner):
                return [StageServer(build_stage(mc, stage_devices, 1, 2, load, **sizes,
                                                attention=attention(plan.tp),
                                                num_slots=head_runner.max_sampled_rows),
                                    TransferChannel("127.0.0.1"))]
            hook = dict(place_stages=stage_placer(servers, TransferChannel("127.0.0.1")))
        return ModelRunner(InstanceSpec.bind(plan, devices), mc, load, max_batch_size=8,
                           max_tokens_per_batch=256, max_blocks_per_request=64,
                           attention=attention(plan.tp), **sizes, **hook)
    return make, mc


def test_remote_stage_pages_and_steps_in_process():
    """A RemoteStage driving a StageServer (here in this process, on other devices) through the
    transfer channels: prefill tokens equal a local PP2 runner's, and pages written, read back
    and migrated through the relay arrive bit for bit."""
    from dsjax.executor.batch import PrefillRow, SamplingRow
    make, mc = _tiny_runners()
    config, devices = EngineConfig(**TINY), jax.devices()
    # the head process sees stage 0 only
    remote = make(InstancePlan("decode", 0, 1, 2, (0,)), devices[:1], devices[1:2])
    local = make(InstancePlan("decode", 0, 1, 2, (0, 1)), devices[2:4])

    row = SamplingRow(GREEDY, 0, 0)
    rows = [PrefillRow(tuple(p), tuple(range(8 * i, 8 * i + 8)), (row,))
            for i, p in enumerate(engine_prompts()[:3])]
    np.testing.assert_array_equal(remote.prefill(rows).tokens, local.prefill(rows).tokens)

    rng = np.random.default_rng(0)
    blocks = [3, 7, 9]
    # Pages as a write takes them: padded to a power of two (4); the padding is dropped.
    pages = [tuple(rng.standard_normal((s.layer_range[1] - s.layer_range[0], 4,
                                        config.block_size, mc.num_attention_heads,
                                        mc.head_dim)).astype(np.float32) for _ in "kv")
             for s in remote.stages]
    remote.insert_pages(blocks, pages)

    def check(r, ids):
        for got, sent in zip(r.gather_pages(ids), pages):
            for a, b in zip(got, sent):
                np.testing.assert_array_equal(np.asarray(a)[:, :3], b[:, :3])
    check(remote, blocks)
    migrate(remote, blocks, local, [20, 1, 5])
    check(local, [20, 1, 5])
    migrate(local, [20, 1, 5], remote, [30, 31, 32])
    check(remote, [30, 31, 32])
    assert remote.healthy()


def test_a_pull_from_tp2_stage_actors_compiles_nothing_after_warm_up():
    """A prefill instance of TP 2 whose stage 1 is a stage actor exports that stage's pages
    with both heads joined on its head's relay device. A decode instance's warm-up cuts its
    zero shards the same way (SourceLayout.joined_stages, which Ray's hosts set), so the
    pull after ready compiles nothing and lands bit for bit."""
    from dsjax.config import WARMUP_ALL
    from dsjax.executor.compile_watch import CompileWatch
    from dsjax.executor.kv_migration import SourceLayout, export_shards, layout_shards
    from dsjax.executor.warmup import warm_up_fixed_programs, warm_up_pulls
    make, mc = _tiny_runners()
    devices = jax.devices()
    src = make(InstancePlan("prefill", 0, 2, 2, (0, 1)), devices[:2], devices[2:4])
    dst = make(InstancePlan("decode", 0, 1, 1, (0,)), devices[4:5])
    layout = SourceLayout(2, 2, src.spec.devices, joined_stages=True)
    assert not layout.matches(dst)

    def cut(shards):
        return [(s.box, s.k.shape, s.v.shape, s.k.dtype, s.k.devices()) for s in shards]
    assert cut(layout_shards(dst, layout, 4)) == cut(export_shards(src, [5, 2, 9]))
    # As Ray's hosts describe it (no devices): every shard where pulls land, this runner's
    # first device, one per head shard of stage 0 and one for the stage actor's.
    arriving = layout_shards(dst, dataclasses.replace(layout, devices=None), 4)
    assert [s.k.devices() for s in arriving] == [{devices[4]}] * 3

    rng = np.random.default_rng(1)
    pages = [tuple(rng.standard_normal((s.layer_range[1] - s.layer_range[0], 4,
                                        TINY["block_size"], mc.num_attention_heads,
                                        mc.head_dim)).astype(np.float32) for _ in "kv")
             for s in src.stages]
    src.insert_pages([3, 7, 9, 11], pages)
    warm_up_fixed_programs(dst, "decode")
    whole = dataclasses.replace(EngineConfig(**TINY), warmup_max_prompt_len=WARMUP_ALL)
    assert warm_up_pulls(dst, [layout], whole) == 7    # page buckets 1 to 64
    with CompileWatch() as watch:
        migrate(src, [3, 7, 9], dst, [20, 1, 5])
    assert watch.count == 0, f"the pull compiled: {watch.describe()}"
    (k, v), = dst.gather_pages([20, 1, 5])
    for got, sent in zip((k, v), zip(*pages)):
        np.testing.assert_array_equal(np.asarray(got)[:, :3], np.concatenate(sent)[:, :3])


def test_repeated_kv_heads_move_once_out_of_and_into_stage_actors(tmp_path):
    """GQA with TP 4 over 2 KV heads: each device's cache holds one head, each model head
    twice. A stage actor's pages leave and arrive with each model head once, so a pull from
    its stage into TP 1, and from TP 1 into it, lands every head bit for bit (the joined
    heads were taken by cache index: head 1 read its copy of head 0, and a pull into a stage
    actor failed on the shape)."""
    from tests._hf_helpers import make_hf_family, save_safetensors
    model_dir = save_safetensors(make_hf_family("llama", seed=2), tmp_path / "llama")
    make, mc = _tiny_runners(model=str(model_dir), load_format="auto")
    devices = jax.devices()
    actors = make(InstancePlan("prefill", 0, 4, 2, (0, 1, 2, 3)), devices[:4], devices[4:8])
    plain = make(InstancePlan("decode", 0, 1, 1, (0,)), devices[:1])
    assert actors.stages[0].kv_head_repeat == 2
    rng = np.random.default_rng(3)
    heads = [rng.standard_normal((s.layer_range[1] - s.layer_range[0], 4, TINY["block_size"],
                                  mc.num_key_value_heads, mc.head_dim)).astype(np.float32)
             for s in actors.stages]
    # Pages as each stage's gather gives them: the head's stage holds every cache head, the
    # stage actor each model head once.
    pages = [(np.repeat(h, r, axis=3), 2 * np.repeat(h, r, axis=3))
             for h, r in zip(heads, (2, 1))]
    actors.insert_pages([3, 7, 9, 11], pages)
    migrate(actors, [3, 7, 9], plain, [20, 1, 5])
    (k, v), = plain.gather_pages([20, 1, 5])
    np.testing.assert_array_equal(np.asarray(k)[:, :3], np.concatenate(heads)[:, :3])
    np.testing.assert_array_equal(np.asarray(v)[:, :3], 2 * np.concatenate(heads)[:, :3])
    migrate(plain, [20, 1, 5], actors, [30, 31, 32])
    for (k, v), (sent_k, sent_v) in zip(actors.gather_pages([30, 31, 32]), pages):
        np.testing.assert_array_equal(np.asarray(k)[:, :3], sent_k[:, :3])
        np.testing.assert_array_equal(np.asarray(v)[:, :3], sent_v[:, :3])
    # In the stage actor's own pool each cache head holds model head i // 2, as its attention
    # reads them (a round trip alone would pass with the heads laid out any consistent way).
    k, v = actors.stages[1].server.stage.pool.gather([30, 31, 32])
    np.testing.assert_array_equal(np.asarray(k)[:, :3], np.repeat(heads[1], 2, axis=3)[:, :3])
    np.testing.assert_array_equal(np.asarray(v)[:, :3],
                                  2 * np.repeat(heads[1], 2, axis=3)[:, :3])


def test_killing_a_decode_actor_recomputes_its_requests(tp_engine, hf_reference):
    """SIGKILL one of two decode actors mid-run: its requests are recomputed on decode1 and
    complete, the prefill instance's pages held for them are freed, /health names it, and
    decode1 serves on."""
    engine = tp_engine
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    streams = [engine.add_request(p, long) for p in engine_prompts()[:4]]
    assert next(iter(streams[0])).new_token_ids     # prefill has run; decoding has started
    os.kill(engine.instances["decode0"].host.pids()[0], signal.SIGKILL)
    assert outcomes_after_a_kill(streams, "decode0", 60) == 0
    assert engine.recomputations > 0, "no request was on the killed actor"
    health = engine.health()
    assert health["ok"] and "actor died" in health["instances"]["decode0"]
    assert health["instances"]["decode1"] == "ok"
    assert generate(engine, engine_prompts(), GREEDY) == hf_reference
    assert engine.blocks_in_use()["prefill0"] == 0
    wait_idle(engine)
