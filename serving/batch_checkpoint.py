"""The batch job's output file, written in input order, and its orbax checkpoints.

Requests finish out of order; their lines are written in input order (an answer ahead of a
missing one waits, bounded by the runner's window). A commit makes the written lines durable
(flush, fsync) and then saves an orbax checkpoint of the low watermark: how many lines are
written and the output's size in bytes, grain's iterator state after the last of them, and the
summary's counters. `--resume` restores the latest checkpoint, cuts the output back to its size
(dropping lines written after it, or half a line from a kill) and restarts grain's iterator from
its state: no line is lost and none is written twice. Orbax writes a checkpoint into a
temporary directory and renames it when complete, so a kill mid-save leaves the previous one.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from pathlib import Path

log = logging.getLogger("serving.batch")

KEEP_CHECKPOINTS = 2


class BatchError(RuntimeError):
    """The batch job cannot go on (bad flags, a checkpoint of another input, a failed engine):
    the message names the fix."""


@dataclasses.dataclass
class Progress:
    """What the committed lines hold, and what they took."""
    lines: int = 0                # written, from the start of the shard
    output_bytes: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0          # running time of every run up to the commit
    complete: bool = False

    def count(self, status: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.lines += 1
        if status == 200:
            self.succeeded += 1
        else:
            self.failed += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens


def _manager(directory: Path):
    import orbax.checkpoint as ocp   # imports JAX: after the launcher set XLA_FLAGS
    options = ocp.CheckpointManagerOptions(max_to_keep=KEEP_CHECKPOINTS, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


def _restore(manager, step: int) -> tuple[dict, dict, dict]:
    import orbax.checkpoint as ocp
    got = manager.restore(step, args=ocp.args.Composite(
        progress=ocp.args.JsonRestore(), iterator=ocp.args.JsonRestore(),
        identity=ocp.args.JsonRestore()))
    return got.progress, got.iterator, got.identity


class OrderedOutput:
    """The output file and its checkpoints in `checkpoint_dir`. `identity` names the input
    and shard: a checkpoint of another one is refused rather than continued."""

    def __init__(self, output: str | os.PathLike, checkpoint_dir: str | os.PathLike,
                 identity: dict, resume: bool, overwrite: bool = False):
        self.path = Path(output)
        self.identity = identity
        self._steps_dir = Path(checkpoint_dir) / "progress"
        self._manager = _manager(self._steps_dir)
        self.progress, self.iterator_state = Progress(), None
        step = self._manager.latest_step()
        if step is not None:
            progress, state, saved_identity = _restore(self._manager, step)
            previous = Progress(**progress)
            if resume and saved_identity != identity:
                raise BatchError(f"the checkpoint in {checkpoint_dir} is of {saved_identity}, "
                                 f"not of {identity}: give the same input and shard flags, or "
                                 f"another --checkpoint-dir, or --overwrite to start over")
            if resume:
                self.progress, self.iterator_state = previous, state
            elif not previous.complete and not overwrite:
                raise BatchError(f"{checkpoint_dir} holds an unfinished run ({previous.lines} "
                                 f"lines written): pass --resume to continue it, or "
                                 f"--overwrite to start over")
            else:
                self._reset(checkpoint_dir)
        self.resumed_from = self.progress.lines
        self._file = self._open()
        self._pending: dict[int, tuple[bytes, dict, int, int, int]] = {}
        self._state = self.iterator_state
        self._base_seconds = self.progress.seconds
        self.start_clock()
        # One save at a time: a commit cancelled on its event loop goes on in its thread.
        self._saving = threading.Lock()

    def _reset(self, checkpoint_dir) -> None:
        self._manager.close()
        shutil.rmtree(self._steps_dir)
        self._manager = _manager(self._steps_dir)
        log.info("starting over: the earlier checkpoint in %s is discarded", checkpoint_dir)

    def _open(self):
        size = self.progress.output_bytes
        if size == 0:
            return open(self.path, "wb")
        have = self.path.stat().st_size if self.path.is_file() else None
        if have is None or have < size:
            raise BatchError(f"{self.path} is {'missing' if have is None else f'{have} bytes'}"
                             f", but its checkpoint says {self.progress.lines} lines ({size} "
                             f"bytes) were written: restore the file, or pass --overwrite to "
                             f"start over")
        f = open(self.path, "r+b")
        f.truncate(size)   # lines written after the commit (or half of one) are done again
        f.seek(size)
        if have > size:
            log.info("resuming at line %d: cut %d bytes written after the last commit",
                     self.progress.lines, have - size)
        return f

    def start_clock(self) -> None:
        """Count running time from now (the run starts once the engine is ready)."""
        self._started = time.monotonic()

    @property
    def written(self) -> int:
        """Lines written so far (committed or not), from the start of the shard."""
        return self.progress.lines

    def put(self, index: int, line: bytes, state: dict, status: int = 200,
            prompt_tokens: int = 0, completion_tokens: int = 0) -> int:
        """Line `index`'s answer, with grain's iterator state after it; writes every line now
        in order. Returns how many were written."""
        self._pending[index] = (line, state, status, prompt_tokens, completion_tokens)
        written = 0
        while self.progress.lines in self._pending:
            line, self._state, *counts = self._pending.pop(self.progress.lines)
            self._file.write(line)
            self.progress.output_bytes += len(line)
            self.progress.count(*counts)
            written += 1
        return written

    def snapshot(self, complete: bool = False) -> tuple[Progress, dict | None]:
        """What a commit saves, taken on the writing thread: the file is flushed up to it."""
        self._file.flush()
        self.progress.seconds = self._base_seconds + time.monotonic() - self._started
        return dataclasses.replace(self.progress, complete=complete), self._state

    def save(self, snapshot: tuple[Progress, dict | None]) -> None:
        """Make the snapshot's lines durable, then checkpoint it (may run on another thread
        while lines after it are written)."""
        import orbax.checkpoint as ocp
        progress, state = snapshot
        with self._saving:
            os.fsync(self._file.fileno())
            latest = self._manager.latest_step()
            if latest is not None and latest >= progress.lines:
                saved, _, _ = _restore(self._manager, latest)
                if latest > progress.lines or saved["complete"] or not progress.complete:
                    return      # nothing new since the last commit
                self._manager.delete(latest)
            self._manager.save(progress.lines, args=ocp.args.Composite(
                progress=ocp.args.JsonSave(dataclasses.asdict(progress)),
                iterator=ocp.args.JsonSave(state or {}),
                identity=ocp.args.JsonSave(self.identity)))
            self._manager.wait_until_finished()

    def commit(self, complete: bool = False) -> None:
        self.save(self.snapshot(complete))

    def close(self) -> None:
        self._file.close()
        self._manager.close()
