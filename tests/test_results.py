"""dsjax.eval.results: per-request metrics, .exp files, attainment and summaries."""
import json
import math

import numpy as np
import pytest

from dsjax.eval.results import (EXP_FIELDS, FailedRequest, RequestResult, attainment, failures_path,
                           format_summary, load_exp, load_failures, percentile, save_exp,
                           save_failures, summarize)
from tests._bench_helpers import FIXTURES


def result(ftl: float, tpot: float, output_len: int = 3, start: float = 10.0) -> RequestResult:
    stamps = [start + ftl + i * tpot for i in range(output_len)]
    return RequestResult.from_timestamps(50, output_len, start, stamps)


def test_from_timestamps_hand_computed():
    r = RequestResult.from_timestamps(10, 3, 1.0, [1.5, 1.7, 2.1], [{"event_type": "issued"}])
    assert r.ftl == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.3)          # (2.1 - 1.5) / (3 - 1)
    assert r.latency == pytest.approx(1.1)       # end defaults to the last token
    assert r.end_time == 2.1
    assert r.lifecycle_events == [{"event_type": "issued"}]
    late = RequestResult.from_timestamps(10, 3, 1.0, [1.5, 1.7, 2.1], end_time=2.5)
    assert late.latency == pytest.approx(1.5) and late.tpot == pytest.approx(0.3)


def test_single_token_has_zero_tpot_and_no_tokens_is_an_error():
    assert RequestResult.from_timestamps(10, 1, 0.0, [0.2]).tpot == 0.0
    with pytest.raises(ValueError, match="at least one token"):
        RequestResult.from_timestamps(10, 4, 0.0, [])


def test_exp_round_trip_keeps_distserve_keys_in_order(tmp_path):
    results = [result(0.1, 0.02), RequestResult.from_timestamps(7, 2, 3.0, [3.5, 3.75],
                                                                [{"timestamp": 3.1, "event_type": "issued"}])]
    path = tmp_path / "sub" / "distserve-2-1.0.exp"
    save_exp(results, path)
    raw = json.loads(path.read_text())
    assert isinstance(raw, list) and [tuple(r) for r in raw] == [EXP_FIELDS] * 2
    assert raw[1]["lifecycle_events"] == [{"timestamp": 3.1, "event_type": "issued"}]
    assert raw[0]["lifecycle_events"] is None
    assert load_exp(path) == results


def test_load_exp_rejects_foreign_json(tmp_path):
    path = tmp_path / "x.exp"
    path.write_text(json.dumps([{"prompt_len": 1}]))
    with pytest.raises(ValueError, match="lacks"):
        load_exp(path)


def test_load_exp_reads_the_older_python_literal_format():
    [r] = load_exp(FIXTURES / "old_format.exp")
    assert (r.prompt_len, r.output_len) == (55, 4)
    assert r.ftl == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.2)          # (101.1 - 100.5) / 3
    assert r.latency == pytest.approx(1.1)


def test_failures_sidecar_round_trip_and_cleanup(tmp_path):
    exp = tmp_path / "openai-3-2.exp"
    failures = [FailedRequest(5, 6, 1.0, "HTTP 500: boom")]
    save_failures(failures, exp)
    assert load_failures(exp) == failures
    save_failures([], exp)
    assert not failures_path(exp).exists() and load_failures(exp) == []


def test_attainment_hand_computed():
    results = [result(0.1, 0.05), result(0.3, 0.05), result(0.1, 0.2), result(0.3, 0.2)]
    assert attainment(results, 0.25, 0.1) == (0.25, 0.5, 0.5)
    # failed requests miss every SLO
    assert attainment(results, 0.25, 0.1, num_failed=4) == (0.125, 0.25, 0.25)
    # the bounds are inclusive
    assert attainment([result(0.25, 0.1, output_len=2)], 0.25, 0.1)[0] == 1.0
    assert attainment([], 1.0, 1.0) == (0.0, 0.0, 0.0)


def test_percentile_matches_numpy():
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert math.isnan(percentile([], 50))


def test_summarize_and_table():
    results = [result(0.1, 0.05), result(0.3, 0.15)]
    s = summarize(results, ttft_slo=0.2, tpot_slo=0.1, num_failed=2)
    assert s["num_requests"] == 4 and s["num_failed"] == 2
    assert s["ttft"]["mean"] == pytest.approx(0.2)
    assert s["ttft"]["p50"] == pytest.approx(0.2)
    assert s["tpot"]["p90"] == pytest.approx(0.05 + 0.9 * 0.1)
    assert s["attainment"] == {"both": 0.25, "ttft": 0.25, "tpot": 0.25}
    assert "attainment" not in summarize(results)
    table = format_summary(s)
    assert "200.0" in table and "failed: 2" in table and "both 25.0%" in table
