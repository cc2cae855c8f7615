"""The batch job: an OpenAI batch file through the engine on a grain pipeline, resumable.

    grain: JsonlSource[this shard] -> map(read_line: parse, check, tokenize) on reader threads,
           prefetched in order
    event loop: keeps the window full: each line's job is answered as the HTTP handlers answer
           it (openai_api.json_answer), its line written in input order (OrderedOutput), and a
           commit every --checkpoint-interval seconds

The window bounds the lines between the oldest not yet written and the newest read: the
requests in the engine and the answers held back for ordering, so memory does not grow with
the file. Its default keeps twice the decode batch limit in flight (vLLM's run_batch keeps
2 x max_num_seqs): the engine's scheduler then always has requests to fill its KV blocks with.
grain's reader threads prefetch in order, so reading overlaps the engine's steps. More of them
do not pay: the pipeline alone makes about 6,400 lines/s with one thread and hardly more with
four, thousands of times what the engine answers (docs/benchmarks.md); grain's worker
processes would not either, and each would need the tokenizer and the checks' context.

Shards split the input into contiguous ranges (grain's ShardOptions: index, count; the first
`lines % count` shards get one more line, as grain's even split), so concatenating the shards'
outputs in shard order gives the input order.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grain

from dsjax.llm import default_window
from serving.api_errors import ApiError
from serving.batch_checkpoint import OrderedOutput
from serving.batch_lines import BatchLine, error_line, output_line, read_line
from serving.batch_progress import BatchProgress
from serving.batch_source import JsonlSource
from serving.context import build_context
from serving.openai_api import json_answer

log = logging.getLogger("serving.batch")

ADMIT_ALL = 1 << 62    # the window bounds what is in flight; admission never refuses here


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    input: str
    output: str
    resume: bool = False
    overwrite: bool = False
    checkpoint_dir: str | None = None       # default: OUTPUT.ckpt
    checkpoint_interval: float = 5.0        # seconds between commits
    num_shards: int = 1
    shard_index: int = 0
    window: int | None = None               # default: default_window(engine config)
    reader_threads: int = 2
    prefetch: int = 64                      # lines grain reads ahead of the window
    progress_bar: bool | None = None        # None: on a terminal
    metrics_file: str | None = None
    served_model_names: tuple[str, ...] | None = None
    chat_template: str | None = None

    def shard(self) -> "grain.sharding.ShardOptions":
        return grain.sharding.ShardOptions(self.shard_index, self.num_shards)


def shard_span(num_lines: int, shard: "grain.sharding.ShardOptions") -> tuple[int, int]:
    """[start, end) of the shard's contiguous lines."""
    per, extra = divmod(num_lines, shard.shard_count)
    start = per * shard.shard_index + min(shard.shard_index, extra)
    return start, start + per + (shard.shard_index < extra)


@dataclasses.dataclass
class BatchFiles:
    """The input (this shard's lines [start, end) of it) and the output with its checkpoint."""
    source: JsonlSource
    start: int
    end: int
    output: OrderedOutput


def open_batch(options: BatchOptions) -> BatchFiles:
    """Index the input and open the output (cut back to its checkpoint on --resume): a
    checkpoint that cannot be continued stops here, before the engine starts (BatchError)."""
    checkpoint_dir = Path(options.checkpoint_dir or options.output + ".ckpt")
    source = JsonlSource(options.input, checkpoint_dir / "input-index.npy")
    shard = options.shard()
    start, end = shard_span(len(source), shard)
    identity = {"input": str(Path(options.input).resolve()), "input_lines": len(source),
                "shard": [shard.shard_index, shard.shard_count], "lines": [start, end]}
    output = OrderedOutput(options.output, checkpoint_dir, identity, options.resume,
                           options.overwrite)
    return BatchFiles(source, start, end, output)


class BatchRun:
    def __init__(self, engine, options: BatchOptions, files: BatchFiles | None = None):
        self.options = options
        self.ctx = build_context(engine, max_queue=ADMIT_ALL, max_queue_delay=math.inf,
                                 served_model_names=options.served_model_names,
                                 chat_template=options.chat_template)
        files = files or open_batch(options)
        self.output, start = files.output, files.start
        self.total = files.end - files.start
        read = grain.ReadOptions(num_threads=options.reader_threads,
                                 prefetch_buffer_size=options.prefetch)
        dataset = (grain.MapDataset.source(files.source)[start:files.end]
                   .map(lambda record: read_line(self.ctx, record[0] - start, *record[1:]))
                   .to_iter_dataset(read))
        self.iterator = iter(dataset)
        if self.output.iterator_state:
            self.iterator.set_state(self.output.iterator_state)
        self.window = options.window or default_window(engine.config)
        self.next_index = self.output.written
        self.stopping: str | None = None     # why the run stops early (a signal, a failure)
        self.failure: str | None = None
        self.tasks: set[asyncio.Task] = set()
        self._room = asyncio.Event()       # set when a line is written: the window moved
        self.report = BatchProgress(self.total, self.output.progress, self.ctx.model_names[0],
                                    options.progress_bar, options.metrics_file,
                                    self.ctx.client.metrics.registry)

    # ---- stopping ---------------------------------------------------------------------------

    def stop(self, why: str) -> None:
        """Stop early: read no more, abort what is in flight (a resume does it again), commit
        what is written."""
        if self.stopping is None:
            log.info("stopping (%s): committing the lines written so far", why)
            self.stopping = why
            self.ctx.client.abort_all()
            self._room.set()

    def _fail(self, why: str) -> None:
        self.failure = self.failure or why
        self.stop("failure")

    # ---- the loop ---------------------------------------------------------------------------

    def _next(self) -> tuple[BatchLine, dict] | None:
        try:
            line = next(self.iterator)
        except StopIteration:
            return None
        return line, self.iterator.get_state()

    def _write(self, line: BatchLine, data: bytes, state: dict, status: int,
               usage: dict | None = None) -> None:
        usage = usage or {}
        written = self.output.put(line.index, data, state, status,
                                  usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        if written:
            self.report.advanced(written)
            self._room.set()

    async def _answer(self, line: BatchLine, state: dict) -> None:
        try:
            body = await json_answer(self.ctx, line.job)
        except ApiError as e:
            if self.stopping:
                return      # aborted by the stop: not written, so a resume does it again
            if e.status >= 500 and not self.ctx.client.engine.health()["ok"]:
                self._fail(f"the engine failed at input line {line.line_number}: {e.message}")
                return
            self._write(line, error_line(line.custom_id, e), state, e.status)
            return
        except Exception as e:   # a bug: this line fails alone, as the server answers 500
            log.exception("error while answering input line %d", line.line_number)
            self._write(line, error_line(line.custom_id, ApiError(
                500, f"internal server error: {type(e).__name__}: {e}")), state, 500)
            return
        self._write(line, output_line(line.custom_id, 200, body, body["id"]), state, 200,
                    body["usage"])

    async def _commit(self, complete: bool = False) -> None:
        async with self._commit_lock:
            snapshot = self.output.snapshot(complete)
            await asyncio.to_thread(self.output.save, snapshot)
            self.report.write_metrics()

    async def _commit_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self._commit()

    async def run(self) -> dict:
        self.output.start_clock()
        self._commit_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        reader = ThreadPoolExecutor(1, thread_name_prefix="batch-reader")
        committer = asyncio.create_task(self._commit_every(self.options.checkpoint_interval))
        try:
            while self.stopping is None and not self.output.progress.complete:
                if self.next_index - self.output.written >= self.window:
                    self._room.clear()
                    await self._room.wait()
                    continue
                try:
                    item = await loop.run_in_executor(reader, self._next)
                except Exception as e:   # the input cannot be read: stop, keep what is done
                    log.exception("reading the input failed")
                    self._fail(f"reading {self.options.input} failed: {e}")
                    break
                if item is None:
                    break
                line, state = item
                self.next_index += 1
                if line.error is not None:
                    self._write(line, error_line(line.custom_id, line.error), state,
                                line.error.status)
                    continue
                task = asyncio.create_task(self._answer(line, state))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            while self.tasks:
                await asyncio.gather(*list(self.tasks))
        finally:
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            reader.shutdown(wait=False, cancel_futures=True)
            complete = self.stopping is None and self.output.written == self.total
            await self._commit(complete=complete or self.output.progress.complete)
            self.output.close()
            self.report.close()
        return self.report.summary(
            input=self.options.input, output=self.options.output,
            shard=[self.options.shard_index, self.options.num_shards],
            complete=self.output.progress.complete or self.output.written == self.total,
            stopped=self.stopping, error=self.failure)


def run_batch(engine, options: BatchOptions, handle_signals: bool = False,
              files: BatchFiles | None = None) -> dict:
    """Run the batch file of `options` through `engine`; returns the summary ("complete",
    "stopped" and "error" say how it ended). With handle_signals, SIGINT and SIGTERM stop it
    cleanly (main thread only)."""
    started = time.perf_counter()
    run = BatchRun(engine, options, files)
    log.info("batch: %d lines (%d already written) from %s to %s, window %d, set up in %.2f s",
             run.total, run.output.written, options.input, options.output, run.window,
             time.perf_counter() - started)

    async def main() -> dict:
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, run.stop, signal.Signals(sig).name)
        return await run.run()

    return asyncio.run(main())
