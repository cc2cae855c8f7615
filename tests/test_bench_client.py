"""serving.bench and serving.backends against a fake streaming server on a loopback port."""
import json

import numpy as np
import pytest

from dsjax.eval.workloads import Dataset, TestRequest, save_dataset
from dsjax.eval.results import load_exp, load_failures
from serving import bench
from tests._bench_helpers import EVENTS, FakeLLMServer

REQUESTS = [TestRequest("hello", 2, 5), TestRequest("a longer prompt", 4, 3),
            TestRequest("one token", 3, 1)]


@pytest.fixture(scope="module")
def server():
    with FakeLLMServer(first_delay=0.06, gap=0.03) as s:
        yield s


def check_timing(results, server):
    assert [r.output_len for r in results] == [r.output_len for r in REQUESTS]
    for r in results:
        assert len(r.token_timestamps) == r.output_len
        assert r.token_timestamps == sorted(r.token_timestamps)
        assert server.first_delay * 0.9 <= r.ftl < server.first_delay + 0.5
        if r.output_len > 1:
            assert server.gap * 0.7 <= r.tpot < server.gap + 0.1
        else:
            assert r.tpot == 0.0
        assert r.end_time >= r.token_timestamps[-1] and r.latency == r.end_time - r.start_time


def test_arrivals_follow_the_artifact_gamma_draw():
    np.random.seed(0)
    gaps = np.random.gamma(1.0, 1.0 / 4.0, size=6)      # cv = 1: shape 1, scale 1/rate
    offsets = bench.arrival_offsets(6, 4.0, cv=1.0, seed=0)
    assert offsets[0] == 0.0
    np.testing.assert_allclose(np.diff(offsets), gaps[:-1])
    many = np.diff(bench.arrival_offsets(20_000, 4.0, cv=2.0, seed=1))
    assert many.mean() == pytest.approx(0.25, rel=0.05)   # mean gap 1/rate
    assert many.std() / many.mean() == pytest.approx(2.0, rel=0.1)   # requested cv
    assert not bench.arrival_offsets(5, float("inf")).any()


def test_pairs_and_file_names_keep_the_rate_as_written():
    pairs = bench.parse_pairs("[(10, 1), (100, 2.0), (5, 0.75)]")
    assert [bench.exp_file_name("distserve", n, r) for n, r in pairs] == [
        "distserve-10-1.exp", "distserve-100-2.0.exp", "distserve-5-0.75.exp"]
    assert bench.parse_pairs("(3, 1.5)") == [(3, 1.5)]
    with pytest.raises(ValueError, match="num_prompts"):
        bench.parse_pairs("[(1, 2, 3)]")
    with pytest.raises(ValueError, match="Python list"):
        bench.parse_pairs("__import__('os')")


def test_distserve_backend_streams_and_times_tokens(server, tmp_path):
    server.payloads.clear()
    exp = tmp_path / "distserve-3-100.exp"
    results, failures = bench.run_benchmark("distserve", server.base_url, REQUESTS, rate=100.0,
                                            exp_path=exp, progress=False)
    assert failures == []
    check_timing(results, server)
    assert results[0].lifecycle_events == [{"timestamp": 1.0 + k, "event_type": e}
                                           for k, e in enumerate(EVENTS)]
    sent = {p["prompt"]: p for p in server.payloads}
    assert sent["hello"] == {"prompt": "hello", "n": 1, "temperature": 1.0, "top_p": 1.0,
                             "max_tokens": 5, "ignore_eos": True, "stream": True}
    assert load_exp(exp) == results


def test_openai_backend_parses_sse_and_asks_for_the_model(server):
    server.payloads.clear(), server.headers.clear()
    results, failures = bench.run_benchmark("openai", server.base_url, REQUESTS, rate=100.0,
                                            api_key="sk-test", progress=False)
    assert failures == []
    check_timing(results, server)            # the usage-only chunk is not a token
    assert all(r.lifecycle_events is None for r in results)
    assert {p["model"] for p in server.payloads} == {"fake-opt"}
    assert all(h["Authorization"] == "Bearer sk-test" for h in server.headers)


def test_failures_are_counted_not_fatal(server):
    reqs = [TestRequest("FAIL please", 2, 4), TestRequest("DROP midway", 2, 4), *REQUESTS]
    results, failures = bench.run_benchmark("distserve", server.base_url, reqs, rate=100.0,
                                            progress=False)
    assert len(results) == 3 and len(failures) == 2
    errors = " | ".join(f.error for f in failures)
    assert "HTTP 500" in errors and "fake failure" in errors
    _, failures = bench.run_benchmark("openai", server.base_url, reqs[:1], rate=100.0,
                                      model="fake-opt", progress=False)
    assert len(failures) == 1 and "fake failure" in failures[0].error
    _, failures = bench.run_benchmark("openai", server.base_url, reqs[2:3], rate=100.0,
                                      model="wrong-model", progress=False)
    assert "HTTP 404" in failures[0].error
    _, failures = bench.run_benchmark("distserve", "http://127.0.0.1:9", reqs[2:3], rate=100.0,
                                      progress=False)
    assert "ClientConnectorError" in failures[0].error


def test_requests_leave_at_their_arrival_times(server):
    reqs = [TestRequest(f"p{i}", 2, 1) for i in range(6)]
    results, _ = bench.run_benchmark("distserve", server.base_url, reqs, rate=20.0, seed=3,
                                     progress=False)
    starts = sorted(r.start_time for r in results)
    expected = bench.arrival_offsets(6, 20.0, seed=3)
    np.testing.assert_allclose(np.array(starts) - starts[0], expected, atol=0.03)


def test_cli_writes_exp_files_per_pair(server, tmp_path, capsys):
    data = tmp_path / "ds.json"
    save_dataset(Dataset("mini", [TestRequest(f"prompt {i}", 3, 2) for i in range(4)]
                         + [TestRequest("FAIL now", 3, 2)]), data)
    port = server.base_url.rsplit(":", 1)[1]
    rc = bench.main(["--backend", "distserve", "--port", port, "--host", "127.0.0.1",
                     "--dataset", str(data), "--num-prompts-req-rates", "[(5, 200), (2, 100.0)]",
                     "--exp-result-root", str(tmp_path), "--exp-result-dir", "runs",
                     "--ttft-slo", "1.0", "--tpot-slo", "1.0", "--no-progress"])
    assert rc == 0
    first = tmp_path / "runs" / "distserve-5-200.exp"
    assert len(load_exp(first)) == 4 and len(load_failures(first)) == 1
    assert len(json.loads((tmp_path / "runs" / "distserve-2-100.0.exp").read_text())) >= 1
    out = capsys.readouterr().out
    assert "failed: 1" in out and "SLO attainment: both 80.0%" in out
