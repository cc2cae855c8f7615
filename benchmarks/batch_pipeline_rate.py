"""How fast the batch job's grain pipeline reads, checks and tokenizes lines, without the engine.

    python benchmarks/batch_pipeline_rate.py --lines 20000

Writes a batch file of --lines requests (text prompts of about 60 tokens, half completions and
half chats), then for 1, 2 and 4 reader threads times how long the batch job's own pipeline
(JsonlSource -> read_line -> grain's prefetching iterator) takes to hand every line over,
with the engine idle. The engine's own rate (docs/benchmarks.md) is the number to compare: if
the pipeline is many times faster, more reader threads or grain worker processes cannot make
the job faster. Also reports the time to index the file and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's packages

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "boxing matches in a distant city").split()


def write_file(path: Path, lines: int) -> None:
    with open(path, "w") as f:
        for i in range(lines):
            text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(50))
            if i % 2:
                url, body = "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": text}], "max_tokens": 32}
            else:
                url, body = "/v1/completions", {"prompt": text, "max_tokens": 32}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url,
                                "body": body}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=20000)
    args = ap.parse_args()

    import grain

    from dsjax.config import EngineConfig
    from dsjax.engine.core import Engine
    from serving.batch_lines import read_line
    from serving.batch_source import JsonlSource
    from serving.context import build_context

    directory = Path(tempfile.mkdtemp(prefix="dsjax-pipeline-"))
    source_path = directory / "in.jsonl"
    write_file(source_path, args.lines)
    (directory / "tok").mkdir()
    (directory / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"}))
    engine = Engine(EngineConfig(model="opt-tiny", load_format="dummy", dtype="float32",
                                 tokenizer=str(directory / "tok")))
    ctx = build_context(engine, max_queue=1 << 30, max_queue_delay=float("inf"))
    started = time.perf_counter()
    source = JsonlSource(source_path, directory / "index.npy")
    print(f"indexed {len(source)} lines ({source_path.stat().st_size / 1e6:.1f} MB) in "
          f"{time.perf_counter() - started:.2f} s")
    for threads in (1, 2, 4):
        dataset = (grain.MapDataset.source(source)
                   .map(lambda record: read_line(ctx, *record))
                   .to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                      prefetch_buffer_size=64)))
        started = time.perf_counter()
        tokens = sum(len(ids) for line in dataset for ids in line.job.prompts)
        seconds = time.perf_counter() - started
        print(f"{threads} reader thread(s): {len(source) / seconds:.0f} lines/s "
              f"({tokens / seconds:.0f} prompt tokens/s)")
    engine.shutdown()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
