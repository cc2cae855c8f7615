"""Compile, before an instance serves, the step programs a configured workload can reach.

A compile takes ~0.5 s on a CPU (tens of seconds for a large model on an accelerator); without
this it would land in some request's TTFT or TPOT. The workload is described by EngineConfig's
warmup_* settings: prompts up to `warmup_max_prompt_len` tokens, decode contexts up to
`warmup_max_context_len`, up to `warmup_max_prefill_batch` prompts per prefill step and
`warmup_max_decode_batch` rows per decode step. One program per shape serves every sampling
setting (logprobs, prompt logprobs, penalties, bias and n are run-time inputs), so warm-up also
compiles what any request may reach whatever its shape: the sampler for every sampled-row
bucket, the fill of the sampler's slot table, and the page copies of swap, copy-on-write and
migration for every block-count bucket (a prefill instance only sends pages: gathers). Runs
on the instance's own thread or process, on pages nothing holds yet. With a program store
(dsjax.executor.program_store) the step programs are only made ready, not run
(ModelRunner.rehearsal): loading them is what a warm start needs.
"""
from __future__ import annotations

import time

import numpy as np

from dsjax.config import WARMUP_ALL
from dsjax.executor.batch import ChunkRow, DecodeRow, PrefillRow, SamplingRow
from dsjax.executor.runner import MIN_TOKEN_BUCKET, bucket
from dsjax.sampling_params import SamplingParams

WARMUP_PARAMS = SamplingParams(temperature=1.0, max_tokens=1)
WARMUP_SAMPLING = SamplingRow(WARMUP_PARAMS, 0, 0)
# A prefill step may take this share of the TTFT SLO: a request that arrives during one waits
# for it and then for its own, and both fit the SLO with room for queueing.
PREFILL_STEP_SLO_SHARE = 0.25


def powers_of_two(lo: int, hi: int) -> list[int]:
    """Buckets from bucket(lo) up to bucket(hi)."""
    out, b = [], bucket(lo)
    while b <= bucket(hi):
        out.append(b)
        b *= 2
    return out


def _tables(runner, lengths):
    """Disjoint page lists for rows of these token counts (wrapping around the pool)."""
    at, out = 0, []
    for n in lengths:
        k = -(-n // runner.page_size)
        out.append(tuple((at + j) % runner.num_pages for j in range(k)))
        at += k
    return out


def _step_tokens(runner) -> int:
    """The most tokens one step can compute: its token limit, and the KV cache's slots (each
    token computed is written to one)."""
    return min(runner.max_tokens_per_batch, runner.num_pages * runner.page_size)


def prefill_shapes(runner, max_prompt: int, max_batch: int) -> list[list[int]]:
    """Prompt lengths of one batch per token bucket the workload reaches: a prefill program
    depends on its token bucket alone (prompt slots are fixed), so the fewest prompts that
    fill each bucket's range stand for every batch."""
    max_prompt = min(max_prompt, runner.max_blocks_per_request * runner.page_size)
    max_batch = min(max_batch, runner.max_batch_size)
    max_tokens = min(_step_tokens(runner), max_batch * max_prompt)
    shapes = []
    # (from the smallest bucket even where the longest batch is shorter: its prompts run in it)
    for t in powers_of_two(MIN_TOKEN_BUCKET, max(max_tokens, MIN_TOKEN_BUCKET)):
        n = min(t, max_tokens)
        b = -(-n // max_prompt)
        shapes.append([n // b + (1 if i < n % b else 0) for i in range(b)])
    return shapes


def _widths(runner, max_context: int) -> list[int]:
    """Block-table widths (pages) a step's program can see: one when tables have a fixed width
    (then the shortest runs quickest), else every bucket up to max_context."""
    if runner.fixed_table_width:
        return [1]
    return powers_of_two(1, min(-(-max_context // runner.page_size),
                                runner.max_blocks_per_request))


def decode_shapes(runner, max_context: int, max_batch: int) -> list[tuple[int, int]]:
    """(batch, context) per (batch bucket, block-table bucket) the workload reaches."""
    smallest = runner.min_decode_rows
    largest = min(max(max_batch, smallest), runner.max_batch_size)
    return [(b, w * runner.page_size) for b in runner.decode_buckets(largest)
            for w in _widths(runner, max_context)]


def chunked_shapes(runner, max_context: int, max_batch: int) -> list[tuple[int, int, int]]:
    """(rows, tokens, context) per (row bucket, token bucket, block-table bucket) a chunked
    step can reach: its token budget split over up to max_batch rows. With fixed-width tables
    each (rows, tokens) pair runs once, at the shortest context its chunks fit in."""
    page = runner.page_size
    max_pages = min(-(-max_context // page), runner.max_blocks_per_request)
    rows = powers_of_two(8, min(max_batch, runner.max_batch_size))
    shapes = []
    for b in rows:
        for t in powers_of_two(MIN_TOKEN_BUCKET, _step_tokens(runner)):
            if runner.fixed_table_width:
                w = -(-t // (b * page))   # the fewest pages that hold each row's chunk
                widths = [w] if b <= t and w <= max_pages else []
            else:
                widths = [w for w in powers_of_two(1, max_pages) if b <= t <= b * w * page]
            shapes += [(b, t, w * page) for w in widths]
    return shapes


def warmup_limits(runner, config) -> tuple[int, int, int, int]:
    """(longest prompt, longest context, prompts per step, decode rows per step) to warm, with
    WARMUP_ALL resolved: the model's whole context, the instance's batch limit."""
    whole = min(runner.config.max_position_embeddings,
                runner.max_blocks_per_request * runner.page_size)
    resolve = lambda value, limit: limit if value == WARMUP_ALL else value  # noqa: E731
    prompt = resolve(config.warmup_max_prompt_len, whole)
    context = min(whole, max(resolve(config.warmup_max_context_len, whole), prompt + 1))
    return (prompt, context,
            resolve(config.warmup_max_prefill_batch, runner.max_batch_size),
            resolve(config.warmup_max_decode_batch, runner.max_batch_size))


def warm_up_runner(runner, role: str, config) -> int:
    """Run every step shape of the configured workload once; returns the number of steps run
    (0 when warm-up is off)."""
    if config.warmup_max_prompt_len == 0:
        return 0
    with runner.rehearsal():   # programs made ready, steps not run (with a program store)
        return _warm_up_steps(runner, role, config)


def _warm_up_steps(runner, role: str, config) -> int:
    max_prompt, max_context, max_prompts, max_rows = warmup_limits(runner, config)
    prompts = prefill_shapes(runner, max_prompt, max_prompts)
    decodes = decode_shapes(runner, max_context, max_rows)
    row, steps = WARMUP_SAMPLING, warm_up_fixed_programs(runner, role)
    if role in ("prefill", "colocated"):
        for lengths in prompts:
            runner.prefill(_prompt_rows(runner, lengths))
            steps += 1
            if config.enable_prefix_caching and not runner.prefill_reads_pages:
                # The same token buckets after a cached block, where those are programs of
                # their own (the cached block counts toward a request's length: the longest
                # is trimmed, to the same bucket).
                room = runner.max_blocks_per_request * runner.page_size - runner.page_size
                runner.prefill_cached(_prompt_rows(runner, [min(n, room) for n in lengths],
                                                   cached=runner.page_size))
                steps += 1
    if role in ("decode", "colocated"):
        def decode_step(b, n):
            step = runner.dispatch_decode([DecodeRow(5, n - 1, t, row)
                                           for t in _tables(runner, [n] * b)])
            runner.collect(step)
            return step
        last_of_splits = {}   # micro-batches in a step -> a step of that many
        for b, n in decodes:
            step = decode_step(b, n)
            last_of_splits[len(step.counts)] = step
            steps += 1
        # The next step's token selection compiles per (the last step's micro-batch count, a
        # micro-batch bucket). Under a pipeline a batch of any size may split into buckets
        # that no batch above does (pp 2: 17 rows as 8 + 16, 1 row as one micro-batch): one
        # more step of each such split count (its forward programs are warm already), and
        # every bucket a split reaches.
        shortest = min(n for _, n in decodes)
        buckets = set()
        for rows in range(1, min(max(b for b, _ in decodes), runner.max_batch_size) + 1):
            pads = runner.micro_batch_pads(rows)
            buckets.update(pads)
            if len(pads) not in last_of_splits:
                last_of_splits[len(pads)] = decode_step(rows, shortest)
                steps += 1
        runner.warm_token_selection(list(last_of_splits.values()), sorted(buckets))
    if role == "chunked":
        # t tokens over b rows that each end at context n: chunks and decode rows alike.
        for b, t, n in chunked_shapes(runner, max_context, max_rows):
            sizes = [t // b + (1 if i < t % b else 0) for i in range(b)]
            runner.chunked([ChunkRow((5,) * k, n - k, tab, (row,))
                            for k, tab in zip(sizes, _tables(runner, [n] * b))])
            steps += 1
    return steps


def warm_up_fixed_programs(runner, role: str) -> int:
    """Compile the programs whose shapes no workload setting bounds: the prefill sampler for
    every sampled-row bucket (n and best_of multiply a prompt's rows), the slot-table fill,
    and page gathers for every block-count bucket (migration, swap-out, copy on write), and
    inserts where pages arrive (all but a prefill instance, which only sends them). Returns
    the number of calls made."""
    calls = 0
    runner.fill_sampling_slot(0, WARMUP_PARAMS, (5,), ())
    if role in ("prefill", "colocated"):
        table = _tables(runner, [1])[0]
        for rows in runner.prefill_sample_buckets():
            runner.prefill([PrefillRow((5,), table, (WARMUP_SAMPLING,) * rows)])
            calls += 1
    for n in powers_of_two(1, runner.max_blocks_per_request):
        ids = [j % runner.num_pages for j in range(n)]
        pages = runner.gather_pages(ids)
        calls += 1
        if role == "prefill":
            continue
        runner.insert_pages(ids, pages)                  # copy on write, migration
        # swap-in, from host memory: zeros kept as a swap keeps pages (no copy back needed)
        runner.insert_pages(ids, runner.swap_copies(
            [tuple(np.zeros(a.shape, a.dtype) for a in stage) for stage in pages], n))
    return calls


def warm_up_pulls(runner, sources, config) -> int:
    """Compile the reshard of a pull from each source layout (kv_migration.SourceLayout) unlike
    the runner's own, for every page-count bucket up to the longest prompt warmed: a
    destination with other stages or another tp slices and joins the arriving shards, one
    program per shape and device (a pull from pp 1 into pp 2 compiled its layer slices after
    ready). Returns the number of reshards run (0 when warm-up is off)."""
    if config.warmup_max_prompt_len == 0:
        return 0
    import jax

    from dsjax.executor.kv_migration import layout_shards, reshard_pages
    pages = -(-warmup_limits(runner, config)[0] // runner.page_size)
    calls = 0
    for layout in {s for s in sources if not s.matches(runner)}:
        for n in powers_of_two(1, pages):
            jax.block_until_ready(reshard_pages(layout_shards(runner, layout, n), runner))
            calls += 1
    return calls


def _prompt_rows(runner, lengths, cached: int = 0) -> list[PrefillRow]:
    """Prompts that compute `lengths` tokens each, after `cached` tokens already in pages."""
    total = [n + cached for n in lengths]
    return [PrefillRow((5,) * n, t, (WARMUP_SAMPLING,), cached)
            for n, t in zip(total, _tables(runner, total))]


def measure_prefill_budget(runner, config) -> int:
    """The prompt tokens per prefill step: config.prefill_token_budget when set; else, from
    the warmed prefill shapes timed (best of two), the largest power of two (up to
    context_max_tokens_per_batch) whose predicted step time (a least-squares line through the
    timings) is at most PREFILL_STEP_SLO_SHARE x ttft_slo; the cap when warm-up was off."""
    cap = config.context_max_tokens_per_batch
    if config.prefill_token_budget:
        return min(config.prefill_token_budget, cap)
    if config.warmup_max_prompt_len == 0:
        return cap
    max_prompt, _, max_prompts, _ = warmup_limits(runner, config)
    target = PREFILL_STEP_SLO_SHARE * config.ttft_slo
    timings = []
    for lengths in sorted(prefill_shapes(runner, max_prompt, max_prompts), key=sum):
        # The quicker of two runs: one stall on a busy host would otherwise steepen the fitted
        # line and shrink the budget for the whole run.
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            runner.prefill(_prompt_rows(runner, lengths))
            seconds.append(time.perf_counter() - start)
        timings.append((sum(lengths), min(seconds)))
        if min(seconds) > target and len(timings) >= 2:
            break   # larger steps miss the target too: timing them would only delay ready
    return budget_from_timings(timings, cap, target)


def budget_from_timings(timings: list[tuple[int, float]], cap: int, target_s: float) -> int:
    """Largest power of two <= cap whose step time, on the line a + b * tokens fitted to
    (tokens, seconds), is within target_s. When a step's fixed cost a alone nearly fills the
    target, shrinking the batch cannot meet it and only wastes steps: the limit is then 2a
    (at least half of each step is prompt work)."""
    tokens, seconds = np.array(timings, float).T
    slope, intercept = np.polyfit(tokens, seconds, 1) if len(set(tokens)) > 1 else (0.0, 0.0)
    if slope <= 0 or intercept < 0:   # noise over too narrow a range: a proportional bound
        slope, intercept = float(np.max(seconds / tokens)), 0.0
    limit = max(target_s, 2 * intercept)
    budget = MIN_TOKEN_BUCKET
    for t in powers_of_two(MIN_TOKEN_BUCKET, cap):
        if t <= cap and intercept + slope * t <= limit:
            budget = t
    return budget
