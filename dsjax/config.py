"""Engine configuration: one frozen dataclass, DistServe's names, loadable from configs/*.toml."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from dsjax.executor.hosts import backend_names

ENGINE_MODES = ("disaggregated", "colocated", "chunked")
DTYPES = ("auto", "float32", "bfloat16", "float16")
WARMUP_ALL = -1   # a warmup_* limit: as far as the model and the instance's limits go


@dataclasses.dataclass(frozen=True)
class InstanceNodes:
    """Where the "ray" backend puts one instance (a plan file's `[[instances]]` table): on
    `node`, one actor; or with `stage_nodes`, one actor per pipeline stage, stage s on
    stage_nodes[s]. Nodes are named by the IP address their Ray node registered, or "#k": the
    k-th alive node in address order (what `python -m dsjax.placement --output` writes)."""
    role: str                            # prefill | decode | colocated | chunked
    index: int                           # among the instances of its role
    node: str | None = None
    stage_nodes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str = "opt-125m"              # a Hugging Face OPT directory, or a size name (dummy)
    tokenizer: str | None = None         # directory; None = the model's, else GPT-2 BPE fallback
    dtype: str = "auto"                  # auto: bfloat16 on accelerators, float32 on CPU
    load_format: str = "auto"            # auto | dummy | safetensors | pt | orbax
    seed: int = 0
    mode: str = "disaggregated"
    context_tensor_parallel_size: int = 1
    context_pipeline_parallel_size: int = 1
    decoding_tensor_parallel_size: int = 1
    decoding_pipeline_parallel_size: int = 1
    num_prefill_instances: int = 1
    num_decode_instances: int = 1
    block_size: int = 16
    max_num_blocks_per_req: int = 256
    # Automatic prefix caching (vLLM's default): a prompt starts from the longest prefix of
    # full blocks an instance already computed (same tokens, same cache_salt), in every mode;
    # a decode instance pulls only the blocks it does not hold.
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    # KV cache bytes per device where there is no accelerator; 0: a share of the memory free
    # at start (dsjax.executor.kv_cache.auto_cpu_kv_bytes)
    cpu_kv_cache_bytes: int = 0
    num_blocks: int | None = None        # override the memory-derived page count (tests)
    swap_space: float = 4.0              # GiB of host memory per decode instance for swapped KV
    context_max_batch_size: int = 128
    context_max_tokens_per_batch: int = 4096   # the largest prefill step (a hard cap)
    # Prompt tokens a prefill step batches: 0 picks it after warm-up from measured step times,
    # the largest power of two whose step takes at most a quarter of ttft_slo (the cap when
    # nothing was measured). A prompt longer than the budget still runs, alone.
    prefill_token_budget: int = 0
    ttft_slo: float = 2.5                # seconds; the paper's OPT-66B chatbot SLO
    decoding_max_batch_size: int = 256
    decoding_max_tokens_per_batch: int = 65536
    # A decode instance pulls a prefilled request only while the prompts already waiting in it
    # hold under this share of its KV blocks: the queue then lives in prefill memory (DistServe).
    decoding_waiting_share: float = 0.05
    # A decode instance gives up on a request's KV after this long (a stalled or dead prefill
    # source): that request fails, alone; decode steps never wait for a pull.
    kv_pull_timeout_s: float = 30.0
    # When an instance dies (or a request's KV is lost), its requests are recomputed on live
    # instances and their streams go on; off: they fail, as in vLLM and DistServe.
    recompute_on_failure: bool = True
    attention_backend: str = "auto"      # auto | xla | pallas
    # Dispatch decode step N+1 before reading step N's samples (vLLM's async scheduling), so
    # the host's bookkeeping overlaps the device's work.
    async_scheduling: bool = True
    # Where instances run: "uni" = threads of this process (KV by device_put), "mp" = one OS
    # process each with its own devices (KV over JAX transfer servers bound to kv_transfer_host).
    # "ray" = one Ray actor each, on any node of a cluster (KV over transfer servers bound to
    # each actor's node address; docs/scale-out.md).
    distributed_executor_backend: str = "uni"
    kv_transfer_host: str = "127.0.0.1"
    ray_address: str | None = None       # a running cluster ("auto", "host:port"); None = local
    # Ray: each pipeline stage of an instance its own actor (one placement bundle per stage,
    # packed onto as few nodes as fit), so an instance can span nodes; activations then cross
    # by transfer servers. Off: an instance is one actor on one node.
    ray_stage_actors: bool = False
    # Ray: node assignments per instance (InstanceNodes, or tables with its keys); the rest go
    # wherever Ray places them.
    instances: tuple = ()
    # mp and ray: an instance process silent this long (frozen, or its node cut off) is failed
    # and its requests with it; it says it lives every half second.
    instance_heartbeat_timeout: float = 15.0
    # JAX's persistent compilation cache, so a restart does not compile again: "auto" is
    # $XDG_CACHE_HOME/dsjax/jax (~/.cache/dsjax/jax), "" turns it off, else a directory.
    compilation_cache_dir: str = "auto"
    # Compile the step programs of this workload before serving (0 = compile on first use).
    # WARMUP_ALL (-1): every prompt length and context the model takes, every batch the
    # instance's limits allow (what `python -m serving` does).
    warmup_max_prompt_len: int = 0
    warmup_max_context_len: int = 0      # 0: the prompt length + 1
    warmup_max_prefill_batch: int = 8
    warmup_max_decode_batch: int = 64
    # The smallest decode batch bucket (a power of two), 0: by platform, 1 on a CPU (a padded
    # row costs as much as a real one there), 8 on an accelerator (8 rows cost what 1 does).
    # Larger: fewer programs to compile, more padded rows.
    min_decode_rows: int = 0
    log_status: bool = False             # print each instance's status line once per second
    status_interval: float = 1.0

    def __post_init__(self):
        if self.mode not in ENGINE_MODES:
            raise ValueError(f"mode must be one of {ENGINE_MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for f in ("block_size", "max_num_blocks_per_req", "context_max_batch_size",
                  "context_max_tokens_per_batch", "decoding_max_batch_size",
                  "decoding_max_tokens_per_batch"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.cpu_kv_cache_bytes < 0:
            raise ValueError(f"cpu_kv_cache_bytes must be >= 0 (0: sized from free memory), "
                             f"got {self.cpu_kv_cache_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.prefill_token_budget < 0:
            raise ValueError(f"prefill_token_budget must be >= 0 (0 = measured), got "
                             f"{self.prefill_token_budget}")
        if not self.ttft_slo > 0:
            raise ValueError(f"ttft_slo must be > 0 seconds, got {self.ttft_slo}")
        if self.distributed_executor_backend not in backend_names():
            raise ValueError(f"distributed_executor_backend must be one of {backend_names()}, "
                             f"got {self.distributed_executor_backend!r}")
        if not self.instance_heartbeat_timeout > 0:
            raise ValueError(f"instance_heartbeat_timeout must be > 0 seconds, got "
                             f"{self.instance_heartbeat_timeout}")
        for f in ("warmup_max_prompt_len", "warmup_max_context_len"):
            if getattr(self, f) < WARMUP_ALL:
                raise ValueError(f"{f} must be >= 0 (0 = off), or {WARMUP_ALL} for the "
                                 f"model's whole context; got {getattr(self, f)}")
        for f in ("warmup_max_prefill_batch", "warmup_max_decode_batch"):
            if getattr(self, f) < 1 and getattr(self, f) != WARMUP_ALL:
                raise ValueError(f"{f} must be >= 1, or {WARMUP_ALL} for the instance's "
                                 f"batch limit; got {getattr(self, f)}")
        if self.min_decode_rows < 0 or self.min_decode_rows & (self.min_decode_rows - 1):
            raise ValueError(f"min_decode_rows must be 0 (by platform) or a power of two, got "
                             f"{self.min_decode_rows}")
        if self.min_decode_rows > self.decoding_max_batch_size:
            raise ValueError(f"min_decode_rows ({self.min_decode_rows}) exceeds "
                             f"decoding_max_batch_size ({self.decoding_max_batch_size}): lower it")
        if not 0 < self.decoding_waiting_share <= 1:
            raise ValueError(f"decoding_waiting_share must be in (0, 1], got "
                             f"{self.decoding_waiting_share}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        object.__setattr__(self, "instances", self._check_instances())

    def _check_instances(self) -> tuple[InstanceNodes, ...]:
        if not self.instances:
            return ()
        from dsjax.executor.parallel import placement_groups
        known = {f.name for f in dataclasses.fields(InstanceNodes)}
        pp_of = {role: (n, pp) for role, n, _, pp in placement_groups(
            self.mode, **self.placement_kwargs())}
        out = []
        for entry in self.instances:
            if isinstance(entry, dict):
                if set(entry) - known or not {"role", "index"} <= set(entry):
                    raise ValueError(f"an instances entry takes role, index and node or "
                                     f"stage_nodes; got {sorted(entry)}")
                entry = InstanceNodes(**entry)
            if not isinstance(entry, InstanceNodes):
                raise ValueError(f"instances entries are tables (role, index, node), got "
                                 f"{entry!r}")
            entry = dataclasses.replace(entry, stage_nodes=tuple(entry.stage_nodes))
            where = f"instances entry {entry.role}{entry.index}"
            if entry.role not in pp_of or not 0 <= entry.index < pp_of[entry.role][0]:
                raise ValueError(f"{where}: no such instance in this placement "
                                 f"({', '.join(f'{r} x{n}' for r, (n, _) in pp_of.items())})")
            if bool(entry.node) == bool(entry.stage_nodes):
                raise ValueError(f"{where}: give either node or stage_nodes")
            if entry.stage_nodes and len(entry.stage_nodes) != pp_of[entry.role][1]:
                raise ValueError(f"{where}: stage_nodes needs one node per pipeline stage "
                                 f"({pp_of[entry.role][1]}), got {len(entry.stage_nodes)}")
            out.append(entry)
        if out and self.distributed_executor_backend != "ray":
            raise ValueError("node assignments (instances) need distributed_executor_backend "
                             "= 'ray'")
        if len({(e.role, e.index) for e in out}) < len(out):
            raise ValueError("instances: an instance is assigned twice")
        return tuple(out)

    def nodes_for(self, role: str, index: int) -> InstanceNodes | None:
        """The node assignment of one instance, if the config has one."""
        return next((e for e in self.instances if (e.role, e.index) == (role, index)), None)

    def placement_kwargs(self) -> dict:
        names = ("context_tensor_parallel_size", "context_pipeline_parallel_size",
                 "decoding_tensor_parallel_size", "decoding_pipeline_parallel_size",
                 "num_prefill_instances", "num_decode_instances")
        return {n: getattr(self, n) for n in names}

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "EngineConfig":
        """Settings from a TOML file (top-level keys = field names); keyword overrides win."""
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown engine settings {unknown}; known: {sorted(fields)}")
        return cls(**data)
