"""Two hosts on one machine: Linux network namespaces joined by a veth pair, each a Ray node.

Host A (namespace `<tag>a`, 10.77.0.1) runs the Ray head and, later, the engine and its HTTP
server; host B (`<tag>b`, 10.77.0.2) runs a Ray worker node. Each node is started with its own
`--node-ip-address`, and every Ray process shares one cluster token (Ray 2.60 turns token
authentication on for new clusters: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH). Traffic between
them crosses the veth pair only, so `tc` shapes it and `ip link set ... down` cuts it. Needs
root (`ip netns`). Everything started in a namespace is killed by its pid and the namespaces
are deleted on exit.

    with TwoHosts(workdir) as hosts:
        server = hosts.serve(["--model", ..., "--config", "plan.toml"])
        results = hosts.client(server_url, prompts, max_tokens)

`python benchmarks/netns_hosts.py client URL ...` is the HTTP client the tests run inside
host A (streams each prompt through POST /generate; prints one JSON object).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IPS = {"a": "10.77.0.1", "b": "10.77.0.2"}
RAY_PORT = 6379
HTTP_PORT = 8400
START_TIMEOUT_S = 300.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def rate_bytes_per_s(rate: str) -> float:
    """A tc rate ("10gbit", "500mbit") in bytes per second."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    unit = next((u for u in units if rate.endswith(u)), None)
    if unit is None:
        raise ValueError(f"rate {rate!r}: give it as NUMBER gbit, mbit or kbit")
    return float(rate[:-len(unit)]) * units[unit] / 8


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TwoHosts:
    """The two namespaces, their veth link and a Ray node in each."""

    def __init__(self, workdir: Path, cpus_per_host: int = 4, env: dict | None = None):
        tag = f"dsj{os.getpid() % 100000}"      # unique per run: runs may overlap
        self.ns = {h: f"{tag}{h}" for h in "ab"}
        self.dev = {h: f"{tag}v{h}" for h in "ab"}
        self.workdir = Path(workdir)
        self.cpus = cpus_per_host
        self.token = self.workdir / "ray_auth_token"
        # Ray's sockets live under its temp dir and a socket path has at most 107 bytes.
        self.raydir = Path(tempfile.mkdtemp(prefix=f"{tag}-ray-"))
        self.ray_address = f"{IPS['a']}:{RAY_PORT}"
        # Every process in either host: the same code, the same cluster token.
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(self.token), "RAY_USAGE_STATS_ENABLED": "0",
                    # Every actor's log line reaches the server's log, at once.
                    "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(
                        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}

    # ---- the hosts ----------------------------------------------------------------------------

    def __enter__(self) -> TwoHosts:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        for h in "ab":
            ip("netns", "add", self.ns[h])
        ip("link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"])
        for h in "ab":
            ip("link", "set", self.dev[h], "netns", self.ns[h])
            ip("-n", self.ns[h], "addr", "add", f"{IPS[h]}/24", "dev", self.dev[h])
            ip("-n", self.ns[h], "link", "set", "lo", "up")
            ip("-n", self.ns[h], "link", "set", self.dev[h], "up")
        self.start_node("a")
        self.start_node("b")
        self.wait_for_nodes(2)

    def start_node(self, host: str) -> None:
        """`ray start` in the host's namespace: the head on A, a worker node on B."""
        role = ["--head", "--port", str(RAY_PORT), "--include-dashboard", "false"] \
            if host == "a" else ["--address", self.ray_address]
        self.run(host, ["ray", "start", *role, "--node-ip-address", IPS[host],
                        "--num-cpus", str(self.cpus), "--object-store-memory", str(200 << 20),
                        "--temp-dir", str(self.raydir / host),
                        "--disable-usage-stats"], timeout=START_TIMEOUT_S)

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        code = ("import ray, time, sys\n"
                f"ray.init(address='{self.ray_address}', logging_level='ERROR')\n"
                f"deadline = time.time() + {timeout}\n"
                f"while sum(n['Alive'] for n in ray.nodes()) != {count}:\n"
                "    if time.time() > deadline: sys.exit('nodes: ' + repr(ray.nodes()))\n"
                "    time.sleep(0.5)\n")
        self.run("a", [sys.executable, "-c", code], timeout=timeout + 60)

    def exec(self, host: str, argv: list[str], **popen) -> subprocess.Popen:
        """A process started in the host's namespace (with the cluster's environment)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv], env=self.env,
                                cwd=ROOT, **popen)

    def run(self, host: str, argv: list[str], timeout: float) -> str:
        p = self.exec(host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise TimeoutError(f"{argv[:3]} on host {host} ran past {timeout} s: {err[-2000:]}")
        if p.returncode:
            raise RuntimeError(f"{argv[:3]} on host {host} exited {p.returncode}: "
                               f"{err[-3000:]}")
        return out

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns[host]], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split() if alive(int(p))]

    def titled(self, host: str, prefix: str) -> list[int]:
        """Pids in the host whose command line starts so (Ray titles workers by actor class)."""
        return [p for p in self.pids(host) if cmdline(p).startswith(prefix)]

    def kill(self, pids: list[int], timeout: float = 30.0) -> None:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def power_off(self, host: str) -> None:
        """Every process of the host dies at once: its Ray node and every actor on it."""
        for _ in range(5):   # a dying raylet may still be starting workers
            pids = self.pids(host)
            if not pids:
                return
            self.kill(pids)

    def link(self, up: bool) -> None:
        """Bring the veth link between the hosts up or down (both ends)."""
        for h in "ab":
            ip("-n", self.ns[h], "link", "set", self.dev[h], "up" if up else "down")

    def shape(self, rate: str | None = None, delay: str | None = None) -> None:
        """Limit each direction of the link: a token bucket at `rate` (e.g. "10gbit"), or with
        a `delay` (e.g. "1ms") netem, which not every kernel has. No arguments: no limit."""
        for h in "ab":
            subprocess.run(["ip", "netns", "exec", self.ns[h], "tc", "qdisc", "del", "dev",
                            self.dev[h], "root"], capture_output=True)
            if not (rate or delay):
                continue
            if delay:
                qdisc = ["netem", "limit", "100000", "delay", delay] + \
                    (["rate", rate] if rate else [])
            else:   # a burst of 1 ms of traffic (at least 64 KiB: a GSO segment)
                burst = max(64 << 10, int(rate_bytes_per_s(rate) / 1000))
                qdisc = ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
            done = subprocess.run(["ip", "netns", "exec", self.ns[h], "tc", "qdisc", "add",
                                   "dev", self.dev[h], "root", *qdisc],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"tc qdisc {qdisc[0]} on {self.dev[h]}: "
                                   f"{done.stderr.strip()}" + (
                                       " (this kernel has no netem: shape without a delay)"
                                       if "unknown" in done.stderr and delay else ""))

    def down(self) -> None:
        """Kill everything in both namespaces, delete them (and with them the veth pair)."""
        for h in "ab":
            if Path(f"/run/netns/{self.ns[h]}").exists():
                self.power_off(h)
                subprocess.run(["ip", "netns", "del", self.ns[h]], capture_output=True)
        shutil.rmtree(self.raydir, ignore_errors=True)

    # ---- the engine on host A -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{IPS['a']}:{HTTP_PORT}"

    def serve(self, args: list[str], log: Path) -> subprocess.Popen:
        """`python -m serving` on host A, joined to the cluster, ready when /health says ok."""
        out = open(log, "w")
        server = self.exec("a", [sys.executable, "-m", "serving", "--host", IPS["a"],
                                 "--port", str(HTTP_PORT), "--ray-address", self.ray_address,
                                 "--distributed-executor-backend", "ray", "--no-log-status",
                                 "--skip-warmup", *args], stdout=out, stderr=subprocess.STDOUT)
        server.log_path = log
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited {server.returncode}: "
                                   f"{log.read_text()[-3000:]}")
            try:
                if self.get("/health", timeout=5)["status"] == "ok":
                    return server
            except (OSError, RuntimeError, ValueError, KeyError):
                pass
            time.sleep(1.0)
        self.stop_server(server)
        raise TimeoutError(f"the server on host A was not ready in {START_TIMEOUT_S} s: "
                           f"{log.read_text()[-3000:]}")

    def stop_server(self, server: subprocess.Popen, timeout: float = 60.0) -> None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    def get(self, path: str, timeout: float = 10.0):
        """GET on the server from inside host A: JSON, or the text of /metrics."""
        code = (f"import urllib.request, urllib.error, sys\n"
                f"try:\n    r = urllib.request.urlopen('{self.url}{path}', timeout={timeout})\n"
                f"except urllib.error.HTTPError as e:\n    r = e\n"
                f"sys.stdout.write(r.read().decode())\n")
        out = self.run("a", [sys.executable, "-c", code], timeout=timeout + 30)
        return out if path == "/metrics" else json.loads(out)

    def client(self, prompts: list, max_tokens: int, **popen) -> subprocess.Popen:
        """The streaming client on host A (see `client_main`); its stdout is line-buffered."""
        return self.exec("a", [sys.executable, str(Path(__file__).resolve()), "client",
                               self.url, json.dumps(prompts), str(max_tokens)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                         **popen)

    def blocks_in_use(self) -> dict[str, float]:
        """KV blocks each live instance holds, from /metrics (failed instances' gauges are
        their last report: left out)."""
        failed = {n for n, s in self.get("/health")["instances"].items() if s != "ok"}
        used = {}
        for line in self.get("/metrics").splitlines():
            if line.startswith("dsjax_kv_blocks_used{"):
                name = line.split('instance="')[1].split('"')[0]
                if name not in failed:
                    used[name] = float(line.rsplit(" ", 1)[1])
        return used


def searched_plan(out: Path) -> str:
    """The placement search's plan for 2 hosts x 2 devices at low node affinity (a prefill and
    a decode instance per host; "#0" is host A, the first address), without its model and
    batch limits (the caller's)."""
    subprocess.run([sys.executable, "-m", "dsjax.placement", "--model", "opt-125m",
                    "--ttft-slo", "1", "--tpot-slo", "0.1", "--num-nodes", "2",
                    "--gpus-per-node", "2", "--affinity", "low", "--modes", "disaggregated",
                    "--num-prompts", "100", "--jobs", "1", "--output", str(out)],
                   check=True, capture_output=True, timeout=600, cwd=ROOT)
    keep = [line for line in out.read_text().splitlines()
            if not line.startswith(("model", "context_max", "decoding_max"))]
    return "\n".join(keep) + "\n"


def client_main(url: str, prompts: list, max_tokens: int, timeout: float = 180.0) -> None:
    """Stream every prompt at once through /generate (greedy). Prints "FIRST" once each has
    its first token (or has failed), then one JSON list: per prompt, its token ids, when each
    arrived, when it ended, and the error it ended with (None), "hung" if it neither finished
    nor failed within `timeout`."""
    results = [{"tokens": [], "times": [], "error": None} for _ in prompts]
    first = [threading.Event() for _ in prompts]

    def one(i: int) -> None:
        body = json.dumps({"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True}).encode()
        req = urllib.request.Request(f"{url}/generate", body,
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                for line in r:
                    record = json.loads(line)
                    if "error" in record:
                        results[i]["error"] = record["error"]
                        break
                    results[i]["tokens"].append(record["token_id"])
                    results[i]["times"].append(time.time())
                    first[i].set()
                    if record.get("finished"):
                        break
                else:
                    results[i]["error"] = results[i]["error"] or "stream ended unfinished"
        except Exception as e:  # noqa: BLE001 - reported, not raised: the caller judges it
            results[i]["error"] = "hung" if "timed out" in str(e) else f"{type(e).__name__}: {e}"
        results[i]["end"] = time.time()
        first[i].set()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for f in first:
        f.wait(timeout)
    print("FIRST", flush=True)
    for t in threads:
        t.join(timeout)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="the two-host client (runs inside host A)")
    p.add_argument("command", choices=["client"])
    p.add_argument("url")
    p.add_argument("prompts", help="JSON list of token-id lists")
    p.add_argument("max_tokens", type=int)
    a = p.parse_args()
    client_main(a.url, json.loads(a.prompts), a.max_tokens)
