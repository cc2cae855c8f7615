"""ModelRunner: one instance's params and KV pages on its devices, and its jitted steps.

Each pipeline stage has its own mesh, params, page pool and compiled programs. A step turns
host-side batch descriptions into padded arrays (shape buckets bound the number of programs),
runs the stages one after another per micro-batch (JAX dispatches asynchronously, so stage s of
micro-batch i+1 overlaps stage s+1 of micro-batch i), and samples on the last stage.

Bucket bound (docs/design.md): prefill programs <= |token buckets| x |sequence buckets|, decode
programs <= |batch buckets| x |block-table buckets|, each x 2 logprob settings (the sampler
chooses greedy, temperature or filtered sampling at run time inside one program).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsjax.executor.batch import ChunkRow, DecodeRow, PrefillRow, SamplingRow
from dsjax.executor.kv_cache import PagePool
from dsjax.executor.parallel import (InstanceSpec, check_tensor_parallel, instance_mesh, layer_ranges,
                            param_shardings, param_spec, pipeline_param_shardings, stage_mesh,
                            stage_param_tree, stage_view)
from dsjax.sampling_params import MAX_LOGPROBS
from dsjax.executor.sampling import SampleOutput, build_sampling_tensors, sample, score_prompt
from dsjax.executor.sharded_attention import for_mesh
from dsjax.models.attention import ChunkedMetadata, DecodeMetadata, PrefillMetadata
from dsjax.models.config import OPTConfig
from dsjax.models.opt import OPTModel, abstract_params

MIN_TOKEN_BUCKET = 16


def platform_min_decode_rows(platform: str) -> int:
    """The smallest decode batch bucket by default. On a CPU, padded rows cost as much as real
    ones (each gathers pages and multiplies), so a lone request runs as one row; an accelerator
    reads the weights once for 1 or 8 rows alike, and fewer buckets mean fewer programs."""
    return 1 if platform == "cpu" else 8


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass
class PendingStep:
    """A dispatched step whose samples are still on the device, micro-batch by micro-batch."""
    outs: list
    counts: list[int]   # rows per micro-batch
    pads: list[int]     # padded rows per micro-batch

    def flat_row(self, row: int) -> int:
        """Index of the step's row `row` among the padded micro-batch outputs laid end to end
        (-1 stays -1)."""
        if row < 0:
            return -1
        offset = 0
        for count, pad in zip(self.counts, self.pads):
            if row < count:
                return offset + row
            row -= count
            offset += pad
        raise IndexError("row beyond the step's rows")


@jax.jit
def _select_tokens(previous_tokens: tuple, index):
    """Input tokens from a previous step's samples (index -1: none)."""
    flat = jnp.concatenate(previous_tokens)
    return jnp.where(index >= 0, flat[jnp.maximum(index, 0)], -1).astype(jnp.int32)


@dataclasses.dataclass
class StepOutput:
    """Host copies of one step's samples, one row per scheduled sequence."""
    tokens: np.ndarray
    logprob: np.ndarray
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None
    # Prompt scoring, per row when asked: (log p of prompt tokens 1.., top ids, top logprobs).
    prompt_scores: list | None = None


class Stage:
    """One pipeline stage: a tp-device mesh with its layers, params and page pool."""

    def __init__(self, config: OPTConfig, devices, layer_range, first: bool, last: bool,
                 params, num_pages: int, page_size: int, dtype, attention):
        self.mesh = stage_mesh(devices)
        self.layer_range = layer_range
        self.first, self.last = first, last
        self.params = params
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        num_layers = layer_range[1] - layer_range[0]
        self.pool = PagePool(self.mesh, num_layers, num_pages, page_size,
                             config.num_attention_heads, config.head_dim, dtype)
        attention = for_mesh(attention, self.mesh)
        self.models = {mode: OPTModel(config, attention, mode, num_layers=num_layers,
                                      first_stage=first, last_stage=last, dtype=dtype,
                                      param_dtype=dtype)
                       for mode in ("prefill", "decode", "chunked")}
        self.models["prefill_scored"] = OPTModel(
            config, attention, "prefill", num_layers=num_layers, first_stage=first,
            last_stage=last, dtype=dtype, param_dtype=dtype, all_logits=True)
        self.fns = {}

    def _fn(self, mode, layout, num_logprobs, sample_mode):
        """The jitted step for one input layout; positional-only calls keep JAX's fast C++
        dispatch path (static keyword arguments would take the slower Python one)."""
        key = (mode, layout, num_logprobs, sample_mode)
        fn = self.fns.get(key)
        if fn is None:
            fn = jax.jit(functools.partial(_stage_step, self.models[mode], layout=layout,
                                           num_logprobs=num_logprobs, sample_mode=sample_mode),
                         donate_argnums=(2, 3))
            self.fns[key] = fn
        return fn

    def run(self, mode, hidden, packed, layout, num_logprobs, sample_mode, override=None):
        """One stage of a step on the previous stage's activations (None on the first stage).
        `packed` holds the host inputs (token ids, metadata, sampling) as two flat arrays, so a
        step costs one host->device transfer instead of a dozen. `override`: input token ids
        already on a device (the previous step's samples), -1 where the packed ones stand."""
        if hidden is not None:
            hidden = jax.device_put(hidden, self.replicated)  # onto this stage's mesh
        if override is not None:
            override = jax.device_put(override, self.replicated)
        bufs = jax.device_put(packed, self.replicated)
        fn = self._fn(mode, layout, num_logprobs, sample_mode)
        out, self.pool.k, self.pool.v = fn(self.params, hidden, self.pool.k, self.pool.v, bufs,
                                           override)
        return out

    def healthy(self) -> bool:
        """Whether the page pool survived the last step (see ModelRunner.healthy)."""
        try:
            jax.block_until_ready((self.pool.k, self.pool.v))
        except Exception:  # noqa: BLE001 - any failure here means the state is gone
            return False
        return not (self.pool.k.is_deleted() or self.pool.v.is_deleted())


def _stage_step(model, params, hidden, k_cache, v_cache, bufs, override, *, layout,
                num_logprobs, sample_mode):
    tokens, meta, sampling = unpack_inputs(bufs, layout)
    if override is not None:   # tokens sampled by the step before, never seen by the host
        tokens = jnp.where(override >= 0, override, tokens)
    inputs = tokens if model.first_stage else hidden
    out, (k_cache, v_cache) = model.apply({"params": params}, inputs, (k_cache, v_cache), meta)
    if model.last_stage and model.all_logits:
        scores = score_prompt(out, tokens, num_logprobs)
        out = sample(out[meta.last_token_idx], sampling, num_logprobs=num_logprobs,
                     mode=sample_mode)
        out = out.replace(next_logprob=scores[0], next_top_ids=scores[1],
                          next_top_logprobs=scores[2])
    elif model.last_stage:
        out = sample(out, sampling, num_logprobs=num_logprobs, mode=sample_mode)
    return out, k_cache, v_cache


def pack_host_inputs(tree) -> tuple[tuple[np.ndarray, np.ndarray], tuple]:
    """numpy leaves -> (one int32 array, one float32 array) plus the static layout to undo it."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    ints, floats, layout = [], [], []
    for leaf in leaves:
        leaf = np.asarray(leaf)
        if leaf.dtype == np.float32:
            floats.append(leaf.ravel())
            layout.append(("f", leaf.shape, "float32"))
        else:  # int32 and uint32 (seeds) share the int buffer bit for bit
            ints.append(leaf.astype(leaf.dtype.newbyteorder("=")).view(np.int32).ravel()
                        if leaf.dtype.itemsize == 4 else leaf.astype(np.int32).ravel())
            layout.append(("i", leaf.shape, leaf.dtype.name))
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)
    return (cat(ints, np.int32), cat(floats, np.float32)), (treedef, tuple(layout))


def unpack_inputs(bufs, layout):
    """Inverse of pack_host_inputs, traced inside the step (static slices)."""
    treedef, fields = layout
    ints, floats = bufs
    at = {"i": 0, "f": 0}
    leaves = []
    for kind, shape, dtype in fields:
        size = int(np.prod(shape))
        buf = ints if kind == "i" else floats
        flat = buf[at[kind]:at[kind] + size]
        at[kind] += size
        if dtype == "uint32":
            flat = jax.lax.bitcast_convert_type(flat, jnp.uint32)
        leaves.append(flat.reshape(shape))
    return jax.tree_util.tree_unflatten(treedef, leaves)


class ModelRunner:
    """Runs prefill, decode and chunked steps of one instance; moves pages in and out."""

    def __init__(self, spec: InstanceSpec, config: OPTConfig,
                 load_params: Callable, *, dtype, num_pages: int, page_size: int, attention,
                 max_batch_size: int, max_tokens_per_batch: int, max_blocks_per_request: int,
                 place_stages: Callable | None = None, min_decode_rows: int = 0):
        check_tensor_parallel(config, spec.tp)
        self.last_wait_s = 0.0  # time the last step blocked on device results (benchmarks)
        self.spec, self.config, self.dtype = spec, config, dtype
        self.num_pages, self.page_size = num_pages, page_size
        self.max_batch_size = max_batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.max_blocks_per_request = max_blocks_per_request
        self.min_decode_rows = (min_decode_rows or
                                platform_min_decode_rows(spec.stage_devices(0)[0].platform))
        ranges = layer_ranges(config.num_hidden_layers, spec.pp)
        if place_stages is not None:
            # Some stages live in other processes (dsjax.executor.stage_group): the hook builds
            # this process's stages and stand-ins for the others.
            self.stages = place_stages(self, ranges, load_params, attention)
            return
        parts = self._load_stage_params(load_params, ranges)
        self.stages: list[Stage] = []
        for s, (rng, part) in enumerate(zip(ranges, parts)):
            self.stages.append(Stage(config, spec.stage_devices(s), rng, s == 0,
                                     s == spec.pp - 1, part, num_pages, page_size, dtype,
                                     attention))

    def _load_stage_params(self, load_params, ranges) -> list:
        """Each stage's params on its own mesh. With even stages the loader places every stage's
        layers straight on that stage's devices (no device holds more than its share);
        otherwise the full model loads on stage 0 and is sliced and copied out."""
        spec, config = self.spec, self.config
        abstract = abstract_params(config, self.dtype)
        if spec.pp == 1:
            return [load_params(param_shardings(abstract, stage_mesh(spec.devices)))]
        meshes = [stage_mesh(spec.stage_devices(s)) for s in range(spec.pp)]
        flags = [(s == 0, s == spec.pp - 1) for s in range(spec.pp)]
        if config.num_hidden_layers % spec.pp == 0:
            full = load_params(pipeline_param_shardings(abstract, instance_mesh(spec)))
            per_stage = config.num_hidden_layers // spec.pp

            def view(mesh):
                def one(path, x):
                    keys = tuple(getattr(k, "key", str(k)) for k in path)
                    shape = ((per_stage,) + x.shape[1:]) if keys[0] == "layers" else x.shape
                    return stage_view(x, mesh, param_spec(keys), shape)
                return one
            return [jax.tree_util.tree_map_with_path(view(mesh), stage_param_tree(
                full, rng, first, last, config, take_layers=lambda x: x))
                for mesh, rng, (first, last) in zip(meshes, ranges, flags)]
        full = load_params(param_shardings(abstract, meshes[0]))
        parts = [stage_param_tree(full, rng, first, last, config)
                 for rng, (first, last) in zip(ranges, flags)]
        return [jax.device_put(part, param_shardings(part, mesh))
                for part, mesh in zip(parts, meshes)]

    # ---- steps -------------------------------------------------------------------------------

    def _pipeline(self, mode, micro_batches) -> list:
        """micro_batches: list of (tokens, meta, sampling, sample args[, token override]).
        Returns SampleOutputs."""
        return [self._run_stages(mode, *mb) for mb in micro_batches]

    def _run_stages(self, mode, tokens, meta, sampling, nlp, smode, override=None):
        packed, layout = pack_host_inputs((tokens, meta, sampling))
        x = self.stages[0].run(mode, None, packed, layout, nlp, smode, override)
        for stage in self.stages[1:]:
            x = stage.run(mode, x, packed, layout, nlp, smode)
        return x

    def _split(self, rows: list) -> list[list]:
        """Micro-batches for pipeline overlap: pp contiguous groups (one group without PP)."""
        n = min(self.spec.pp, len(rows))
        bounds = np.linspace(0, len(rows), n + 1).astype(int)
        return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def _samples(rows) -> list[SamplingRow]:
        """Every sampled row of a step, in order (a prompt may sample several sequences)."""
        return [s for r in rows for s in (r.sampling if isinstance(r.sampling, tuple)
                                          else (r.sampling,))]

    def _sampling_args(self, rows) -> tuple[int, str]:
        # Top-N ids are computed only when some row asks for N >= 1 (logprobs=0 needs only the
        # chosen token's log-probability, which every step returns). The sampler picks greedy,
        # temperature or filtered sampling at run time: one program per shape.
        nlp = MAX_LOGPROBS if any(s.params.logprobs for s in self._samples(rows)) else 0
        return nlp, "auto"

    def _sampling(self, rows, pad_to):
        samples = self._samples(rows)
        return build_sampling_tensors([s.params for s in samples], [s.seed for s in samples],
                                      [s.step for s in samples], pad_to,
                                      self.config.eos_token_id, [s.history for s in samples])

    def _slots(self, table, positions):
        table = np.asarray(table, np.int32)
        return table[positions // self.page_size] * self.page_size + positions % self.page_size

    def prefill(self, rows: list[PrefillRow]) -> StepOutput:
        """Whole prompts; samples each prompt's first output token (and scores the prompt's
        tokens when a row asks for prompt logprobs)."""
        mbs = []
        nlp, smode = self._sampling_args(rows)
        scored = any(r.sampling[0].params.prompt_logprobs is not None for r in rows)
        if scored and any(r.sampling[0].params.prompt_logprobs for r in rows):
            nlp = MAX_LOGPROBS
        groups = self._split(rows)
        for group in groups:
            lens = np.array([len(r.token_ids) for r in group], np.int32)
            total = int(lens.sum())
            per_row = np.array([len(r.sampling) for r in group])
            b_pad = bucket(max(len(group), int(per_row.sum())))
            t_pad = bucket(total, MIN_TOKEN_BUCKET)
            tokens = np.zeros(t_pad, np.int32)
            tokens[:total] = np.concatenate([r.token_ids for r in group])
            positions = np.zeros(t_pad, np.int32)
            positions[:total] = np.concatenate([np.arange(n) for n in lens])
            seq_ids = np.full(t_pad, -1, np.int32)
            seq_ids[:total] = np.repeat(np.arange(len(group)), lens)
            cu = np.full(b_pad + 1, total, np.int32)
            cu[0] = 0
            cu[1:len(group) + 1] = np.cumsum(lens)
            slots = np.full(t_pad, self.num_pages * self.page_size, np.int32)
            slots[:total] = np.concatenate(
                [self._slots(r.block_table, np.arange(n)) for r, n in zip(group, lens)])
            # A prompt's last token is sampled once per sequence it starts.
            last = np.zeros(b_pad, np.int32)
            last[:int(per_row.sum())] = np.repeat(cu[1:len(group) + 1] - 1, per_row)
            meta = PrefillMetadata(positions, seq_ids, cu, slots, last)
            mbs.append((tokens, meta, self._sampling(group, b_pad), nlp, smode))
        host = self._fetch(self._pipeline("prefill_scored" if scored else "prefill", mbs))
        out = self._collect(host, [len(self._samples(g)) for g in groups])
        if scored:
            out.prompt_scores = self._prompt_scores(groups, host)
        return out

    def decode(self, rows: list[DecodeRow]) -> StepOutput:
        """One token for each row, attending to the row's cached context and itself."""
        return self.collect(self.dispatch_decode(rows))

    def dispatch_decode(self, rows: list[DecodeRow], previous: "PendingStep | None" = None
                        ) -> "PendingStep":
        """Start a decode step and return without waiting for it. A row whose `prev_row` is
        >= 0 takes as input the token that row of `previous` (a step not collected yet)
        samples, straight from the device: the host need not know it."""
        mbs, pads = [], []
        nlp, smode = self._sampling_args(rows)
        groups = self._split(rows)
        for group in groups:
            n = len(group)
            b_pad = bucket(n, self.min_decode_rows)
            width = bucket(max(len(r.block_table) for r in group))
            tokens = np.zeros(b_pad, np.int32)
            tokens[:n] = [r.token_id for r in group]
            positions = np.zeros(b_pad, np.int32)
            positions[:n] = [r.position for r in group]
            tables = np.zeros((b_pad, width), np.int32)
            for i, r in enumerate(group):
                tables[i, :len(r.block_table)] = r.block_table
            slots = np.full(b_pad, self.num_pages * self.page_size, np.int32)
            at = positions[:n]
            slots[:n] = tables[np.arange(n), at // self.page_size] * self.page_size \
                + at % self.page_size
            context = np.zeros(b_pad, np.int32)
            context[:n] = at + 1
            meta = DecodeMetadata(positions, slots, tables, context)
            mbs.append((tokens, meta, self._sampling(group, b_pad), nlp, smode,
                        self._token_override(group, b_pad, previous)))
            pads.append(b_pad)
        return PendingStep(self._pipeline("decode", mbs), [len(g) for g in groups], pads)

    def _token_override(self, group, b_pad: int, previous: "PendingStep | None"):
        """[b_pad] token ids for the first stage: the previous step's samples where rows ask
        for them, -1 elsewhere (always an array, so one program serves both cases)."""
        idx = np.full(b_pad, -1, np.int32)
        if previous is not None:
            idx[:len(group)] = [previous.flat_row(r.prev_row) for r in group]
        if previous is None or not (idx >= 0).any():
            return idx
        return _select_tokens(tuple(o.tokens for o in previous.outs), idx)

    def warm_token_selection(self, previous_steps: list["PendingStep"], batch_buckets) -> None:
        """Compile the async input-token selection for every (previous step, batch bucket)
        pair, so a batch that grows or shrinks after ready compiles nothing."""
        for previous in previous_steps:
            for b_pad in batch_buckets:
                _select_tokens(tuple(o.tokens for o in previous.outs),
                               np.zeros(b_pad, np.int32)).block_until_ready()

    def collect(self, pending: "PendingStep") -> StepOutput:
        """Wait for a dispatched step and copy its samples to the host."""
        return self._collect(self._fetch(pending.outs), pending.counts)

    def chunked(self, rows: list[ChunkRow]) -> StepOutput:
        """Mixed step: each row continues its cached context with its tokens (a prompt chunk,
        or a decode row's newest token). Samples one token per row (callers drop the samples
        of chunks that do not finish their prompt)."""
        nlp, smode = self._sampling_args(rows)
        lens = np.array([len(r.token_ids) for r in rows], np.int32)
        total = int(lens.sum())
        per_row = np.array([len(r.sampling) for r in rows])
        t_pad, b_pad = bucket(total, MIN_TOKEN_BUCKET), bucket(int(per_row.sum()), 8)
        width = bucket(max(len(r.block_table) for r in rows))
        tokens = np.zeros(t_pad, np.int32)
        positions = np.zeros(t_pad, np.int32)
        token_seq = np.full(t_pad, -1, np.int32)
        slots = np.full(t_pad, self.num_pages * self.page_size, np.int32)
        tables = np.zeros((b_pad, width), np.int32)
        at = 0
        for i, r in enumerate(rows):
            n = len(r.token_ids)
            tokens[at:at + n] = r.token_ids
            positions[at:at + n] = np.arange(r.start, r.start + n)
            token_seq[at:at + n] = i
            slots[at:at + n] = self._slots(r.block_table, np.arange(r.start, r.start + n))
            tables[i, :len(r.block_table)] = r.block_table
            at += n
        last = np.zeros(b_pad, np.int32)
        last[:int(per_row.sum())] = np.repeat(np.cumsum(lens) - 1, per_row)
        meta = ChunkedMetadata(positions, token_seq, slots, tables, last)
        mb = [(tokens, meta, self._sampling(rows, b_pad), nlp, smode)]
        return self._collect(self._fetch(self._pipeline("chunked", mb)),
                             [int(per_row.sum())])

    @staticmethod
    def _prompt_scores(groups, host_outs) -> list:
        """Per sampled row: the log-probability of each prompt token after the first, and the
        top-N alternatives at each of those positions."""
        scores = []
        for group, host in zip(groups, host_outs):
            at = 0
            for r in group:
                n = len(r.token_ids)
                sl = slice(at, at + n - 1)   # position t scores token t+1 of the same prompt
                scores += [(host.next_logprob[sl], host.next_top_ids[sl],
                            host.next_top_logprobs[sl])] * len(r.sampling)
                at += n
        return scores

    def _fetch(self, outs: list[SampleOutput]) -> list[SampleOutput]:
        start = time.perf_counter()
        host = jax.device_get(outs)  # the step's only device -> host copy; waits for the device
        self.last_wait_s = time.perf_counter() - start
        return host

    @staticmethod
    def _collect(host: list[SampleOutput], counts: list[int]) -> StepOutput:
        cat = lambda f: np.concatenate([getattr(o, f)[:n] for o, n in zip(host, counts)])
        has_top = host[0].top_ids.shape[-1] > 0
        return StepOutput(cat("tokens"), cat("logprob"),
                          cat("top_ids") if has_top else None,
                          cat("top_logprobs") if has_top else None)

    def healthy(self) -> bool:
        """Whether the page pools survived the last step. A step that fails after its inputs
        were donated (a device or runtime fault) leaves them deleted or poisoned: the instance
        has lost every request's KV and must stop; a step that failed before (tracing, a bad
        input) left them intact, and only that step's requests are affected."""
        return all(stage.healthy() for stage in self.stages)

    # ---- pages -------------------------------------------------------------------------------

    def gather_pages(self, block_ids) -> list[tuple[jax.Array, jax.Array]]:
        """Per stage, device copies of the given pages (for migration or swap-out)."""
        return [stage.pool.gather(block_ids) for stage in self.stages]

    def insert_pages(self, block_ids, per_stage_pages) -> None:
        for stage, (k, v) in zip(self.stages, per_stage_pages):
            stage.pool.insert(block_ids, k, v)
