"""What clients are told when instances fail (issue 18): 503, not 500, for a request an
instance's death took; Retry-After only where a retry can be served; a failed instance's
gauges at 0 in /metrics, not frozen at its last report. The module's engine (conftest's `loop`,
one per module) is the one whose decode instance the last test kills."""
from __future__ import annotations

import json
import threading

from dsjax.engine.core import EngineError
from tests._server_helpers import EngineProxy, parse_metrics

LONG = {"prompt": "The capital of France is", "max_tokens": 1500, "ignore_eos": True}


def running(engine, instance: str) -> int:
    return next(s["running"] for s in engine.stats() if s["instance"] == instance)


def sse_events(resp) -> list[str]:
    return [e for e in resp.read().decode().split("\n\n") if e]


class DyingInstance(EngineProxy):
    """The real engine, but every request fails after its first output, as when the instance
    holding it dies; health() then names that instance failed while the engine serves on."""

    def __init__(self, engine):
        super().__init__(engine)
        self.died = False

    def health(self):
        state = self._engine.health()
        if self.died:
            state = {**state, "instances": {**state["instances"], "decode1": "failed: gone"}}
        return state

    def add_request(self, prompt, params, on_output=None, stream=True, **kwargs):
        failed = []

        def relay(output):
            if failed:
                return
            if isinstance(output, BaseException) or output.finished:
                on_output(output)
                return
            failed.append(True)
            if stream:
                on_output(output)
            self.died = True
            on_output(EngineError("request failed: instance decode1 stopped (gone)"))
        return self._engine.add_request(prompt, params, on_output=relay, stream=True, **kwargs)


def test_a_request_an_instance_death_took_is_503_with_retry_while_peers_serve(loop):
    served = loop.serve(DyingInstance(loop.engine))
    status, resp, answer = served.post("/generate", LONG)
    assert status == 503 and resp.getheader("Retry-After") == "1"
    assert "an instance stopped while serving this request; retry" in answer["error"]
    served.engine.died = False
    conn, resp = served.open_stream("/v1/completions", {**LONG, "stream": True})
    events = sse_events(resp)
    conn.close()
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == 503 and events[-1] == "data: [DONE]"


def test_the_last_decode_instance_dying_fails_the_engine_for_good(loop):
    engine = loop.engine
    served = loop.serve()
    conn, resp = served.open_stream("/v1/completions", {**LONG, "stream": True})
    assert resp.readline().startswith(b"data: ")              # decoding in decode0
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(served.post("/generate", LONG)))
    waiter.start()
    deadline = threading.Event()
    while running(engine, "decode0") < 2 and not deadline.wait(0.02):
        pass
    runner = engine.local_worker("decode0").runner

    def device_lost(*args, **kwargs):
        runner.healthy = lambda: False
        raise RuntimeError("INTERNAL: injected device fault")
    runner.dispatch_decode = device_lost

    error = json.loads([e for e in sse_events(resp) if '"error"' in e][0][len("data: "):])
    conn.close()
    assert error["error"]["code"] == 503 and "restart it" in error["error"]["message"]
    waiter.join(120)
    status, resp, answer = answers[0]
    assert status == 503 and resp.getheader("Retry-After") is None
    status, resp, answer = served.post("/generate", {"prompt": "hi"})
    assert status == 503 and resp.getheader("Retry-After") is None
    assert "restart the server" in answer["error"] and "decode0" in answer["error"]
    assert served.request("GET", "/health")[0] == 503

    samples = parse_metrics(served.request("GET", "/metrics")[2])
    by_instance = {name: {s[0]["instance"]: s[1] for s in samples[name]}
                   for name in ("dsjax_instance_up", "dsjax_requests_running",
                                "dsjax_kv_blocks_used")}
    assert by_instance["dsjax_instance_up"] == {"prefill0": 1, "decode0": 0}
    assert by_instance["dsjax_requests_running"]["decode0"] == 0
    assert by_instance["dsjax_kv_blocks_used"]["decode0"] == 0
    refused = {s[0]["reason"]: s[1] for s in samples["dsjax_admission_rejections_total"]}
    assert refused["engine_failed"] == 1
