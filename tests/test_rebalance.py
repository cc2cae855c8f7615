"""Instances changing role: the drain mechanics by hand, and the policy's direction."""
import pytest

from dsjax.eval.latency_model import LatencyModel, StepCoeffs
from dsjax.eval.simulator import Cluster, Parallelism, RebalancePolicy, SimConfig, poisson_arrivals
from dsjax.eval.workloads import TestRequest

PREFILL = (10.0, 0.1, 0.0)        # ms: 10 + 0.1 * tokens
DECODE = (5.0, 0.01, 1.0)         # ms: 5 + 0.01 * context + 1 * batch
KV_BYTES = 2 * 40 * 5120 * 2      # OPT-13B, FP16


def toy_model() -> LatencyModel:
    return LatencyModel("opt-13b", {1: StepCoeffs(PREFILL, DECODE, DECODE)}, {(1, 1): 100_000})


def decode_s(ctx: int) -> float:
    return (DECODE[0] + DECODE[1] * ctx + DECODE[2]) / 1e3


def test_a_drained_decode_instance_hands_its_request_over_the_link_and_becomes_prefill():
    link = KV_BYTES / 1e-3                                     # 1 ms per KV token
    cluster = Cluster(toy_model(), SimConfig(num_prefill=1, num_decode=2, kv_link_bytes_per_s=link))
    cluster.loop.at(0.125, lambda: cluster.switch_role(cluster.decodes[0]))
    [r] = cluster.run([TestRequest("", 100, 4)], [0.0])
    # Prefill ends at 20 ms, the 100-token prompt's KV arrives at 120 ms; one decode step later
    # (the drain began during it) the request holds 101 KV tokens, which take 101 ms to move.
    second = 0.120 + decode_s(101)
    moved = second + 0.101
    assert r.token_timestamps() == pytest.approx(
        [0.020, second, moved + decode_s(102), moved + decode_s(102) + decode_s(103)])
    assert cluster.role_switches == [(pytest.approx(moved), "decode->prefill")]
    assert (len(cluster.prefills), len(cluster.decodes)) == (2, 1)


def test_a_drained_prefill_instance_reroutes_its_queue_and_joins_decode():
    cluster = Cluster(toy_model(), SimConfig(num_prefill=2, num_decode=1, kv_link_bytes_per_s=1e18))
    cluster.loop.at(0.001, lambda: cluster.switch_role(cluster.prefills[0]))
    out = cluster.run([TestRequest("", 100, 3)] * 4, [0.0, 0.0, 0.002, 0.002])
    assert all(len(r.token_timestamps()) == 3 for r in out)
    # Prefill 0 finishes the batch it runs (20 ms), decode pulls its KV, then it switches.
    assert cluster.role_switches == [(pytest.approx(0.020), "prefill->decode")]
    assert (len(cluster.prefills), len(cluster.decodes)) == (1, 2)


def test_policy_moves_instances_toward_the_busier_phase():
    # Short prompts, long outputs: one decode instance is swamped, two prefill instances idle.
    reqs = [TestRequest("", 32, 400)] * 600
    config = SimConfig(num_prefill=2, num_decode=1, kv_link_bytes_per_s=1e11,
                       rebalance=RebalancePolicy(tpot_slo=0.05, window_s=2.0))
    cluster = Cluster(toy_model(), config)
    out = cluster.run(reqs, poisson_arrivals(len(reqs), 10.0))
    assert [kind for _, kind in cluster.role_switches] == ["prefill->decode"]
    assert (len(cluster.prefills), len(cluster.decodes)) == (1, 2)
    assert all(len(r.token_timestamps()) == 400 for r in out)


def test_rebalancing_needs_one_shape_for_both_roles():
    with pytest.raises(ValueError, match="same parallelism"):
        SimConfig(prefill=Parallelism(2, 1), rebalance=RebalancePolicy(tpot_slo=0.1))
