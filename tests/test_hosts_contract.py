"""The instance-host contract (dsjax.executor.hosts), one test per behaviour, each run against
every backend: a thread ("uni"), an OS process ("mp") and a Ray actor ("ray").

A host is driven here as the router drives it, by messages alone: a colocated instance of a
transformers-written checkpoint. Faults are real: SIGKILL and SIGSTOP of the instance's
process, a closed or cancelled channel, an exception escaping the thread.
"""
from __future__ import annotations

import os
import queue
import signal
import time

import pytest

from dsjax import SamplingParams
from dsjax.config import EngineConfig
from dsjax.engine.core import resolve_model
from dsjax.engine.messages import (AddRequest, InstanceFailed, InstanceReady, Report,
                                   RequestSpec)
from dsjax.executor.hosts import host_backend
from tests._engine_helpers import TINY
from tests._hf_helpers import hf_greedy
from tests.conftest import engine_prompts

BACKENDS = ("uni", "mp", "ray")
MAX_NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


class Router:
    """The router's side of one host: every message it delivers, in order."""

    def __init__(self):
        self.messages: queue.Queue = queue.Queue()
        self.seen: list = []

    def __call__(self, message) -> None:
        self.messages.put(message)

    def next(self, kind, timeout: float = 120.0):
        """The next message of `kind` (the ones before it are kept in `seen`)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            self.seen.append(message)
            if isinstance(message, kind):
                return message

    def failures_within(self, seconds: float) -> list[InstanceFailed]:
        """Every InstanceFailed delivered from now until `seconds` have passed."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.messages.get(timeout=0.05))
            except queue.Empty:
                pass
        return [m for m in self.seen if isinstance(m, InstanceFailed)]


def start_host(backend: str, request, model_dir, **overrides):
    """A started colocated host of `backend`, ready to serve; stopped after the test."""
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    config = EngineConfig(**{**TINY, "model": str(model_dir), "load_format": "auto",
                             "mode": "colocated", "distributed_executor_backend": backend,
                             **overrides})
    model_config, model_dir = resolve_model(config.model, config.load_format)
    router = Router()
    [host] = host_backend(backend).launch(config, model_config, model_dir, None, router)
    host.start()
    request.addfinalizer(host.stop)
    ready = router.next((InstanceReady, InstanceFailed), timeout=300)
    assert isinstance(ready, InstanceReady), ready
    return host, router


def add(host, rid: str, prompt, params) -> None:
    host.send(AddRequest(RequestSpec(rid, tuple(prompt), params, 0)))


def tokens_until_done(router: Router, rids, timeout: float = 120.0) -> dict[str, list[int]]:
    out = {rid: [] for rid in rids}
    done: set[str] = set()
    while done != set(rids):
        for step in router.next(Report, timeout).tokens:
            for row, (rid, token) in enumerate(zip(step.request_ids, step.token_ids)):
                out[rid].append(token)
                if row in step.finish_reasons:
                    done.add(rid)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(host, pids, timeout: float = 30.0) -> None:
    """Nothing of the instance is left: its processes (or, for a thread, the thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        thread = getattr(host, "_thread", None)
        if not left and not (thread and thread.is_alive()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{host.name} left processes {left} or its thread")


def exactly_one_failure(router: Router, settle: float = 1.5) -> InstanceFailed:
    first = router.next(InstanceFailed, timeout=60)
    failures = router.failures_within(settle)
    assert failures == [first], f"reported {len(failures)} times: {failures}"
    return first


@pytest.fixture(scope="module", params=BACKENDS)
def served(request, hf_opt):
    """One host per backend that serves the whole module's non-destructive tests."""
    return (request.param, *start_host(request.param, request, hf_opt[1]))


def test_serves_requests_sent_as_messages(served, hf_opt):
    """start, send, receive: greedy tokens equal transformers', streamed back as Reports."""
    _, host, router = served
    prompts = engine_prompts()[:3]
    for i, p in enumerate(prompts):
        add(host, f"r{i}", p, GREEDY)
    got = tokens_until_done(router, [f"r{i}" for i in range(len(prompts))])
    assert [got[f"r{i}"] for i in range(len(prompts))] == \
        [hf_greedy(hf_opt[0], p, MAX_NEW) for p in prompts]
    assert host.health() is None


def test_stop_is_quiet_and_leaves_nothing(served):
    """stop: no failure reported, health says stopped, nothing of the instance left, and a
    message sent afterwards is dropped."""
    backend, host, router = served
    pids = host.pids()
    assert len(pids) == (0 if backend == "uni" else 1) and os.getpid() not in pids
    host.stop()
    assert host.health() == "stopped"
    wait_gone(host, pids)
    add(host, "late", [5, 6], GREEDY)
    assert router.failures_within(1.0) == []


def busy_host(backend: str, request, model_dir):
    """A host with a long request running: (host, router, the instance's pids)."""
    host, router = start_host(backend, request, model_dir)
    pids = host.pids()
    add(host, "r", engine_prompts()[0], LONG)
    router.next(Report)
    return host, router, pids


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_reports_failed_once(backend, request, hf_opt):
    host, router, pids = busy_host(backend, request, hf_opt[1])
    host.kill("killed by the test")
    assert exactly_one_failure(router).error == "killed by the test"
    assert host.health() == "killed by the test"
    wait_gone(host, pids)


def crash(backend: str, host) -> str:
    """End the instance from inside, as a fault would; returns what the report must say."""
    if backend == "uni":   # an exception the worker loop does not contain escapes its thread
        def fatal():
            raise SystemExit("injected")
        host.worker.step = fatal
        return "its thread raised SystemExit: injected"
    os.kill(host.pids()[0], signal.SIGKILL)
    return "exited (code -9)" if backend == "mp" else "its Ray actor died"


@pytest.mark.parametrize("backend", BACKENDS)
def test_death_reports_failed_once(backend, request, hf_opt):
    """The thread or process ends under load (EOF on the mp pipe, a dead Ray actor)."""
    host, router, pids = busy_host(backend, request, hf_opt[1])
    expected = crash(backend, host)
    assert expected in exactly_one_failure(router).error
    wait_gone(host, pids)


def break_channel(backend: str, host, router: Router) -> str:
    """Make the channel from the instance raise; returns what the report must say."""
    if backend == "uni":   # the delivery callback raises once, inside the worker's thread
        deliver = router.__call__

        def broken(message):
            router.__call__ = deliver
            raise ConnectionResetError("injected")
        router.__call__ = broken
        host._deliver = lambda m: router.__call__(m)
        return "its thread raised ConnectionResetError: injected"
    if backend == "mp":    # the engine's end of the pipe closes under the forwarder
        host._conn.close()
        return "its channel failed: OSError"
    import ray             # a Ray error other than RayActorError: the pending take is cancelled
    deadline = time.monotonic() + 10
    while host._pending is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ray.cancel(host._pending, force=False)
    return "its channel failed: TaskCancelledError"


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_error_reports_failed_once(backend, request, hf_opt):
    host, router = start_host(backend, request, hf_opt[1])
    pids = host.pids()
    expected = break_channel(backend, host, router)
    add(host, "r", engine_prompts()[0], LONG)
    assert expected in exactly_one_failure(router).error
    wait_gone(host, pids)


# A thread host has no heartbeat: it cannot fall silent without the engine's own process.
@pytest.mark.parametrize("backend", ("mp", "ray"))
def test_silence_past_heartbeat_reports_failed_once(backend, request, hf_opt):
    """SIGSTOP the instance's process: its heartbeat stops; after the time-out it is failed,
    and killed, stopped as it is."""
    host, router = start_host(backend, request, hf_opt[1], instance_heartbeat_timeout=2.0)
    pids = host.pids()
    os.kill(pids[0], signal.SIGSTOP)
    stopped_at = time.monotonic()
    failure = exactly_one_failure(router)
    assert "silent for" in failure.error and "heartbeat time-out 2 s" in failure.error
    assert 2.0 <= time.monotonic() - stopped_at
    wait_gone(host, pids)


ORPHAN = """
import sys, time, queue
from dsjax.config import EngineConfig
from dsjax.engine.core import resolve_model
from dsjax.engine.messages import InstanceReady
from dsjax.executor.hosts import host_backend
from tests._engine_helpers import TINY
if __name__ == "__main__":
    config = EngineConfig(**{**TINY, "mode": "colocated", "distributed_executor_backend": "mp",
                             "compilation_cache_dir": sys.argv[1]})
    inbox = queue.Queue()
    [host] = host_backend("mp").launch(config, *resolve_model(config.model, "dummy"), None,
                                       inbox.put)
    host.start()
    while not isinstance(inbox.get(timeout=300), InstanceReady):
        pass
    print(host.pids()[0], flush=True)
    time.sleep(300)
"""


def test_mp_instance_exits_with_the_engine_process(tmp_path):
    """Repro t7_mp_orphans (../shared/repros).
    SIGKILL the engine's process: its mp instance process exits within a heartbeat or two
    (its pipe back breaks), not minutes later. (A Ray actor dies with its owner by Ray.)"""
    import subprocess
    import sys

    import jax
    script = tmp_path / "engine.py"
    script.write_text(ORPHAN)
    engine = subprocess.Popen([sys.executable, str(script), jax.config.jax_compilation_cache_dir],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        child = int(engine.stdout.readline())
        assert alive(child)
        engine.kill()
        engine.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the instance process outlived its engine"
    finally:
        engine.kill()
