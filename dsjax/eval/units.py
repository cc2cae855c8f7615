"""A serving unit: the instances one copy of a placement runs, as the search, the simulator and
the server each need to see them."""
from __future__ import annotations

import dataclasses

from dsjax.eval.simulator import CROSS_NODE_BYTES_PER_S, NVLINK_BYTES_PER_S, Parallelism, SimConfig

UNIT_MODES = ("disaggregated", "colocated", "chunked")


@dataclasses.dataclass(frozen=True)
class Unit:
    mode: str                          # one of UNIT_MODES
    prefill: Parallelism               # colocated / chunked: the engine's shape
    decode: Parallelism | None = None  # disaggregated only
    num_prefill: int = 1               # disaggregated: instances per copy
    num_decode: int = 0
    chunk: int | None = None           # chunked: tokens per iteration
    affinity: str = "high"             # disaggregated "low": stages holding the same layers
    nodes: int = 1                     # share a node (KV over NVLink); the unit spans `nodes`

    def __post_init__(self):
        if self.mode not in UNIT_MODES:
            raise ValueError(f"unknown unit mode {self.mode!r}; choose one of {UNIT_MODES}")
        if (self.mode == "disaggregated") != (self.decode is not None):
            raise ValueError("a disaggregated unit needs a decode shape; other modes have none")
        if (self.mode == "chunked") != (self.chunk is not None):
            raise ValueError("a chunked unit needs a token budget; other modes have none")

    @property
    def num_gpus(self) -> int:
        if self.mode != "disaggregated":
            return self.prefill.num_gpus
        return self.num_prefill * self.prefill.num_gpus + self.num_decode * self.decode.num_gpus

    def blocks(self) -> list[int]:
        """GPU groups that must each sit inside one node (a TP group; a low-affinity unit whole)."""
        if self.mode != "disaggregated":
            return [self.prefill.tp] * self.prefill.pp
        if self.affinity == "low":
            return [self.num_gpus // self.nodes] * self.nodes
        return [self.prefill.tp] * (self.prefill.pp * self.num_prefill) + \
            [self.decode.tp] * (self.decode.pp * self.num_decode)

    def describe(self, copies: int = 1) -> str:
        p = self.prefill
        if self.mode == "disaggregated":
            d = self.decode
            return (f"prefill tp={p.tp} pp={p.pp} x {self.num_prefill * copies}, "
                    f"decode tp={d.tp} pp={d.pp} x {self.num_decode * copies}")
        budget = f" budget={self.chunk}" if self.chunk else ""
        return f"tp={p.tp} pp={p.pp}{budget} x {copies}"

    def sim_config(self, base: SimConfig) -> SimConfig:
        """The simulated cluster of one copy."""
        if self.mode == "disaggregated":
            link = NVLINK_BYTES_PER_S if self.affinity == "low" else CROSS_NODE_BYTES_PER_S
            return dataclasses.replace(base, mode="disaggregated", prefill=self.prefill, decode=self.decode,
                                       num_prefill=self.num_prefill, num_decode=self.num_decode,
                                       kv_link_bytes_per_s=link)
        return dataclasses.replace(base, mode=self.mode, prefill=self.prefill, num_prefill=1,
                                   chunk_size=self.chunk or base.chunk_size)

    def engine_settings(self, model: str, copies: int, base: SimConfig) -> dict:
        """dsjax.config.EngineConfig fields for a server running `copies` copies, with the batch
        limits the simulation assumed. A colocated or chunked server is one instance: copies are
        separate servers."""
        p = self.prefill
        out = {"mode": self.mode, "model": model, "context_tensor_parallel_size": p.tp,
               "context_pipeline_parallel_size": p.pp}
        if self.mode == "disaggregated":
            out.update(decoding_tensor_parallel_size=self.decode.tp,
                       decoding_pipeline_parallel_size=self.decode.pp,
                       num_prefill_instances=self.num_prefill * copies,
                       num_decode_instances=self.num_decode * copies,
                       context_max_batch_size=base.prefill_max_batch,
                       context_max_tokens_per_batch=base.prefill_max_tokens,
                       decoding_max_batch_size=base.decode_max_batch)
        elif self.mode == "colocated":
            out.update(context_max_batch_size=base.colocated_max_batch,
                       context_max_tokens_per_batch=base.colocated_max_tokens,
                       decoding_max_batch_size=base.colocated_max_batch)
        else:
            out.update(decoding_max_batch_size=base.colocated_max_batch,
                       decoding_max_tokens_per_batch=self.chunk)
        return out

    def to_toml(self, model: str, copies: int, base: SimConfig,
                gpus_per_node: int | None = None) -> str:
        """The server config; when a disaggregated server spans nodes, also the node of each
        instance (or pipeline stage) for the "ray" backend."""
        settings = self.engine_settings(model, copies, base)
        nodes = self.node_assignments(copies, gpus_per_node) if gpus_per_node else []
        if nodes:
            settings["distributed_executor_backend"] = "ray"
        head = f"# run {copies} copies of this server\n" if self.mode != "disaggregated" and copies > 1 else ""
        text = head + "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items())
        for entry in nodes:
            text += "\n[[instances]]\n" + "".join(f"{k} = {_toml_value(v)}\n"
                                                 for k, v in entry.items())
        return text

    def node_assignments(self, copies: int, gpus_per_node: int) -> list[dict]:
        """Which node each instance (or, across nodes, each pipeline stage) of a disaggregated
        server of `copies` copies sits on, nodes named "#k" (the k-th node of the cluster, by
        address; the "ray" backend resolves them). Empty when it all fits one node.
        Low affinity: copy c spans its own `nodes` nodes and stage s of every instance sits
        on the node of its layers, so the KV of those layers moves over NVLink (Algorithm 2).
        High affinity: instances are packed first-fit, a stage never split across nodes."""
        if self.mode != "disaggregated" or self.num_gpus * copies <= gpus_per_node:
            return []
        phases = [("prefill", self.num_prefill, self.prefill),
                  ("decode", self.num_decode, self.decode)]
        out = []
        if self.affinity == "low":
            for role, per_copy, par in phases:
                for c in range(copies):
                    for j in range(per_copy):
                        stages = [f"#{c * self.nodes + s * self.nodes // par.pp}"
                                  for s in range(par.pp)]
                        out.append(_node_entry(role, c * per_copy + j, stages))
            return out
        free: list[int] = []   # free GPUs per node, in node order
        for role, per_copy, par in phases:
            for index in range(per_copy * copies):
                whole = par.tp * par.pp <= gpus_per_node
                pieces = [par.tp * par.pp] if whole else [par.tp] * par.pp
                stages = []
                for need in pieces:
                    node = next((k for k, f in enumerate(free) if f >= need), len(free))
                    if node == len(free):
                        free.append(gpus_per_node)
                    free[node] -= need
                    stages.append(f"#{node}")
                out.append(_node_entry(role, index, stages * (par.pp if whole else 1)))
        return out


def _node_entry(role: str, index: int, stages: list[str]) -> dict:
    if len(set(stages)) == 1:
        return {"role": role, "index": index, "node": stages[0]}
    return {"role": role, "index": index, "stage_nodes": stages}


def _toml_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return f'"{v}"' if isinstance(v, str) else str(v)
