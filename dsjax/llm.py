"""Offline batch inference: `LLM(model).generate(prompts, sampling_params)`.

The engine's continuous batching runs underneath: all prompts are queued at once and new ones
join the running batch as others finish; outputs come back in input order.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from tqdm.auto import tqdm

from dsjax.config import EngineConfig
from dsjax.engine.core import Engine
from dsjax.engine.request import RequestOutput
from dsjax.sampling_params import SamplingParams


class LLM:
    """An OPT model served in-process.

    model: a Hugging Face OPT directory, an orbax checkpoint written by dsjax, or a size name
    like "opt-125m" (which needs load_format="dummy"). Other keywords are EngineConfig fields:
    mode ("disaggregated" default, "colocated", "chunked") and DistServe's placement names
    (context_tensor_parallel_size, decoding_pipeline_parallel_size, num_prefill_instances, ...).
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto",
                 load_format: str = "auto", seed: int = 0, devices=None, **engine_kwargs):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown settings {unknown}; EngineConfig accepts "
                            f"{sorted(known)}")
        self.config = EngineConfig(model=model, tokenizer=tokenizer, dtype=dtype,
                                   load_format=load_format, seed=seed, **engine_kwargs)
        self.engine = Engine(self.config, devices=devices)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order. Prompts are strings or token-id lists."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: "
                                 f"pass one, or one per prompt")
        streams = [self.engine.add_request(p, sp, stream=False) for p, sp in zip(prompts, params)]
        outputs = []
        with tqdm(total=len(streams), desc="generate", disable=not use_tqdm,
                  unit="req") as bar:
            for stream in streams:
                outputs.append(stream.result())
                bar.update(1)
        return outputs

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _as_prompt_list(prompts):
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id prompt
    return prompts
