"""The batch job's files without an engine: the JSONL source and its line index, the ordered
output and its orbax checkpoints under simulated crashes (a kill after writing past a commit,
a kill in the middle of a line, a kill inside orbax's save)."""
from __future__ import annotations

import json
import pickle

import grain
import pytest

from serving.batch_checkpoint import BatchError, OrderedOutput
from serving.batch_runner import BatchOptions, open_batch, shard_span
from serving.batch_source import JsonlSource, scan_lines
from serving.run_batch import main as run_batch_main

IDENTITY = {"input": "/data/in.jsonl", "input_lines": 10, "shard": [0, 1], "lines": [0, 10]}


@pytest.mark.parametrize("text", [b"", b"\n", b"a\n\n  \nb", b'{"x":1}\n{"y":2}\n',
                                  b"  \n\r\nabc\r\n\n", b"x", b"\t\n\xc3\xa9\n" * 3])
def test_index_finds_every_non_blank_line_and_its_number(tmp_path, text):
    path = tmp_path / "in.jsonl"
    path.write_bytes(text)
    expected = [(line, n + 1) for n, line in enumerate(text.split(b"\n")) if line.strip()]
    assert [(text[s:e], n) for s, e, n in scan_lines(path)] == expected


def test_index_spans_read_blocks(tmp_path, monkeypatch):
    import serving.batch_source as batch_source
    monkeypatch.setattr(batch_source, "CHUNK_BYTES", 7)   # lines and blanks cross blocks
    text = b"".join(b"%d %s\n" % (i, b"x" * (i % 11)) if i % 4 else b"     \n"
                    for i in range(200))
    path = tmp_path / "in.jsonl"
    path.write_bytes(text)
    expected = [(line, n + 1) for n, line in enumerate(text.split(b"\n")) if line.strip()]
    assert [(text[s:e], n) for s, e, n in scan_lines(path)] == expected


def test_source_is_a_grain_source_indexed_once(tmp_path, monkeypatch):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\n')
    index = tmp_path / "ckpt" / "index.npy"
    source = JsonlSource(path, index)
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    assert [source[i] for i in range(len(source))] == [(0, 1, b'{"a": 1}'), (1, 3, b'{"b": 2}')]
    assert pickle.loads(pickle.dumps(source))[1] == (1, 3, b'{"b": 2}')
    import serving.batch_source as batch_source
    monkeypatch.setattr(batch_source, "scan_lines", lambda p: pytest.fail("scanned again"))
    assert len(JsonlSource(path, index)) == 2       # read from the saved index
    path.write_bytes(b'{"a": 1}\n')                   # another file: indexed anew
    monkeypatch.undo()
    assert len(JsonlSource(path, index)) == 1


@pytest.mark.parametrize("lines, count", [(10, 3), (2, 3), (9, 3), (0, 2), (7, 1)])
def test_shards_are_contiguous_and_cover_every_line_once(lines, count):
    spans = [shard_span(lines, grain.sharding.ShardOptions(i, count)) for i in range(count)]
    covered = [i for start, end in spans for i in range(start, end)]
    assert covered == list(range(lines))
    assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


def line(i: int) -> bytes:
    return json.dumps({"custom_id": f"r{i}", "n": i}).encode() + b"\n"


def test_lines_written_in_input_order_and_resumed_from_the_commit(tmp_path):
    out, ckpt = tmp_path / "out.jsonl", tmp_path / "ckpt"
    writer = OrderedOutput(out, ckpt, IDENTITY, resume=False)
    # Out of order: nothing is written until line 0 arrives.
    assert writer.put(2, line(2), {"next_index": 3}) == 0
    assert writer.put(1, line(1), {"next_index": 2}, status=400) == 0
    assert writer.put(0, line(0), {"next_index": 1}, prompt_tokens=5, completion_tokens=7) == 3
    writer.commit()
    writer.put(3, line(3), {"next_index": 4})
    writer.snapshot()                  # flushed, never committed
    writer._file.write(b'{"custom_id": "r4", "n"')   # killed in the middle of a line
    writer._file.flush()
    # A kill inside orbax's save leaves its temporary directory behind.
    (ckpt / "progress" / "7.orbax-checkpoint-tmp-123" / "progress").mkdir(parents=True)

    resumed = OrderedOutput(out, ckpt, IDENTITY, resume=True)
    assert out.read_bytes() == line(0) + line(1) + line(2)
    assert resumed.iterator_state == {"next_index": 3}
    p = resumed.progress
    assert (p.lines, p.succeeded, p.failed, p.prompt_tokens, p.completion_tokens) == \
        (3, 2, 1, 5, 7)
    resumed.put(3, line(3), {"next_index": 4})
    resumed.commit(complete=True)
    resumed.close()
    assert out.read_bytes() == b"".join(line(i) for i in range(4))

    # A finished run is started over without asking; its checkpoint said complete.
    again = OrderedOutput(out, ckpt, IDENTITY, resume=False)
    assert again.written == 0 and out.read_bytes() == b""
    again.close()


def test_a_checkpoint_that_cannot_be_continued_is_refused_naming_the_fix(tmp_path):
    out, ckpt = tmp_path / "out.jsonl", tmp_path / "ckpt"
    writer = OrderedOutput(out, ckpt, IDENTITY, resume=False)
    writer.put(0, line(0), {"next_index": 1})
    writer.commit()
    writer.close()
    with pytest.raises(BatchError, match="--resume to continue it, or --overwrite"):
        OrderedOutput(out, ckpt, IDENTITY, resume=False)
    with pytest.raises(BatchError, match="give the same input and shard flags"):
        OrderedOutput(out, ckpt, {**IDENTITY, "shard": [1, 2]}, resume=True)
    out.write_bytes(b"")
    with pytest.raises(BatchError, match="restore the file, or pass --overwrite"):
        OrderedOutput(out, ckpt, IDENTITY, resume=True)
    fresh = OrderedOutput(out, ckpt, IDENTITY, resume=False, overwrite=True)
    assert fresh.written == 0
    fresh.close()


def test_the_command_refuses_an_unfinished_run_without_resume_before_the_engine(tmp_path,
                                                                                 caplog):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(line(0) + line(1))
    files = open_batch(BatchOptions(str(source), str(out)))
    files.output.put(0, line(0), {"next_index": 1})
    files.output.commit()
    files.output.close()
    assert run_batch_main(["-i", str(source), "-o", str(out), "--model", "opt-tiny"]) == 1
    assert "pass --resume to continue it" in caplog.text


def test_progress_shows_lines_failed_tokens_per_second_and_eta(capsys, monkeypatch):
    import serving.batch_progress as batch_progress
    from serving.batch_checkpoint import Progress
    monkeypatch.setattr(batch_progress, "POSTFIX_EVERY_S", 0.0)
    progress = Progress(lines=2, completion_tokens=10)      # resumed after 2 lines
    report = batch_progress.BatchProgress(6, progress, "opt-tiny", bar=True)
    for status, tokens in ((200, 30), (400, 0)):
        progress.count(status, 5, tokens)
        report.advanced(1)
    summary = report.summary()
    report.close()
    bar = capsys.readouterr().err
    assert "4/6" in bar and "failed=1" in bar and "tok_s=" in bar and "<" in bar   # ETA
    assert (summary["written"], summary["failed"], summary["resumed_from"]) == (4, 1, 2)
    assert summary["completion_tokens"] == 40 and summary["run_output_tokens_per_s"] > 0
