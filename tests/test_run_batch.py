"""`python -m serving.run_batch`: OpenAI batch files answered as the HTTP server answers them,
in input order, surviving SIGKILL and SIGTERM at several points, and split into shards.

The reference for every answer is the HTTP server itself (same engine settings, same bodies
POSTed to it); the kill tests compare a killed-and-resumed run, line by line, with an
uninterrupted one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from benchmarks import batch_kill_resume
from benchmarks.batch_kill_resume import answers, committed_lines, written_lines
from serving.batch_runner import BatchOptions, run_batch
from serving.run_batch import main as run_batch_main
from tests._server_helpers import ServerLoop, tiny_engine

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|a|>"
GREEDY = {"temperature": 0, "ignore_eos": True}
# The batch job's default mode, and decode batches padded to 8 rows: fewer programs to compile
# (the subprocesses use the same, and find them in the session's compilation cache).
FEW_PROGRAMS = {"mode": "colocated", "min_decode_rows": 8}

# (url, body): answered 200 by the server.
GOOD = [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12, **GREEDY}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi there"}],
                              "max_tokens": 10, **GREEDY}),
    ("/v1/completions", {"prompt": [2, 100, 200, 300], "max_tokens": 9, **GREEDY}),
    ("/v1/completions", {"prompt": ["Once upon", "a time"], "max_tokens": 7, "n": 2,
                         "temperature": 0.9, "seed": 5, "ignore_eos": True}),
    ("/v1/completions", {"model": "opt-tiny", "prompt": "Echo me", "echo": True, "logprobs": 2,
                         "max_tokens": 5, **GREEDY}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Why?"}],
                              "logprobs": True, "top_logprobs": 2,
                              "max_completion_tokens": 8, **GREEDY}),
    ("/v1/completions", {"prompt": "Stop early", "max_tokens": 30, "stop_token_ids": [5],
                         "temperature": 0}),
]
# (url, body): refused by the server's own checks (its status and error object are expected).
BAD_BODIES = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}),
    ("/v1/chat/completions", {"max_tokens": 4}),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}),
]
# (raw line, custom_id the output names, param): refused before any endpoint sees the body.
MALFORMED = [
    (b'{"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": {"prompt": ',
     None, None),
    (b'["a", "list"]', None, None),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}).encode(), None,
     "custom_id"),
    (json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions",
                 "body": {"prompt": "x"}}).encode(), "get", "method"),
    (json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings",
                 "body": {"input": "x"}}).encode(), "emb", "url"),
    (json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions",
                 "body": "prompt"}).encode(), "nobody", "body"),
    (json.dumps({"custom_id": "stream", "method": "POST", "url": "/v1/completions",
                 "body": {"prompt": "x", "stream": True}}).encode(), "stream", "stream"),
]


def request_line(custom_id: str, url: str, body: dict) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": body}).encode()


def build_input(path: Path) -> list[tuple[str | None, tuple | None]]:
    """Writes the batch file: good, bad-body and malformed lines interleaved, blank lines
    between. Returns, per request line, (custom_id, (url, body) or None)."""
    lines, expected = [], []
    requests = [(f"good-{i}", u, b) for i, (u, b) in enumerate(GOOD)]
    requests += [(f"bad-{i}", u, b) for i, (u, b) in enumerate(BAD_BODIES)]
    malformed = list(MALFORMED)
    for i, (custom_id, url, body) in enumerate(requests):
        lines.append(request_line(custom_id, url, body))
        expected.append((custom_id, (url, body)))
        if i % 2 and malformed:
            raw, cid, _ = malformed.pop(0)
            lines.append(raw)
            expected.append((cid, None))
        if i % 5 == 4:
            lines.append(b"   ")    # blank: no request, no output line
    for raw, cid, _ in malformed:
        lines.append(raw)
        expected.append((cid, None))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def normalized(body: dict) -> dict:
    """A body without what differs between two answers of the same request: ids, times, and
    how much of the prompt the prefix cache held (which depends on what ran before)."""
    out = {k: v for k, v in body.items() if k not in ("id", "created")}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items() if k != "prompt_tokens_details"}
    return out


def same(a, b) -> bool:
    """Equal JSON, floats to 1e-4: log-probabilities move in their last bits with the batch a
    request shares a step with (tokens, texts and counts must match exactly)."""
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-4, abs=1e-4)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("batch-tokenizer")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def loop(tokenizer_dir):
    engine = tiny_engine(tokenizer=str(tokenizer_dir), **FEW_PROGRAMS)
    server_loop = ServerLoop(engine)
    yield server_loop
    server_loop.close()
    engine.shutdown()


@pytest.fixture(scope="module")
def batch(loop, tmp_path_factory):
    """(input path, expected lines, output path, summary) of one uninterrupted in-process run
    on the server's own engine."""
    directory = tmp_path_factory.mktemp("batch")
    source = directory / "input.jsonl"
    expected = build_input(source)
    output = directory / "output.jsonl"
    summary = run_batch(loop.engine, BatchOptions(str(source), str(output), window=4,
                                                  checkpoint_interval=0.05,
                                                  progress_bar=False,
                                                  metrics_file=str(directory / "m.prom")))
    return source, expected, output, summary


def test_one_output_line_per_request_line_in_input_order(batch):
    _, expected, output, summary = batch
    lines = read_output(output)
    assert [o["custom_id"] for o in lines] == [cid for cid, _ in expected]
    assert summary["complete"] and summary["error"] is None
    assert (summary["succeeded"], summary["failed"]) == (len(GOOD),
                                                         len(BAD_BODIES) + len(MALFORMED))


def test_every_answer_is_the_http_servers_answer(loop, batch):
    """Good bodies and bodies the server refuses: same status, same JSON (ids and times
    aside), greedy and seeded outputs included."""
    _, expected, output, _ = batch
    server = loop.serve()
    for (custom_id, request), line in zip(expected, read_output(output)):
        if request is None:
            continue
        url, body = request
        status, _, answer = server.post(url, body)
        assert line["response"]["status_code"] == status, (custom_id, answer)
        assert same(normalized(line["response"]["body"]), normalized(answer)), custom_id
        if status == 200:
            assert line["error"] is None
            assert line["response"]["request_id"] == line["response"]["body"]["id"]
        else:
            assert line["error"] == answer["error"], custom_id


def test_malformed_lines_get_error_lines_naming_the_problem(batch):
    _, expected, output, _ = batch
    by_id = {}
    for (cid, request), line in zip(expected, read_output(output)):
        if request is None:
            by_id.setdefault(cid, []).append(line)
    for raw, cid, param in MALFORMED:
        line = by_id[cid].pop(0)
        assert line["response"]["status_code"] == 400
        assert line["error"]["type"] == "BadRequestError" and line["error"]["param"] == param
        assert line["response"]["body"] == {"error": line["error"]}
        assert "input line" in line["error"]["message"] or param == "stream"


def test_metrics_file_holds_the_servers_series_and_the_batch_progress(batch):
    from tests._server_helpers import parse_metrics
    _, expected, output, _ = batch
    samples = parse_metrics((output.parent / "m.prom").read_text())
    lines = {labels["state"]: value for labels, value in samples["dsjax_batch_lines"]}
    assert lines == {"total": len(expected), "written": len(expected),
                     "succeeded": len(GOOD), "failed": len(expected) - len(GOOD)}
    # One engine request per prompt of each good line, every one finished.
    engine_requests = sum(len(b["prompt"]) if isinstance(b.get("prompt"), list) and
                          isinstance(b["prompt"][0], str) else 1 for _, b in GOOD)
    assert sum(v for _, v in samples["vllm:request_success_total"]) == engine_requests
    assert samples["dsjax_batch_output_tokens_per_second"][0][1] > 0


# ---- the command line, killed and resumed, and sharded -----------------------------------------

# The test session's JAX settings (conftest.py), so the subprocesses compile the same programs
# and find them in the session's compilation cache.
SUBPROCESS_ENV = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}


def batch_command(source: Path, output: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "serving.run_batch", "-i", str(source), "-o", str(output),
            "--model", "opt-tiny", "--use-dummy-weights", "--dtype", "float32",
            "--tokenizer", str(tokenizer_dir), "--num-blocks", "256", "--skip-warmup",
            "--compilation-cache-dir", jax.config.jax_compilation_cache_dir,
            "--min-decode-rows", "8", "--no-progress-bar", "--window", "4", *extra]


def run_until(command, stop_when=None, sig=signal.SIGKILL) -> int:
    status, err = batch_kill_resume.run_until(command, stop_when, sig, timeout=120,
                                              env=SUBPROCESS_ENV)
    assert status in (0, -signal.SIGKILL, 128 + signal.SIGTERM), err[-3000:]
    return status


def test_sigkill_and_sigterm_at_several_points_then_resume_lose_and_repeat_nothing(
        batch, tokenizer_dir, tmp_path):
    source, expected, reference, _ = batch
    output = tmp_path / "out.jsonl"
    # Commits every 0.05 s, so one lands while later lines are still being written (the job
    # takes about a second once its programs are cached).
    command = batch_command(source, output, tokenizer_dir, "--checkpoint-interval", "0.05")
    resume = [*command, "--resume"]

    # 1. SIGKILL with lines committed and lines written after the commit.
    def past_a_commit():
        committed = committed_lines(output)
        return committed and written_lines(output) > committed
    assert run_until(command, past_a_commit) == -signal.SIGKILL
    cut_from, committed = written_lines(output), committed_lines(output)
    # Lines past the last commit were written (the job may have written them all between the
    # poll and the kill: what matters is that some were uncommitted).
    assert 0 < committed < cut_from <= len(expected)

    # 2. SIGKILL during start-up, before the engine is ready: nothing changes.
    assert run_until(resume, lambda: True) == -signal.SIGKILL

    # 3. SIGTERM mid-run (once it committed more): a clean stop, every written line committed.
    start = committed_lines(output)
    assert run_until(resume, lambda: (committed_lines(output) or 0) >= start + 2,
                     signal.SIGTERM) == 128 + signal.SIGTERM
    assert committed_lines(output) == written_lines(output) > start

    # 4. Resume to the end.
    assert run_until(resume) == 0
    assert same(answers(output), answers(reference))
    assert committed_lines(output) == len(expected)


def test_two_processes_on_one_file_cover_it_exactly_once(batch, tokenizer_dir, tmp_path):
    source, expected, reference, _ = batch
    outputs = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    # Disaggregated here, so that mode meets the batch job too (the reference is colocated).
    procs = [subprocess.Popen(batch_command(source, out, tokenizer_dir, "--num-shards", "2",
                                            "--shard-index", str(i), "--mode", "disaggregated"),
                              cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
             for i, out in enumerate(outputs)]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err.decode()[-3000:]
    summaries = [json.loads(out.decode().splitlines()[-1]) for out, _ in results]
    assert [s["lines"] for s in summaries] == [(len(expected) + 1) // 2, len(expected) // 2]
    # The running time counts from the engine being ready, not from the process's start.
    assert all(abs(s["all_runs_seconds"] - s["run_seconds"]) < 1 for s in summaries)
    assert same(answers(outputs[0]) + answers(outputs[1]), answers(reference))


@pytest.mark.parametrize("flags, message", [
    (["--shard-index", "2", "--num-shards", "2"], "shard_index"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--window", "0"], "--window must be >= 1"),
    (["-i", "/nonexistent/in.jsonl"], "does not exist")])
def test_bad_flags_stop_before_the_engine_starts(tmp_path, capsys, flags, message):
    source = tmp_path / "in.jsonl"
    source.write_text("")
    with pytest.raises(SystemExit) as exit_status:
        run_batch_main(["-i", str(source), "-o", str(tmp_path / "out"), *flags])
    assert exit_status.value.code == 2 and message in capsys.readouterr().err
