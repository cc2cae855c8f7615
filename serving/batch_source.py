"""The batch job's input: a JSONL file as a grain random-access data source.

The file is indexed once: the byte span and line number of every non-blank line, found with
numpy over 4 MiB reads and saved as a .npy file that later runs memory-map (a resume, or
another shard of the same file, reads it instead of scanning again). A 10-million-line file
costs its index (24 bytes a line) on disk, never its text in memory. Records are read with
os.pread, which needs no shared file position, so grain's reader threads share one descriptor.
Blank lines are not requests (vLLM's run_batch skips them too) and get no output line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

CHUNK_BYTES = 4 << 20
WHITESPACE = b" \t\r\n\f\v"


def scan_lines(path: str | os.PathLike) -> np.ndarray:
    """[start, end, line number (1-based)] of each non-blank line of the file, as int64."""
    is_space = np.zeros(256, bool)
    is_space[list(WHITESPACE)] = True
    newlines, filled, base, nonspace = [], [], 0, 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            data = np.frombuffer(block, np.uint8)
            # Non-whitespace bytes before each newline, counted across blocks: a line is blank
            # when that count does not grow from the previous newline to its own.
            counts = np.cumsum(~is_space[data], dtype=np.int64) + nonspace
            at = np.flatnonzero(data == ord("\n"))
            newlines.append(at + base)
            filled.append(counts[at])
            nonspace, base = int(counts[-1]), base + len(block)
    ends = np.concatenate(newlines or [np.zeros(0, np.int64)])
    counts = np.concatenate(filled or [np.zeros(0, np.int64)])
    if base and (len(ends) == 0 or ends[-1] != base - 1):   # a last line with no newline
        ends, counts = np.append(ends, base), np.append(counts, nonspace)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = np.diff(np.concatenate([[0], counts])) > 0
    numbers = np.arange(1, len(ends) + 1, dtype=np.int64)
    return np.stack([starts[keep], ends[keep], numbers[keep]], axis=1)


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"input": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_or_build_index(path: str | os.PathLike, index_path: str | os.PathLike) -> np.ndarray:
    """The line index of `path`, memory-mapped from `index_path` when that was built from this
    very file (same size and modification time), else scanned now and saved there."""
    path, index_path = Path(path), Path(index_path)
    meta_path = index_path.with_suffix(".json")
    fingerprint = _fingerprint(path)
    if index_path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == fingerprint:
                return np.load(index_path, mmap_mode="r")
        except ValueError:
            pass   # a torn metadata file: scan again
    index = scan_lines(path)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    # Written under temporary names and renamed: a kill mid-write leaves no half index.
    tmp = index_path.with_name(index_path.name + ".tmp.npy")
    np.save(tmp, index)
    os.replace(tmp, index_path)
    meta_tmp = meta_path.with_name(meta_path.name + ".tmp")
    meta_tmp.write_text(json.dumps(fingerprint))
    os.replace(meta_tmp, meta_path)
    return np.load(index_path, mmap_mode="r")


class JsonlSource:
    """grain.sources.RandomAccessDataSource over a JSONL file: record i is (i, line number,
    the raw bytes of the i-th non-blank line). Picklable (grain's worker processes reopen the
    file)."""

    def __init__(self, path: str | os.PathLike, index_path: str | os.PathLike):
        self.path = str(path)
        self.index_path = str(index_path)
        self._index = load_or_build_index(path, index_path)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[int, int, bytes]:
        start, end, number = (int(x) for x in self._index[i])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return i, number, os.pread(self._fd, end - start, start)

    def __repr__(self) -> str:   # grain names the source in checkpoints by it
        return f"JsonlSource({self.path!r}, {len(self)} lines)"

    def __getstate__(self) -> dict:
        return {"path": self.path, "index_path": self.index_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["index_path"])

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
