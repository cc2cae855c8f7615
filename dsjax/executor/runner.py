"""ModelRunner: one instance's params and KV pages on its devices, and its jitted steps.

Each pipeline stage has its own mesh, params, page pool and compiled programs. A step turns
host-side batch descriptions into padded arrays (shape buckets bound the number of programs),
runs the stages one after another per micro-batch (JAX dispatches asynchronously, so stage s of
micro-batch i+1 overlaps stage s+1 of micro-batch i), and samples on the last stage.

Two kinds of programs, so their counts add instead of multiplying:
- a forward program per step shape: prefill per token bucket (a fixed number of prompt slots;
  on a CPU "prefill_paged", whole prompts and prompts past cached blocks alike, elsewhere
  packed prompts and, for prefix-cache hits, prefill_paged), decode per (batch bucket,
  block-table bucket), chunked per (token, row, block-table bucket); it returns the hidden
  states of the rows to sample (and, in a prefill, the prompt's scores when a row asks,
  behind a run-time branch);
- a sampler program per sampled-row bucket, shared by every mode: LM head, penalties and
  bias from the device-resident slot table, greedy/temperature/top-k/top-p chosen at run time,
  top-N log-probabilities behind a run-time branch.
No sampling option changes a shape, so no request compiles a program its shape did not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsjax.executor.batch import (ChunkRow, DecodeColumns, DecodeRow, PrefillRow,
                                  SamplingColumns, SamplingRow)
from dsjax.executor.kv_cache import PagePool, bucket, own_pages, padded_pages
from dsjax.executor.packed_params import pack_vectors, unpacked
from dsjax.executor.parallel import (InstanceSpec, instance_mesh, layer_ranges, param_shardings,
                                     pipeline_param_shardings, stage_mesh, stage_param_tree,
                                     stage_view)
from dsjax.executor.program_store import ProgramStore
from dsjax.executor.sampling import (SampleOutput, SlotTable, fill_slot, no_scores,
                                     record_tokens, sample, sampling_tensors, score_prompt,
                                     slot_inputs)
from dsjax.executor.sharded_attention import for_mesh
from dsjax.models.attention import ChunkedMetadata, DecodeMetadata, PrefillMetadata
from dsjax.models.base import ModelConfig
from dsjax.models.layers import per_layer_params
from dsjax.sampling_params import MAX_SAMPLES, SamplingParams

MIN_TOKEN_BUCKET = 16


def platform_min_decode_rows(platform: str) -> int:
    """The smallest decode batch bucket by default. On a CPU, padded rows cost as much as real
    ones (each gathers pages and multiplies), so a lone request runs as one row; an accelerator
    reads the weights once for 1 or 8 rows alike, and fewer buckets mean fewer programs."""
    return 1 if platform == "cpu" else 8


def platform_scans_layers(platform: str) -> bool:
    """Whether a stage's decode programs run its layers as one scanned body. Not on a CPU:
    there every step copied each layer's weights out of the stack (opt-125m decode at batch 1
    and 16 tokens: 46 ms a step scanned, 25 ms unrolled; the programs compile more slowly)."""
    return platform != "cpu"


def platform_compiler_options(platform: str) -> dict | None:
    """XLA options of a stage's step programs. On a CPU, LLVM's optimisation level 1, not the
    default: opt-125m decode steps at 8 and 64 rows (512 tokens) took 63-64 and 315-335 ms
    against 75-80 and 383-403 ms (benchmarks/bench_model.py, alternating), with batch 1 and
    prefill unchanged and the compiles a little quicker."""
    return {"xla_backend_optimization_level": 1} if platform == "cpu" else None


def platform_prefills_paged(platform: str) -> bool:
    """Whether every prefill runs as a continuation of the paged cache: one program per token
    bucket for whole prompts and for prompts past a cached prefix alike ("prefill_paged").
    On a CPU, where compiles are the cold start: the two families were 18 of opt-125m's
    programs and 44 s of its warm-up threads' time (benchmarks/profile_warmup.py)."""
    return platform == "cpu"


# Decode row buckets up to 8 rows, where the instance's smallest bucket is below 8 (on a CPU)
# and it runs no pipeline (`small_decode_buckets`): the powers of two, and 3 and 6 besides.
# A padded row costs a real row's attention (a group of rows walks its pages together), and a
# program costs ~3 s of cold start for opt-125m. Unpadded steps at 512 tokens (bench_model.py,
# opt-125m, two runs): 3 rows 37-43 ms, 4 rows 42-45, 5 rows 51-53, 6 rows 48-52, 7 rows
# 59-62, 8 rows 60-62: padding 5 to 6 and 7 to 8 costs nothing, 5 or 6 to 8 a sixth.
SMALL_DECODE_BUCKETS = (1, 2, 3, 4, 6, 8)


def small_decode_buckets(pp: int) -> tuple[int, ...]:
    """The small row buckets of an instance of `pp` pipeline stages: none under a pipeline,
    which splits a batch into micro-batches of any size (11 rows: 5 + 6), and warm-up's
    batches of the small buckets would not reach them all."""
    return SMALL_DECODE_BUCKETS if pp == 1 else ()


def decode_rows_bucket(n: int, minimum: int, small: tuple[int, ...]) -> int:
    """Rows a decode step of n rows is padded to: the first of `small` that holds
    max(n, minimum), past them the next power of two."""
    n = max(n, minimum)
    return next((b for b in small if b >= n), None) or bucket(n)


def decode_rows_buckets(lo: int, hi: int, small: tuple[int, ...]) -> list[int]:
    """Every decode_rows_bucket from lo rows up to hi rows' (each program a step may run)."""
    out, b = [], decode_rows_bucket(lo, lo, small)
    while b <= decode_rows_bucket(hi, lo, small):
        out.append(b)
        b = decode_rows_bucket(b + 1, lo, small)
    return out


@dataclasses.dataclass
class PendingStep:
    """A dispatched step whose samples are still on the device, micro-batch by micro-batch."""
    outs: list
    counts: list[int]   # rows per micro-batch
    token_width: int    # each micro-batch's sampled tokens, padded (_sample_step)
    want_top: bool = False   # whether any row asked for top-N log-probabilities

    def flat_row(self, row: int) -> int:
        """Index of the step's row `row` among the micro-batches' sampled tokens laid end to
        end (-1 stays -1)."""
        if row < 0:
            return -1
        offset = 0
        for count in self.counts:
            if row < count:
                return offset + row
            row -= count
            offset += self.token_width
        raise IndexError("row beyond the step's rows")


@jax.jit
def _select_tokens(previous_tokens: tuple, index):
    """Input tokens from a previous step's samples (index -1: none), as a 1-tuple (the form of
    Stage.run_program)."""
    flat = jnp.concatenate(previous_tokens)
    return (jnp.where(index >= 0, flat[jnp.maximum(index, 0)], -1).astype(jnp.int32),)


@dataclasses.dataclass
class StepOutput:
    """Host copies of one step's samples, one row per scheduled sequence."""
    tokens: np.ndarray
    logprob: np.ndarray
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None
    # Prompt scoring, per row when asked: (log p of prompt tokens 1.., top ids, top logprobs).
    prompt_scores: list | None = None


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One micro-batch's host inputs, each packed into (int32, float32) buffers with the static
    layout that unpacks them: the forward program's and the sampler's."""
    packed: tuple
    layout: tuple
    sample_packed: tuple
    sample_layout: tuple


# Each step program returns its result, then these arguments (donated) updated: the page pool
# (and the sampler's slot table).
FORWARD_DONATED = (2, 3)
SAMPLER_DONATED = (2,)
DECODE_SAMPLE_DONATED = (1, 2, 3)


def _zeros_of(info) -> jax.Array:
    """Zeros of an output's shape, dtype and sharding (copied from the host: no program)."""
    return jax.device_put(np.zeros(info.shape, info.dtype), info.sharding)


@functools.partial(jax.jit, donate_argnums=(0,))
def _fill_slot(table, slot, arrays):
    return fill_slot(table, slot, **arrays)


class Stage:
    """One pipeline stage: a tp-device mesh with its layers, params and page pool; the last
    stage also holds the sampler's slot table."""

    def __init__(self, config: ModelConfig, devices, layer_range, first: bool, last: bool,
                 params, num_pages: int, page_size: int, dtype, attention,
                 num_slots: int = 1):
        self.mesh = stage_mesh(devices)
        self.kv_head_repeat = config.kv_head_repeat(len(devices))
        self.layer_range = layer_range
        self.first, self.last = first, last
        self.params = params
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        num_layers = layer_range[1] - layer_range[0]
        kv_heads = config.cache_kv_heads(len(devices))
        self.pool = PagePool(self.mesh, num_layers, num_pages, page_size, kv_heads,
                             config.head_dim, dtype, run_program=self.run_program)
        attention = for_mesh(attention, self.mesh)
        # Decode programs unroll their layers on a CPU (platform_scans_layers), over a second
        # copy of the layer weights split per layer; prefill and chunked programs scan the
        # stacked ones (unrolling them too cost twice the cold start for 12% more prefill).
        platform = self.mesh.devices.flat[0].platform
        scan = platform_scans_layers(platform)
        self.models = {mode: config.module(attention, mode, num_layers=num_layers,
                                           first_stage=first, last_stage=last,
                                           kv_heads=kv_heads, dtype=dtype).clone(
                                               scan_layers=scan or mode != "decode")
                       for mode in ("prefill", "decode", "chunked")}
        # Prompts (whole, or past their cached blocks) with chunked attention, which reads
        # every key from the pages, and the prompt scoring of prefill.
        self.models["prefill_paged"] = self.models["chunked"]
        self._scan_decode = scan
        self._compiler_options = platform_compiler_options(platform)
        self.fns = {}
        self.rehearsing = False   # see run_program and ModelRunner.rehearsal
        self._unproven: dict = {}  # key -> store file, of loaded programs not yet run
        # Compiled programs kept on disk (None when the compilation cache is off); the key of
        # everything that built this stage, for the store's.
        self.programs = ProgramStore.for_process()
        self.devices = list(self.mesh.devices.flat)
        self.stage_key = repr((config, layer_range, first, last, num_pages, page_size,
                               str(jnp.dtype(dtype)), num_slots, self.models, self.devices))
        self.slots = None
        if last:
            self.slots = jax.jit(SlotTable.zeros, static_argnums=(0, 1),
                                 out_shardings=self.replicated)(num_slots, config.vocab_size)

    @functools.cached_property
    def decode_params(self):
        """The params decode programs take: per layer where they unroll, with the vectors
        packed into one array (fewer arguments to a step). Made on first use, so a prefill
        instance never holds the second copy."""
        if self._scan_decode:
            return self.params
        return pack_vectors(per_layer_params(self.params), self.replicated)

    def run_program(self, key, make, donated, *args):
        """Run the program `key` (made by `make()`, a jitted function that returns its result
        and then the `donated` arguments, updated) on args; the key determines every argument's
        shape and sharding (a stored program takes one). Positional-only calls keep JAX's fast
        C++ dispatch path (static keyword arguments would take the slower Python one); with a
        program store the first call loads or compiles an executable. While rehearsing
        (warm-up), a stored program is made ready but not run: its result is zeros of its
        shapes, its donated arguments come back as they were."""
        fn = self.fns.get(key)
        if fn is None:
            fn = self._make_ready(key, make, args)
        if self.rehearsing and hasattr(fn, "out_info"):
            return (jax.tree_util.tree_map(_zeros_of, fn.out_info[0]),
                    *(args[i] for i in donated))
        if self._unproven and key in self._unproven:
            return self._first_run(key, fn, args)
        return fn(*args)

    def _make_ready(self, key, make, args):
        if self.programs is None:
            fn = make()
        else:
            fn, loaded_from = self.programs.program(self.stage_key, self.devices, key, make,
                                                    args)
            if loaded_from is not None:
                self._unproven[key] = loaded_from
        self.fns[key] = fn
        return fn

    def _first_run(self, key, fn, args):
        """A loaded program's first run, waited for: if it fails, its file is removed and the
        program forgotten (this step fails; the next one of its shape compiles it again)."""
        loaded_from = self._unproven.pop(key)
        try:
            return jax.block_until_ready(fn(*args))
        except Exception as e:
            self.programs.discard(loaded_from, e)
            self.fns.pop(key, None)
            raise

    def _forward(self, mode, layout):
        return jax.jit(functools.partial(_forward_step, self.models[mode], mode=mode,
                                         layout=layout), donate_argnums=FORWARD_DONATED,
                       compiler_options=self._compiler_options)

    def _sampler(self, layout):
        return jax.jit(functools.partial(_sample_step, self.models["decode"], layout=layout),
                       donate_argnums=SAMPLER_DONATED, compiler_options=self._compiler_options)

    def _decode_and_sample(self, layout, sample_layout):
        """A whole decode step of a single-stage instance: the forward and the sampler in one
        jitted program (one dispatch per step, the host's largest fixed cost at batch 1)."""
        return jax.jit(functools.partial(_decode_sample_step, self.models["decode"],
                                         layout=layout, sample_layout=sample_layout),
                       donate_argnums=DECODE_SAMPLE_DONATED,
                       compiler_options=self._compiler_options)

    def run(self, mode, hidden, inputs: StepInputs, device_tokens=None):
        """One stage of a step on the previous stage's activations (None on the first stage);
        the last stage samples and returns a SampleOutput. `device_tokens`: tokens already on
        a device that negative packed input tokens stand for (-1 - i: element i)."""
        # Arrays from other devices are moved onto this stage's mesh (the device tokens too,
        # whether the host or the previous step made them: one signature, one program); the
        # packed host inputs go to the jitted call as NumPy, whose C++ path copies them where
        # the params live at a fraction of an explicit device_put's cost.
        if hidden is not None:
            hidden = jax.device_put(hidden, self.replicated)
        if device_tokens is not None and \
                getattr(device_tokens, "sharding", None) != self.replicated:
            device_tokens = jax.device_put(device_tokens, self.replicated)
        if mode == "decode" and self.first and self.last:   # one program, one dispatch
            layouts = (inputs.layout, inputs.sample_layout)
            samples, self.pool.k, self.pool.v, self.slots = self.run_program(
                ("decode+sample",) + layouts, lambda: self._decode_and_sample(*layouts),
                DECODE_SAMPLE_DONATED, self.decode_params, self.pool.k, self.pool.v,
                self.slots, inputs.packed, inputs.sample_packed, device_tokens)
            return samples
        out, self.pool.k, self.pool.v = self.run_program(
            ("forward", mode, inputs.layout), lambda: self._forward(mode, inputs.layout),
            FORWARD_DONATED, self.decode_params if mode == "decode" else self.params, hidden,
            self.pool.k, self.pool.v, inputs.packed, device_tokens)
        if not self.last:
            return out
        last, scores = out
        # (the rows sampled from depend on the mode: every prompt slot, or each chunk's row)
        samples, self.slots = self.run_program(
            ("sample", last.shape, last.sharding, inputs.sample_layout),
            lambda: self._sampler(inputs.sample_layout), SAMPLER_DONATED,
            self.params, last, self.slots, inputs.sample_packed)
        if scores is not None:
            samples = samples.replace(next_logprob=scores[0], next_top_ids=scores[1],
                                      next_top_logprobs=scores[2])
        return samples

    def fill_slot(self, slot: int, arrays: dict) -> None:
        """Overwrite one row of the sampler's slot table (last stage only)."""
        self.slots = _fill_slot(self.slots, np.int32(slot), arrays)

    def healthy(self) -> bool:
        """Whether the page pool survived the last step (see ModelRunner.healthy)."""
        try:
            jax.block_until_ready((self.pool.k, self.pool.v))
        except Exception:  # noqa: BLE001 - any failure here means the state is gone
            return False
        return not (self.pool.k.is_deleted() or self.pool.v.is_deleted())


def _forward_step(model, params, hidden, k_cache, v_cache, bufs, device_tokens, *, mode,
                  layout):
    params = unpacked(params)
    tokens, meta, scored = unpack_inputs(bufs, layout)
    if device_tokens is not None:
        # A host token -1 - i stands for element i of device_tokens: a token the step before
        # sampled, which the host has not read yet (ModelRunner._device_tokens).
        tokens = jnp.where(tokens >= 0, tokens, device_tokens[jnp.maximum(-1 - tokens, 0)])
    inputs = tokens if model.first_stage else hidden
    out, (k_cache, v_cache) = model.apply({"params": params}, inputs, (k_cache, v_cache), meta)
    if not model.last_stage:
        return out, k_cache, v_cache
    last = out if mode == "decode" else out[meta.last_token_idx]
    scores = None
    if mode in ("prefill", "prefill_paged"):
        logits_fn = lambda h: model.apply({"params": params}, h, method="logits")  # noqa: E731
        scores = jax.lax.cond(scored > 0, lambda: score_prompt(logits_fn, out, tokens),
                              lambda: no_scores(out.shape[0]))
    return (last, scores), k_cache, v_cache


def _decode_sample_step(model, params, k_cache, v_cache, slots, bufs, sample_bufs,
                        device_tokens, *, layout, sample_layout):
    params = unpacked(params)
    (last, _), k_cache, v_cache = _forward_step(model, params, None, k_cache, v_cache, bufs,
                                                device_tokens, mode="decode", layout=layout)
    samples, slots = _sample_step(model, params, last, slots, sample_bufs, layout=sample_layout)
    return samples, k_cache, v_cache, slots


def _sample_step(model, params, last, slots, bufs, *, layout):
    params = unpacked(params)
    source_rows, st = unpack_inputs(bufs, layout)
    logits = model.apply({"params": params}, last[source_rows], method="logits")
    out = sample(logits, st, slots)
    slots = record_tokens(slots, st.slots, out.tokens)
    # The tokens padded to the slot table's rows (max_sampled_rows, the most rows an instance
    # samples), whatever this step's bucket: the next overlapped decode step then reads them in
    # one shape (ModelRunner._device_tokens; a pipeline's selection, one program per
    # micro-batch count and bucket, not per pair of buckets: 11 programs, not 121).
    width = slots.counts.shape[0]
    return out.replace(tokens=jnp.pad(out.tokens, (0, width - out.tokens.shape[0]))), slots


_F32 = np.dtype(np.float32)
# Native 4-byte integers, viewed as int32 without a copy (dtype.name is slow: looked up here).
_WORD_NAMES = {np.dtype(np.int32): "int32", np.dtype(np.uint32): "uint32"}


def pack_host_inputs(tree) -> tuple[tuple[np.ndarray, np.ndarray], tuple]:
    """numpy leaves -> (one int32 array, one float32 array) plus the static layout to undo it."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    ints, floats, layout = [], [], []
    for leaf in leaves:
        leaf = np.asarray(leaf)
        dtype = leaf.dtype
        if dtype == _F32:
            floats.append(leaf.ravel())
            layout.append(("f", leaf.shape, "float32"))
        else:  # int32 and uint32 (seeds) share the int buffer bit for bit
            ints.append(leaf.view(np.int32).ravel() if dtype in _WORD_NAMES else
                        leaf.astype(np.int32).ravel())
            layout.append(("i", leaf.shape, _WORD_NAMES.get(dtype) or dtype.name))
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

    def __init__(self, spec: InstanceSpec, config: ModelConfig,
                 load_params: Callable, *, dtype, num_pages: int, page_size: int, attention,
                 max_batch_size: int, max_tokens_per_batch: int, max_blocks_per_request: int,
                 place_stages: Callable | None = None, min_decode_rows: int = 0):
        config.check_tensor_parallel(spec.tp)
        self.last_wait_s = 0.0  # time the last step blocked on device results (benchmarks)
        self._unread: dict[int, jax.Array] = {}   # _unread_tokens
        self.spec, self.config, self.dtype = spec, config, dtype
        self.num_pages, self.page_size = num_pages, page_size
        self.max_batch_size = max_batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.max_blocks_per_request = max_blocks_per_request
        self.min_decode_rows = (min_decode_rows or
                                platform_min_decode_rows(spec.stage_devices(0)[0].platform))
        self.small_decode_buckets = small_decode_buckets(spec.pp)
        self.prefill_reads_pages = platform_prefills_paged(spec.stage_devices(0)[0].platform)
        # Where the samples live in host memory already, a wait and a view of each array cost
        # half of jax.device_get's host time (docs/benchmarks.md, run 12); an accelerator's
        # copies are started together by device_get instead.
        self._host_resident_samples = spec.stage_devices(0)[0].platform == "cpu"
        # Attention whose loops stop at the longest live row costs nothing for a block table
        # padded to the request maximum: one width then makes one decode program per batch
        # bucket, whatever the context, so no length compiles after ready. The Pallas decode
        # grid grows with the width, so there tables stay bucketed by their longest row.
        self.fixed_table_width = (bucket(max_blocks_per_request)
                                  if getattr(attention, "work_tracks_context", False) else 0)
        # Columns of the block tables a decode step's rows are handed in (any table fits).
        self.decode_table_width = bucket(max_blocks_per_request)
        # Prompts one prefill step holds (a fixed count: not a program shape), the rows one
        # step may sample (a prompt of n = MAX_SAMPLES samples that many) and the tokens a
        # sequence may hold (the sampler's slot table is filled from up to that many).
        self.max_prompts = max_batch_size
        self.max_sampled_rows = bucket(max(max_batch_size, MAX_SAMPLES))
        self.max_tokens_per_sequence = max_blocks_per_request * page_size
        # KV bytes of one page in the whole model (every layer, K and V, the model's heads).
        self.bytes_per_page = config.kv_bytes_per_token(jnp.dtype(dtype).itemsize) * page_size
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
                                     attention, self.max_sampled_rows))

    def _load_stage_params(self, load_params, ranges) -> list:
        """Each stage's params on its own mesh. With even stages the loader places every stage's
        layers straight on that stage's devices (no device holds more than its share);
        otherwise the full model loads on stage 0 and is sliced and copied out."""
        spec, config = self.spec, self.config
        abstract = config.abstract_params(self.dtype)
        if spec.pp == 1:
            return [load_params(param_shardings(config, abstract, stage_mesh(spec.devices)))]
        meshes = [stage_mesh(spec.stage_devices(s)) for s in range(spec.pp)]
        flags = [(s == 0, s == spec.pp - 1) for s in range(spec.pp)]
        if config.num_hidden_layers % spec.pp == 0:
            full = load_params(pipeline_param_shardings(config, abstract, instance_mesh(spec)))
            per_stage = config.num_hidden_layers // spec.pp

            def view(mesh):
                def one(path, x):
                    keys = tuple(getattr(k, "key", str(k)) for k in path)
                    shape = ((per_stage,) + x.shape[1:]) if keys[0] == "layers" else x.shape
                    return stage_view(x, mesh, config.param_spec(keys, spec.tp), shape)
                return one
            return [jax.tree_util.tree_map_with_path(view(mesh), stage_param_tree(
                full, rng, first, last, config, take_layers=lambda x: x))
                for mesh, rng, (first, last) in zip(meshes, ranges, flags)]
        full = load_params(param_shardings(config, abstract, meshes[0]))
        parts = [stage_param_tree(full, rng, first, last, config)
                 for rng, (first, last) in zip(ranges, flags)]
        return [jax.device_put(part, param_shardings(config, part, mesh))
                for part, mesh in zip(parts, meshes)]

    @contextlib.contextmanager
    def rehearsal(self):
        """Steps inside make their programs ready (loaded from the program store, or compiled
        and stored) without running them, and return zeros: running warm-up's largest prefills
        (seconds each on a CPU) took most of a warm start once the store spared the tracing.
        Without a store, or on a stage in another process, steps run as usual."""
        local = [s for s in self.stages if isinstance(s, Stage)]
        for stage in local:
            stage.rehearsing = True
        try:
            yield
        finally:
            for stage in local:
                stage.rehearsing = False

    # ---- steps -------------------------------------------------------------------------------

    def _pipeline(self, mode, micro_batches) -> list:
        """micro_batches: list of (StepInputs, device tokens or None: Stage.run). Returns
        SampleOutputs."""
        return [self._run_stages(mode, *mb) for mb in micro_batches]

    def _run_stages(self, mode, inputs: StepInputs, device_tokens=None):
        x = self.stages[0].run(mode, None, inputs, device_tokens)
        for stage in self.stages[1:]:
            x = stage.run(mode, x, inputs)
        return x

    def decode_bucket(self, rows: int) -> int:
        """Rows a decode (micro-)batch of `rows` rows is padded to."""
        return decode_rows_bucket(rows, self.min_decode_rows, self.small_decode_buckets)

    def decode_buckets(self, largest: int) -> list[int]:
        """Every row bucket of decode batches up to `largest` rows (warm-up's batches)."""
        return decode_rows_buckets(self.min_decode_rows, largest, self.small_decode_buckets)

    def prefill_sample_rows(self, n: int) -> int:
        """Rows a prefill step's sampler is padded to: powers of four from the smallest decode
        bucket (1 on a CPU, where a padded row costs; 8 on accelerators), capped at the
        instance's most. Each bucket is a sampler program (about 1.5 s of opt-125m's cold
        start), and a padded row costs one row of the LM head: under 4% of a step of
        16-token prompts on a CPU."""
        rows = self.min_decode_rows
        while rows < n:
            rows *= 4
        return min(rows, self.max_sampled_rows)

    def prefill_sample_buckets(self) -> list[int]:
        """Every prefill_sample_rows value (warm-up's sampler programs)."""
        out = [self.prefill_sample_rows(1)]
        while out[-1] < self.max_sampled_rows:
            out.append(self.prefill_sample_rows(out[-1] + 1))
        return out

    def micro_batch_pads(self, rows: int) -> tuple[int, ...]:
        """The padded sizes of the micro-batches a decode batch of `rows` rows runs as."""
        return tuple(self.decode_bucket(len(part)) for part in self._split(range(rows)))

    def _split(self, rows):
        """Micro-batches for pipeline overlap: pp contiguous groups (one group without PP) of
        a list of rows, or of DecodeColumns."""
        total = rows.num_rows if isinstance(rows, DecodeColumns) else len(rows)
        n = min(self.spec.pp, total)
        if n <= 1:
            return [rows]
        bounds = np.linspace(0, total, n + 1).astype(int)
        if isinstance(rows, DecodeColumns):
            return [rows.take(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
        return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def _samples(rows) -> list[SamplingRow]:
        """Every sampled row of a step, in order (a prompt may sample several sequences)."""
        return [s for r in rows for s in (r.sampling if not isinstance(r.sampling, SamplingRow)
                                          else (r.sampling,))]

    def _inputs(self, forward, samples, source_rows, pad: int = 0) -> StepInputs:
        """Pack a micro-batch's forward inputs and its sampling rows (SamplingRows, or
        SamplingColumns; padded to `pad` rows, by default a power-of-two bucket; `source_rows`:
        which row of the forward's output each sampled row reads)."""
        if not isinstance(samples, SamplingColumns):
            samples = SamplingColumns.of_rows(samples)
        n = len(samples.steps)
        pad = pad or bucket(n, self.min_decode_rows)
        if max(n, pad) > self.max_sampled_rows:
            raise ValueError(f"a step samples {n} rows, over this instance's "
                             f"{self.max_sampled_rows}: lower the batch limits or n")
        src = np.zeros(pad, np.int32)
        src[:len(source_rows)] = source_rows
        sampling = sampling_tensors(samples, pad, self.config.eos_token_ids)
        packed, layout = pack_host_inputs(forward)
        sample_packed, sample_layout = pack_host_inputs((src, sampling))
        return StepInputs(packed, layout, sample_packed, sample_layout)

    def table_width(self, longest: int) -> int:
        """Columns of a step's block table whose longest row has `longest` pages."""
        return self.fixed_table_width or bucket(longest)

    def _slots(self, table, positions):
        table = np.asarray(table, np.int32)
        return table[positions // self.page_size] * self.page_size + positions % self.page_size

    def prefill(self, rows: list[PrefillRow]) -> StepOutput:
        """Whole prompts; samples each prompt's first output token (and scores the prompt's
        tokens when a row asks for prompt logprobs). Where `prefill_reads_pages`, rows may
        start past cached blocks too (PrefillRow.start), all in one step."""
        if self.prefill_reads_pages:
            return self.prefill_cached(rows)
        if any(r.start for r in rows):
            raise ValueError("this instance prefills whole prompts only: run prompts past "
                             "cached blocks through prefill_cached")
        return self._prefill_steps("prefill", rows, self._packed_prompts)

    def _packed_prompts(self, group, scored: bool):
        """The packed prefill's forward inputs: the prompts' tokens end to end."""
        lens = np.array([len(r.token_ids) for r in group], np.int32)
        total = int(lens.sum())
        t_pad = bucket(total, MIN_TOKEN_BUCKET)
        tokens = np.zeros(t_pad, np.int32)
        tokens[:total] = np.concatenate([r.token_ids for r in group])
        positions = np.zeros(t_pad, np.int32)
        positions[:total] = np.concatenate([np.arange(n) for n in lens])
        seq_ids = np.full(t_pad, -1, np.int32)
        seq_ids[:total] = np.repeat(np.arange(len(group)), lens)
        # A fixed number of prompt slots: the program depends on the token bucket only.
        cu = np.full(self.max_prompts + 1, total, np.int32)
        cu[0] = 0
        cu[1:len(group) + 1] = np.cumsum(lens)
        slots = np.full(t_pad, self.num_pages * self.page_size, np.int32)
        slots[:total] = np.concatenate(
            [self._slots(r.block_table, np.arange(n)) for r, n in zip(group, lens)])
        last = np.zeros(self.max_prompts, np.int32)
        last[:len(group)] = cu[1:len(group) + 1] - 1
        return tokens, PrefillMetadata(positions, seq_ids, cu, slots, last), np.int32(scored)

    def _paged_prompts(self, group, scored: bool):
        """prefill_paged's forward inputs: each prompt from its start, continuing its pages."""
        tokens, meta, lens = self._continuation(
            [(r.token_ids[r.start:], r.start, r.block_table) for r in group],
            self.max_prompts, bucket(self.max_blocks_per_request))
        last = np.zeros(self.max_prompts, np.int32)
        last[:len(group)] = np.cumsum(lens) - 1
        return tokens, meta.replace(last_token_idx=last), np.int32(scored)

    def _prefill_steps(self, mode, rows, forward_inputs) -> StepOutput:
        """Run prompts as a prefill in `mode`, a micro-batch per pipeline group
        (forward_inputs(group, scored) makes its forward's inputs), and copy its samples, and
        its prompt scores when asked for, to the host."""
        scored = any(r.sampling[0].params.prompt_logprobs is not None for r in rows)
        groups, mbs = self._split(rows), []
        for group in groups:
            if len(group) > self.max_prompts:
                raise ValueError(f"a prefill step of {len(group)} prompts exceeds this "
                                 f"instance's {self.max_prompts}")
            samples = self._samples(group)
            # A prompt's last token is sampled once per sequence it starts.
            source = np.repeat(np.arange(len(group)), [len(r.sampling) for r in group])
            mbs.append((self._inputs(forward_inputs(group, scored), samples, source,
                                     self.prefill_sample_rows(len(samples))), None))
        want_top = any(s.params.logprobs for s in self._samples(rows))
        host = self._fetch(self._pipeline(mode, mbs), want_top, scored)
        out = self._collect(host, [len(self._samples(g)) for g in groups])
        if scored:
            out.prompt_scores = self._prompt_scores(groups, host)
        return out

    def decode(self, rows: list[DecodeRow]) -> StepOutput:
        """One token for each row, attending to the row's cached context and itself."""
        return self.collect(self.dispatch_decode(rows))

    def dispatch_decode(self, rows, previous: "PendingStep | None" = None) -> "PendingStep":
        """Start a decode step and return without waiting for it. `rows`: DecodeRows, or
        DecodeColumns (a persistent batch's, which need no per-row work here). A row whose
        `prev_row` is >= 0 takes as input the token that row of `previous` (a step not
        collected yet) samples, straight from the device: the host need not know it."""
        columns = rows if isinstance(rows, DecodeColumns) else \
            DecodeColumns.of_rows(rows, self.decode_table_width)
        mbs = []
        groups = self._split(columns)
        for group in groups:
            n = group.num_rows
            b_pad = self.decode_bucket(n)
            longest = int(group.table_lens.max())
            width = self.table_width(longest)
            # Copy the longest row's bucket only: a fixed width's tail stays zero (masked).
            filled = min(bucket(longest), width)
            tables = np.zeros((b_pad, width), np.int32)
            tables[:n, :filled] = group.tables[:, :filled]
            tokens = np.zeros(b_pad, np.int32)
            tokens[:n] = group.tokens
            positions = np.zeros(b_pad, np.int32)
            at = positions[:n] = group.positions
            slots = np.full(b_pad, self.num_pages * self.page_size, np.int32)
            slots[:n] = tables[np.arange(n), at // self.page_size] * self.page_size \
                + at % self.page_size
            context = np.zeros(b_pad, np.int32)
            context[:n] = at + 1
            meta = DecodeMetadata(positions, slots, tables, context)
            device_tokens = self._device_tokens(tokens, group.prev_rows, b_pad, previous)
            inputs = self._inputs((tokens, meta, np.int32(0)), group.sampling, np.arange(b_pad),
                                  b_pad)
            mbs.append((inputs, device_tokens))
        return PendingStep(self._pipeline("decode", mbs), [g.num_rows for g in groups],
                           self.max_sampled_rows, bool(columns.sampling.logprobs.any()))

    def _device_tokens(self, tokens: np.ndarray, prev_rows: np.ndarray, b_pad: int,
                       previous: "PendingStep | None") -> jax.Array:
        """The tokens on a device that a decode micro-batch's step reads for its rows whose
        input token is the previous step's sample (prev_rows >= 0), not yet read by the host:
        each such row's host token becomes -1 - i, for element i of the returned array (written
        into `tokens`). A single-stage instance reads the previous step's samples as they are,
        with no program of its own to select them (one dispatch a step fewer, and one program
        per batch bucket); a pipeline's first stage takes them selected where the last stage
        sampled them. Always an array, of one shape per program, so a step with no such row
        runs the same program."""
        single, taken = self._single_program_decode, prev_rows >= 0
        if previous is None or not taken.any():
            return self._unread_tokens(self.max_sampled_rows if single else b_pad)
        n = len(prev_rows)
        if single:   # one micro-batch: the previous step's rows are its samples' rows
            tokens[:n] = np.where(taken, -1 - prev_rows, tokens[:n])
            return previous.outs[0].tokens
        tokens[:n] = np.where(taken, -1 - np.arange(n, dtype=np.int32), tokens[:n])
        idx = np.full(b_pad, -1, np.int32)
        idx[:n] = prev_rows if len(previous.counts) == 1 else \
            [previous.flat_row(row) for row in prev_rows.tolist()]
        return self._tokens_from(previous, idx)

    @functools.cached_property
    def _single_program_decode(self) -> bool:
        """Whether a decode step is one program (one local stage: Stage.run's decode+sample)."""
        return len(self.stages) == 1 and isinstance(self.stages[0], Stage)

    def _tokens_from(self, previous: "PendingStep", idx: np.ndarray) -> jax.Array:
        """The selection runs where the previous step's samples are: through the last stage's
        program store when it is in this process, else as a plain jitted call. One program per
        (micro-batches of the previous step, this micro-batch's bucket): each micro-batch's
        tokens come at the instance's full width (_sample_step)."""
        tokens = tuple(o.tokens for o in previous.outs)
        last = self.stages[-1]
        if not isinstance(last, Stage):
            return _select_tokens(tokens, idx)[0]
        (selected,) = last.run_program(("select", len(tokens), len(idx)),
                                       lambda: _select_tokens, (), tokens, idx)
        return selected

    def _unread_tokens(self, n: int) -> jax.Array:
        """n device tokens for a step that reads none, kept on stage 0's devices: a synchronous
        step copies nothing for them."""
        cached = self._unread.get(n)
        if cached is None:
            cached = self._unread[n] = jax.device_put(np.zeros(n, np.int32),
                                                      self.stages[0].replicated)
        return cached

    def warm_token_selection(self, previous_steps: list["PendingStep"], batch_buckets) -> None:
        """Compile the async input-token selection for every (previous step's micro-batch
        count, micro-batch bucket) pair, so a batch that grows or shrinks after ready compiles
        nothing. A single-program decode selects none (_device_tokens)."""
        if self._single_program_decode:
            return
        for previous in previous_steps:
            for b_pad in batch_buckets:
                self._tokens_from(previous, np.zeros(b_pad, np.int32)).block_until_ready()

    def collect(self, pending: "PendingStep") -> StepOutput:
        """Wait for a dispatched step and copy its samples to the host."""
        return self._collect(self._fetch(pending.outs, pending.want_top), pending.counts)

    def _continuation(self, pieces, rows_pad: int, width: int):
        """Tokens continuing cached sequences, packed: pieces are (token ids, start, block
        table) per row -> (tokens [T], ChunkedMetadata without its last-token index, lens)."""
        lens = np.array([len(ids) for ids, _, _ in pieces], np.int32)
        t_pad = bucket(int(lens.sum()), MIN_TOKEN_BUCKET)
        tokens = np.zeros(t_pad, np.int32)
        positions = np.zeros(t_pad, np.int32)
        token_seq = np.full(t_pad, -1, np.int32)
        slots = np.full(t_pad, self.num_pages * self.page_size, np.int32)
        tables = np.zeros((rows_pad, width), np.int32)
        at = 0
        for i, (ids, start, table) in enumerate(pieces):
            n = len(ids)
            tokens[at:at + n] = ids
            positions[at:at + n] = np.arange(start, start + n)
            token_seq[at:at + n] = i
            slots[at:at + n] = self._slots(table, np.arange(start, start + n))
            tables[i, :len(table)] = table
            at += n
        return tokens, ChunkedMetadata(positions, token_seq, slots, tables, None), lens

    def chunked(self, rows: list[ChunkRow]) -> StepOutput:
        """Mixed step: each row continues its cached context with its tokens (a prompt chunk,
        or a decode row's newest token). Samples one token per row (callers drop the samples
        of chunks that do not finish their prompt)."""
        per_row = np.array([len(r.sampling) for r in rows])
        # Rows and sampled rows share one bucket (a prompt's last chunk may sample several).
        b_pad = bucket(int(per_row.sum()), 8)
        width = self.table_width(max(len(r.block_table) for r in rows))
        tokens, meta, lens = self._continuation(
            [(r.token_ids, r.start, r.block_table) for r in rows], b_pad, width)
        last = np.zeros(b_pad, np.int32)
        last[:int(per_row.sum())] = np.repeat(np.cumsum(lens) - 1, per_row)
        samples = self._samples(rows)
        inputs = self._inputs((tokens, meta.replace(last_token_idx=last), np.int32(0)),
                              samples, np.arange(b_pad))
        want_top = any(s.params.logprobs for s in samples)
        return self._collect(self._fetch(self._pipeline("chunked", [(inputs, None)]), want_top),
                             [int(per_row.sum())])

    def prefill_cached(self, rows: list[PrefillRow]) -> StepOutput:
        """Prompts whose first `start` tokens are cached already (prefix-cache hits; 0 for a
        whole prompt, every CPU prefill): each row computes the rest as a continuation of its
        pages ("prefill_paged") and samples its first token(s). Rows and block tables are
        padded to the instance's maxima, so there is one program per token bucket."""
        if any(r.start and r.sampling[0].params.prompt_logprobs is not None for r in rows):
            raise ValueError("a prompt asking for prompt_logprobs must be computed whole "
                             "(start 0): its cached tokens would have no scores")
        return self._prefill_steps("prefill_paged", rows, self._paged_prompts)

    # ---- sampling slots ------------------------------------------------------------------------

    def fill_sampling_slot(self, slot: int, params: SamplingParams, prompt, output) -> None:
        """Load a sequence's penalties, bias, stop-id ban and token counts into row `slot` of
        the sampler's slot table (before the first step whose rows carry that slot)."""
        if not 0 <= slot < self.max_sampled_rows:
            raise ValueError(f"sampling slot {slot} is outside [0, {self.max_sampled_rows})")
        self.stages[-1].fill_slot(slot, slot_inputs(params, prompt, output,
                                                    self.max_tokens_per_sequence))

    @staticmethod
    def _prompt_scores(groups, host_outs) -> list:
        """Per sampled row: the log-probability of each prompt token after the first, and the
        top-N alternatives at each of those positions."""
        scores = []
        for group, host in zip(groups, host_outs):
            at = 0
            for r in group:
                n = len(r.token_ids) - r.start   # the tokens the step computed
                sl = slice(at, at + n - 1)   # position t scores token t+1 of the same prompt
                scores += [(host.next_logprob[sl], host.next_top_ids[sl],
                            host.next_top_logprobs[sl])] * len(r.sampling)
                at += n
        return scores

    def _fetch(self, outs: list[SampleOutput], want_top: bool,
               scored: bool = False) -> list[SampleOutput]:
        """The step's only device -> host copy (it waits for the device): the sampled tokens
        and their log-probabilities, plus the top-N tables and prompt scores when asked for."""
        start = time.perf_counter()
        fields = ["tokens", "logprob"] + (["top_ids", "top_logprobs"] if want_top else []) + \
            (["next_logprob", "next_top_ids", "next_top_logprobs"] if scored else [])
        arrays = [[getattr(o, f) for f in fields] for o in outs]
        if self._host_resident_samples:
            jax.block_until_ready(arrays)
            got = [[np.asarray(a) for a in row] for row in arrays]
        else:
            got = jax.device_get(arrays)
        self.last_wait_s = time.perf_counter() - start
        return [SampleOutput(**{"top_ids": None, "top_logprobs": None, **dict(zip(fields, g))})
                for g in got]

    @staticmethod
    def _collect(host: list[SampleOutput], counts: list[int]) -> StepOutput:
        cat = lambda f: np.concatenate([getattr(o, f)[:n] for o, n in zip(host, counts)])
        has_top = host[0].top_ids is not None
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
        """Write each stage's (K, V) pages at block_ids: as a gather returned them, or host
        pages as swap_copies made them, padded here to the insert's page count (the pool's
        program repeats their heads)."""
        n = len(block_ids)
        for stage, (k, v) in zip(self.stages, per_stage_pages):
            stage.pool.insert(block_ids, padded_pages(k, n), padded_pages(v, n))

    def swap_copies(self, host_pages, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """What a swap keeps of one request's gathered pages, fetched to the host: each
        stage's cut to the request's n blocks, with each model KV head once (a local stage
        with tp above the model's KV heads holds each several times; a stage actor's gather
        gives each once already). Host memory is then what swap_space counts."""
        return [tuple(own_pages(a, n, stage.kv_head_repeat) for a in pages)
                for stage, pages in zip(self.stages, host_pages)]
