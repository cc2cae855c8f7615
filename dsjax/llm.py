"""Offline batch inference: `LLM(model).generate(prompts, sampling_params)`.

The engine's continuous batching runs underneath: prompts are queued and new ones join the
running batch as others finish; outputs come back in input order. A list is queued at once;
any other iterable (a grain dataset, a generator) streams through `generate_iter`, which keeps
a bounded window of requests in flight.
"""
from __future__ import annotations

import dataclasses
import functools
import queue
from typing import Any, Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from dsjax.config import EngineConfig
from dsjax.engine.core import Engine, EngineError
from dsjax.engine.request import RequestOutput
from dsjax.sampling_params import SamplingParams


PromptInput = Any   # str | token ids | {"prompt"} | {"prompt_token_ids"} | an iterable of them


def default_window(config: EngineConfig) -> int:
    """Requests kept between the oldest output not yet delivered and the newest submitted:
    twice the decode batch limit, as vLLM's run_batch keeps 2 x max_num_seqs in flight, so the
    scheduler always has work to fill its KV blocks with."""
    return 2 * config.decoding_max_batch_size


class LLM:
    """A model (OPT, LLaMA, Mistral, Qwen, GPT-2) served in-process.

    model: a Hugging Face checkpoint directory of one of those families, an orbax checkpoint
    written by dsjax, or a size name like "opt-125m" or "llama-3.1-8b" (which needs
    load_format="dummy"). Other keywords are EngineConfig fields:
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

    def generate(self, prompts: PromptInput,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order. Prompts are strings or token-id lists
        (or vLLM's {"prompt": text} / {"prompt_token_ids": ids}); a list of them is queued at
        once, any other iterable (a generator, a grain dataset) through generate_iter's
        window."""
        if isinstance(prompts, (str, list, tuple)):
            prompts = _as_prompt_list(prompts)
            return list(self.generate_iter(prompts, sampling_params, use_tqdm=use_tqdm,
                                           window=max(1, len(prompts))))
        return list(self.generate_iter(prompts, sampling_params, use_tqdm=use_tqdm))

    def generate_iter(self, prompts: Iterable,
                      sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                      *, use_tqdm: bool = True, window: int | None = None
                      ) -> Iterator[RequestOutput]:
        """RequestOutputs in input order, each as soon as it and those before it are done, from
        any iterable of prompts (a grain MapDataset or IterDataset, a generator, a file's
        lines): nothing holds them all. At most `window` prompts (default: twice the decode
        batch limit) are between the oldest not yet yielded and the newest submitted, which
        bounds both the engine's queue and the outputs held back for ordering. Closing the
        generator early aborts the requests in flight."""
        window = window or default_window(self.config)
        if isinstance(prompts, str):
            prompts = [prompts]
        try:
            total = len(prompts)
        except TypeError:
            total = None
        per_prompt = _params_list(sampling_params, total)
        shared = None if per_prompt is not None else sampling_params or SamplingParams()
        items = iter(prompts)
        finished: queue.Queue = queue.Queue()
        held: dict[int, RequestOutput] = {}
        live: dict[int, str] = {}              # submitted, not yet finished: index -> id
        submitted = yielded = 0
        exhausted = False
        with tqdm(total=total, desc="generate", disable=not use_tqdm, unit="req") as bar:
            try:
                while True:
                    while not exhausted and submitted - yielded < window:
                        try:
                            prompt = _one_prompt(next(items))
                        except StopIteration:
                            exhausted = True
                            break
                        if per_prompt is not None and submitted == len(per_prompt):
                            raise _params_mismatch(len(per_prompt), "more")
                        params = shared if per_prompt is None else per_prompt[submitted]
                        stream = self.engine.add_request(
                            prompt, params, stream=False,
                            on_output=functools.partial(_deliver, finished, submitted))
                        live[submitted] = stream.request_id
                        submitted += 1
                    if exhausted and yielded == submitted:
                        if per_prompt is not None and submitted != len(per_prompt):
                            raise _params_mismatch(len(per_prompt), submitted)
                        return
                    index, output = finished.get()
                    live.pop(index, None)
                    if isinstance(output, BaseException):
                        raise EngineError(str(output)) from output
                    held[index] = output
                    while yielded in held:
                        bar.update(1)
                        yield held.pop(yielded)
                        yielded += 1
            finally:
                for request_id in live.values():
                    self.engine.abort(request_id)

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


def _deliver(finished: queue.Queue, index: int, output) -> None:
    """The engine's callback (its router thread): a final output, or the exception that failed
    the request."""
    finished.put((index, output))


def _one_prompt(item) -> str | list[int]:
    """A prompt from an item of an iterable: text, token ids (a list or an array), or vLLM's
    TextPrompt / TokensPrompt dicts."""
    if isinstance(item, dict):
        if "prompt_token_ids" in item:
            item = item["prompt_token_ids"]
        elif "prompt" in item:
            item = item["prompt"]
        else:
            raise ValueError(f"a prompt dict needs 'prompt' (text) or 'prompt_token_ids', got "
                             f"keys {sorted(item)}")
    if isinstance(item, str):
        return item
    if hasattr(item, "tolist"):   # numpy arrays, as grain records often are
        item = item.tolist()
    return list(item)


def _params_list(sampling_params, count: int | None) -> list[SamplingParams] | None:
    """One SamplingParams per prompt, or None when one is shared (None: the defaults)."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return None
    params = list(sampling_params)
    if count is not None and len(params) != count:
        raise _params_mismatch(len(params), count)
    return params


def _params_mismatch(have: int, prompts) -> ValueError:
    return ValueError(f"got {have} SamplingParams for {prompts} prompts: pass one, or one per "
                      f"prompt")


def _as_prompt_list(prompts):
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id prompt
    return prompts
