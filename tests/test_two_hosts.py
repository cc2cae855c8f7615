"""Two hosts, tested: Linux network namespaces joined by a veth pair (benchmarks/netns_hosts.py),
a Ray head and the engine's HTTP server in host A, a Ray worker node in host B. Placements
across them serve transformers' greedy tokens; faults across them (host B's instances killed,
the link cut for seconds, host B powered off) end every request, clearly, with no block leaked
and no process left. Needs root (`ip netns`).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import jax
import pytest

from benchmarks.netns_hosts import IPS, TwoHosts, searched_plan
from tests._hf_helpers import hf_greedy
from tests.conftest import ENGINE_MAX_NEW, engine_prompts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

LONG_NEW = 60        # tokens per request in the fault runs: still decoding when the fault hits
A_NAMES, B_NAMES = ("prefill0", "decode0"), ("prefill1", "decode1")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    # The actors compile as this session does (LLVM -O0, float32-exact matmuls, its cache).
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    with TwoHosts(tmp_path_factory.mktemp("two-hosts"), env=env) as two:
        yield two
    for h in "ab":
        assert not os.path.exists(f"/run/netns/{two.ns[h]}"), f"namespace {two.ns[h]} left"


@pytest.fixture(scope="module")
def reference_long(hf_opt):
    return [hf_greedy(hf_opt[0], p, LONG_NEW) for p in engine_prompts()]


def server_args(hf_opt) -> list[str]:
    return ["--model", str(hf_opt[1]), "--dtype", "float32", "--block-size", "4",
            "--num-blocks", "256", "--context-max-tokens-per-batch", "256",
            "--max-num-blocks-per-req", "64", "--min-decode-rows", "8",
            "--instance-heartbeat-timeout", "10",
            "--compilation-cache-dir", jax.config.jax_compilation_cache_dir]


def serving(hosts, hf_opt, tmp_path_factory, plan: str):
    path = tmp_path_factory.mktemp("plan") / "plan.toml"
    path.write_text(plan)
    server = hosts.serve([*server_args(hf_opt), "--config", str(path)],
                         path.with_name("server.log"))
    yield server
    hosts.stop_server(server)
    # The engine's actors die with it, on both hosts.
    deadline = time.monotonic() + 60
    while any(hosts.titled(h, "ray::InstanceActor") for h in "ab"):
        assert time.monotonic() < deadline, "instance actors outlived the engine"
        time.sleep(0.5)


def generate(hosts, prompts, max_tokens: int, fault=None) -> list[dict]:
    """Stream every prompt at once from host A; `fault()` runs once each has its first
    token. Per prompt: {"tokens": [...], "error": None | str}."""
    client = hosts.client(prompts, max_tokens)
    assert client.stdout.readline().strip() == "FIRST", client.stderr.read()
    if fault is not None:
        fault()
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, err
    return json.loads(out)


def wait_no_blocks(hosts, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(hosts.blocks_in_use().values()):
        assert time.monotonic() < deadline, f"blocks leaked: {hosts.blocks_in_use()}"
        time.sleep(0.5)


def completed_or_failed_clearly(results, reference, dead: tuple[str, ...]) -> int:
    """Each request completed with transformers' tokens or failed naming a dead instance;
    none hung. Returns how many failed."""
    failed = 0
    for got, want in zip(results, reference):
        if got["error"] is None:
            assert got["tokens"] == want
        else:
            assert got["error"] != "hung" and any(n in got["error"] for n in dead), got["error"]
            failed += 1
    return failed


def veth_tx_bytes(hosts, host: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", hosts.ns[host], "cat",
                          f"/sys/class/net/{hosts.dev[host]}/statistics/tx_bytes"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def listening(hosts, host: str, pid: int) -> set[str]:
    """Addresses (with ports) on which process `pid` of the host listens for TCP."""
    out = subprocess.run(["ip", "netns", "exec", hosts.ns[host], "ss", "-ltnpH"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if f"pid={pid}," in line}


def transfer_address(server, name: str, timeout: float = 60.0) -> str:
    """The address instance `name` logged for its KV transfer server (actors' logs reach the
    server's log through Ray, late and in any order)."""
    marker = f"{name}: KV transfer server at "
    deadline = time.monotonic() + timeout
    while marker not in (log := server.log_path.read_text()):
        assert time.monotonic() < deadline, f"{name} logged no transfer server"
        time.sleep(0.5)
    return log.split(marker)[1].split()[0]


class TestSearchedPlanAcrossHosts:
    """2 prefill + 2 decode instances, one of each per host, as the placement search wrote."""

    @pytest.fixture(scope="class")
    def server(self, hosts, hf_opt, tmp_path_factory):
        plan = searched_plan(tmp_path_factory.mktemp("search") / "plan.toml")
        assert plan.count("[[instances]]") == 4 and 'node = "#1"' in plan, plan
        yield from serving(hosts, hf_opt, tmp_path_factory, plan)

    def test_matches_transformers(self, hosts, server, hf_reference):
        assert [hosts.titled(h, "ray::InstanceActor") != [] for h in "ab"] == [True, True]
        results = generate(hosts, engine_prompts(), ENGINE_MAX_NEW)
        assert [r["tokens"] for r in results] == hf_reference
        wait_no_blocks(hosts)

    def test_link_down_for_seconds(self, hosts, server, reference_long):
        """Cut the veth link for 3 s mid-decode (under the 10 s heartbeat time-out): pulls and
        Ray calls wait, then every request completes with transformers' tokens."""
        def cut():
            hosts.link(up=False)
            time.sleep(3)
            hosts.link(up=True)
        results = generate(hosts, engine_prompts(), LONG_NEW, fault=cut)
        assert completed_or_failed_clearly(results, reference_long, B_NAMES) == 0
        # The cut hit requests mid-stream: their tokens stalled for about its length.
        assert max(b - a for r in results for a, b in zip(r["times"], r["times"][1:])) > 2.5
        assert hosts.get("/health")["status"] == "ok"
        wait_no_blocks(hosts)

    def test_every_instance_on_host_b_killed(self, hosts, server, reference_long,
                                             hf_reference):
        """SIGKILL host B's instance actors mid-run: their requests are recomputed on host A
        (recompute_on_failure), so every request completes with transformers' tokens; host A
        serves on, no block held."""
        victims = hosts.titled("b", "ray::InstanceActor")
        assert len(victims) == 2
        results = generate(hosts, engine_prompts(), LONG_NEW, fault=lambda: hosts.kill(victims))
        assert completed_or_failed_clearly(results, reference_long, B_NAMES) == 0
        health = hosts.get("/health")
        assert health["status"].startswith("degraded")
        assert [health["instances"][n] == "ok" for n in A_NAMES + B_NAMES] == \
            [True, True, False, False]
        wait_no_blocks(hosts)
        assert [r["tokens"] for r in generate(hosts, engine_prompts(), ENGINE_MAX_NEW)] == \
            hf_reference
        assert hosts.titled("b", "ray::InstanceActor") == []


class TestTp2OnAToTp1OnB:
    """prefill TP2 on host A, decode TP1 on host B: every request's KV crosses the link."""

    @pytest.fixture(scope="class")
    def server(self, hosts, hf_opt, tmp_path_factory):
        plan = (f'context_tensor_parallel_size = 2\n'
                f'[[instances]]\nrole = "prefill"\nindex = 0\nnode = "{IPS["a"]}"\n'
                f'[[instances]]\nrole = "decode"\nindex = 0\nnode = "{IPS["b"]}"\n')
        yield from serving(hosts, hf_opt, tmp_path_factory, plan)

    def test_matches_transformers_with_kv_over_the_link(self, hosts, server, hf_reference):
        [prefill], [decode] = (hosts.titled(h, "ray::InstanceActor") for h in "ab")
        sent = veth_tx_bytes(hosts, "a")
        results = generate(hosts, engine_prompts(), ENGINE_MAX_NEW)
        assert [r["tokens"] for r in results] == hf_reference
        wait_no_blocks(hosts)
        metrics = hosts.get("/metrics")
        kv = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("dsjax_migration_bytes_total{"))
        assert kv > 0 and veth_tx_bytes(hosts, "a") - sent > kv
        # Each instance's transfer server listens on its own node's address (not on every
        # interface), from the instance's own process.
        for host, pid, name in (("a", prefill, "prefill0"), ("b", decode, "decode0")):
            address = transfer_address(server, name)
            assert address.startswith(IPS[host] + ":")
            assert address in listening(hosts, host, pid)

    def test_host_b_powered_off(self, hosts, server):
        """Every process of host B dies at once (its Ray node and the decode actor): every
        request fails naming decode0, none hangs, the prefill instance holds no block, /health
        says why, and nothing is left in host B."""
        results = generate(hosts, engine_prompts(), LONG_NEW,
                           fault=lambda: hosts.power_off("b"))
        assert all(r["error"] and "decode0" in r["error"] for r in results), results
        health = hosts.get("/health")
        assert "decode0" in health["status"] and health["instances"]["prefill0"] == "ok"
        wait_no_blocks(hosts)
        assert hosts.pids("b") == []
