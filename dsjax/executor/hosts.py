"""Where an instance runs, behind one interface: an `InstanceHost`.

The engine drives every executor backend the same way:

    hosts = host_backend(name).launch(config, model_config, model_dir, devices, deliver)
    host.start()          the instance loads and compiles; its messages reach `deliver`
    host.send(message)    into the instance's inbox (dropped once it has ended)
    host.health()         None while it serves (or starts); else why it ended
    host.stop()           Shutdown, a bounded wait, then whatever is left is killed; reports
                          nothing
    host.kill()           ends it now, as a fault: reports it failed

Every way an instance can end other than `stop` reaches `deliver` as exactly one
`InstanceFailed`: its worker's own fault report, its thread or process ending, its channel
raising anything at all (EOF included), or a silence past the heartbeat time-out (a frozen
process, a partitioned node). Messages that arrive after that are dropped: the router has
already failed the instance's requests.

Backends live in the control plane (they build workers): a new one is one class, named in
`BACKENDS` (or given to `register_backend`), and its test (tests/test_hosts_contract.py runs
the contract against each). Nothing here imports JAX.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import time
from typing import Callable, ClassVar

from dsjax.engine.messages import InstanceFailed, Shutdown

log = logging.getLogger("dsjax")

# backend name -> "module:Class", imported only when that backend is used (Ray is optional).
BACKENDS: dict[str, str] = {
    "uni": "dsjax.engine.instance_hosts:ThreadHost",
    "mp": "dsjax.engine.instance_hosts:ProcessHost",
    "ray": "dsjax.engine.ray_hosts:RayHost",
}
STOP_TIMEOUT_S = 10.0
HEARTBEAT_S = 0.5          # how often an instance in another process says it lives
POLL_S = 0.2               # how long a forwarder waits for news before checking the clock
# How long a remote instance may take to send its first sign of life (process start, imports;
# a Ray actor also waits for its placement, which has its own limit).
FIRST_CONTACT_TIMEOUT_S = 300.0


def register_backend(name: str, target: str) -> None:
    """Make `--distributed-executor-backend name` run instances in `target` ("module:Class",
    an InstanceHost subclass)."""
    BACKENDS[name] = target


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def host_backend(name: str) -> type[InstanceHost]:
    if name not in BACKENDS:
        raise ValueError(f"unknown executor backend {name!r}: use one of {backend_names()}, "
                         f"or register_backend() a new one")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def devices_needed(config) -> int:
    """Devices the configured placement takes, every instance together."""
    from dsjax.executor.parallel import placement_groups
    return sum(n * tp * pp for _, n, tp, pp in placement_groups(config.mode,
                                                                **config.placement_kwargs()))


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """Instance process -> its host: still here. Never reaches the router."""


class HostEnded(Exception):
    """The channel to an instance is gone for good; the message says why."""


class InstanceHost:
    """One instance's worker, wherever it runs. Subclasses implement `launch`, `_launch`,
    `_post`, `_wait_stopped` and `_terminate`; the end is reported here, once."""

    backend: ClassVar[str] = ""

    def __init__(self, plan, deliver: Callable[[object], None]):
        self.plan, self.name, self.role = plan, plan.name, plan.role
        self._deliver = deliver
        self._lock = threading.Lock()
        self._ended: str | None = None
        self._stopping = False

    @classmethod
    def launch(cls, config, model_config, model_dir, devices,
               deliver: Callable[[object], None]) -> list[InstanceHost]:
        """One host per instance of the config's placement, on what this backend runs on
        (`devices`: the engine's own, for a backend in its process), none started yet."""
        raise NotImplementedError

    # ---- the interface ------------------------------------------------------------------------

    def start(self) -> None:
        self._launch()

    def send(self, message) -> None:
        if self._ended is None:
            self._post(message)

    def health(self) -> str | None:
        return self._ended

    def stop(self) -> None:
        """Shutdown, wait for the instance to finish, kill what is left. Reports nothing."""
        with self._lock:
            self._stopping = True
        if self._ended is None:
            self._post(Shutdown())
        self._wait_stopped(STOP_TIMEOUT_S)
        self._terminate()
        self._end("stopped")

    def kill(self, why: str = "killed by the engine") -> None:
        """End the instance now, as a fault: its requests fail."""
        self._end(why)
        self._terminate()

    def pids(self) -> list[int]:
        """The instance's own processes (none for a thread of the engine's process)."""
        return []

    # ---- for subclasses -----------------------------------------------------------------------

    def _on_message(self, message) -> None:
        """Everything the instance says passes here: its own fault report ends it."""
        if isinstance(message, Heartbeat) or self._ended is not None:
            return
        if isinstance(message, InstanceFailed):
            self._end(message.error)
            return
        self._deliver(message)

    def _end(self, why: str) -> None:
        with self._lock:
            if self._ended is not None:
                return
            report = not self._stopping
            self._ended = why if report else "stopped"
        if report:
            log.error("instance %s ended: %s", self.name, why)
            self._deliver(InstanceFailed(self.name, why))

    def _launch(self) -> None:
        raise NotImplementedError

    def _post(self, message) -> None:
        raise NotImplementedError

    def _wait_stopped(self, timeout: float) -> None:
        raise NotImplementedError

    def _terminate(self) -> None:
        raise NotImplementedError


class RemoteHost(InstanceHost):
    """An instance in another process: a forwarder thread reads its channel (`_receive`) and
    watches its heartbeat. Subclasses add `_connect` (wait until it can speak) and `_receive`."""

    def __init__(self, plan, deliver, heartbeat_timeout: float):
        super().__init__(plan, deliver)
        self.heartbeat_timeout = heartbeat_timeout
        self._forwarder = threading.Thread(target=self._forward, daemon=True,
                                           name=f"dsjax-{plan.name}-forward")

    def start(self) -> None:
        self._launch()
        self._forwarder.start()

    def _wait_stopped(self, timeout: float) -> None:
        if self._forwarder.is_alive():
            self._forwarder.join(timeout)

    def _forward(self) -> None:
        try:
            self._connect()
            self._pump()
        except Exception as e:  # noqa: BLE001 - whatever ends the channel ends the instance
            self._end(str(e) if isinstance(e, HostEnded) else
                      f"its channel failed: {type(e).__name__}: {e}")
        finally:
            if not self._stopping:
                self._terminate()

    def _pump(self) -> None:
        """Forward messages until the channel ends; silence past the time-out ends it."""
        heard, limit = time.monotonic(), FIRST_CONTACT_TIMEOUT_S
        while self._ended is None:
            messages = self._receive(POLL_S)
            now = time.monotonic()
            if messages is None:
                if now - heard > limit:
                    raise HostEnded(f"silent for {now - heard:.1f} s (heartbeat time-out "
                                    f"{limit:g} s): its process is frozen or unreachable")
                continue
            heard, limit = now, self.heartbeat_timeout
            for message in messages:
                self._on_message(message)

    def _connect(self) -> None:
        """Wait until the instance can speak (raise HostEnded if it never will)."""

    def _receive(self, timeout: float) -> list | None:
        """Messages from the instance ([]: alive, no news) or None when nothing came within
        `timeout`; raises when the channel is gone."""
        raise NotImplementedError


def start_heartbeat(send: Callable[[object], None], on_broken: Callable[[], None]) -> None:
    """In an instance's process: tell the host it lives every HEARTBEAT_S; `on_broken` runs
    once the channel back is gone (nobody reads this instance any more)."""
    def beat():
        while True:
            time.sleep(HEARTBEAT_S)
            try:
                send(Heartbeat())
            except (OSError, EOFError, ValueError):
                on_broken()
                return
    threading.Thread(target=beat, daemon=True, name="dsjax-heartbeat").start()
