"""Recording a decode step's tokens (InstanceWorker._record) against the stop rules written
out by hand (vLLM's: eos and stop ids after min_tokens, max_tokens counting the tokens of a
recomputed sequence), for a batch of plain rows, the decode loop's usual case: one report of
columns, each finish keyed by its row in the report, and a row whose check fails left out of
the report and failed alone."""
from __future__ import annotations

import functools
import types

from dsjax import SamplingParams
from dsjax.engine.messages import RequestSpec
from dsjax.engine.request import Request
from dsjax.engine.worker import InstanceWorker

EOS = 2


def _request(rid, generated=(), prior=(), **params):
    spec = RequestSpec(rid, (5, 6) + tuple(prior), SamplingParams(temperature=0, **params), 0,
                       prior_output=tuple(prior))
    return Request(spec, EOS, tuple(generated))


def _recorder():
    failed = []
    worker = types.SimpleNamespace(_tokens=[], tokens_out=0,
                                   _fail=lambda rid, e: failed.append((rid, str(e))))
    worker._record_plain = functools.partial(InstanceWorker._record_plain, worker)
    worker._check_rich = functools.partial(InstanceWorker._check_rich, worker)
    worker._report_tokens = functools.partial(InstanceWorker._report_tokens, worker)
    worker.tokenizer = None
    return worker, failed


def test_a_step_of_plain_rows_finishes_and_fails_rows_by_the_stop_rules():
    rows = [
        (_request("length", generated=(9, 9, 9, 9), max_tokens=5), 11, "length"),
        (_request("stop id", max_tokens=9, stop_token_ids=[7]), 7, "stop"),
        (_request("too early", max_tokens=9, stop_token_ids=[7], min_tokens=3), 7, None),
        (_request("eos ignored", max_tokens=9, ignore_eos=True), EOS, None),
        (_request("broken", max_tokens=9), EOS, "fails"),
        (_request("eos", max_tokens=9), EOS, "stop"),
        (_request("recomputed", prior=(8, 8, 8), max_tokens=4), 12, "length"),
        (_request("runs on", max_tokens=9), 13, None),
    ]
    broken = rows[4][0]

    def fail(token_id, num_generated):
        raise KeyError("injected check fault")
    broken.stop_checker.check_token = fail
    worker, failed = _recorder()
    requests = [r for r, _, _ in rows]
    finished = InstanceWorker._record(worker, requests, [t for _, t, _ in rows],
                                      [-0.5 * i for i in range(len(rows))])

    kept = [(r, t, why) for r, t, why in rows if why != "fails"]
    (report,) = worker._tokens
    assert report.request_ids == tuple(r.request_id for r, _, _ in kept)
    assert report.token_ids == tuple(t for _, t, _ in kept)
    assert report.logprobs == tuple(-0.5 * i for i, (_, _, why) in enumerate(rows)
                                    if why != "fails")
    assert report.finish_reasons == {i: why for i, (_, _, why) in enumerate(kept) if why}
    assert report.top_logprobs is None
    assert finished == [r for r, _, why in kept if why]
    assert failed == [("broken", "'injected check fault'")]
    assert worker.tokens_out == len(kept)
    for r, t, _ in rows:   # every row's token is the request's newest
        assert r.output_token_ids[-1] == t


def test_a_step_with_a_rich_row_reports_the_same_columns():
    """A row that asks for log-probabilities takes the general path for the whole step; its
    columns follow the same rules (and carry the chosen token's log-probability)."""
    rows = [(_request("eos", max_tokens=9), EOS, "stop"),
            (_request("rich", max_tokens=1, logprobs=0), 13, "length"),
            (_request("runs on", max_tokens=9), 14, None)]
    worker, failed = _recorder()
    finished = InstanceWorker._record(worker, [r for r, _, _ in rows],
                                      [t for _, t, _ in rows], [-1.0, -2.0, -3.0])
    (report,) = worker._tokens
    assert report.token_ids == (EOS, 13, 14)
    assert report.finish_reasons == {0: "stop", 1: "length"}
    assert report.top_logprobs == (None, {13: -2.0}, None)
    assert finished == [rows[0][0], rows[1][0]] and not failed
