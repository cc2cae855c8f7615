"""OpenAI-compatible POST /v1/completions (batched prompts, SSE streaming) and GET /v1/models.

Streams follow OpenAI's wire format closely enough for the official `openai` client: one SSE
event per generated token, a usage chunk (empty `choices`) only when `stream_options.
include_usage` asks for it (usage in every chunk too with vLLM's `continuous_usage_stats`),
then `data: [DONE]`. A list of prompts runs as one engine request
per prompt; choices come back in prompt order with their `index` (n per prompt: choice
i * n + j is sequence j of prompt i), usage summed. `echo` puts the prompt (and, with logprobs,
its log-probabilities) before each choice's text. Unknown fields
are ignored, as OpenAI-compatible servers do; fields dsjax cannot honour answer 400
(request_fields.py). The SSE writer and token logprobs here serve /v1/chat/completions too.

Each endpoint is a check (body -> CheckedBody: fields, then token ids -> EngineJob) that the
HTTP handler and the batch job (serving/batch_lines.py) both run, so they accept the same
fields and answer the same JSON.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from dsjax.engine.request import RequestOutput
from dsjax.sampling_params import SamplingParams
from serving.api_errors import ApiError, openai_error
from serving.context import ServingContext
from serving.engine_client import EngineFailure, RequestGroup
from serving.request_fields import (COMPLETION_FIELDS, read_fields, read_prompts,
                                    sampling_params, stream_usage)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_MAX_TOKENS = 16   # OpenAI's and vLLM's default for completions
MIN_LOGPROB = -9999.0     # stands for -inf, which JSON cannot carry (as vLLM)
ABORTED = "request aborted: the server is shutting down"


def usage(outputs: list[RequestOutput]) -> dict:
    """Usage of a request's final outputs: every returned sequence's tokens (n > 1), and the
    prompt tokens the prefix cache supplied (as vLLM reports them)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(s.token_ids) for o in outputs for s in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens
                                                           for o in outputs)}}


def usage_so_far(output: RequestOutput, completion_tokens: int) -> dict:
    """One request's usage after its first `completion_tokens` tokens (continuous_usage_stats)."""
    prompt = len(output.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


def new_tokens(output) -> list[tuple[int, int, str]]:
    """(position, token id, text) per token new in `output` (a RequestOutput or one of its
    sequences); its new text rides on the last."""
    new = output.new_token_ids
    first = output.num_tokens - len(new)
    return [(first + i, t, (output.new_text or "") if i == len(new) - 1 else "")
            for i, t in enumerate(new)]


class TokenLogprobs:
    """A token's text, bytes and log-probabilities, from the engine's per-token tables."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def bytes(self, token_id: int) -> list[int]:
        if self.tokenizer is None:
            return list(self.text(token_id).encode())
        return list(self.tokenizer.token_bytes(token_id, skip_special_tokens=False))

    @staticmethod
    def top(table: dict[int, float], n: int) -> list[tuple[int, float]]:
        return [(t, max(lp, MIN_LOGPROB)) for t, lp in sorted(table.items(),
                                                              key=lambda kv: -kv[1])[:n]]

    @staticmethod
    def chosen(table: dict[int, float], token_id: int) -> float | None:
        lp = table.get(token_id)
        return None if lp is None else max(lp, MIN_LOGPROB)


# ---- SSE ------------------------------------------------------------------------------------

def sse(payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def stream_sse(request: web.Request, group: RequestGroup,
                     chunks: Callable[[int, RequestOutput], list[dict]],
                     usage_chunk: Callable[[list[RequestOutput]], dict] | None
                     ) -> web.StreamResponse:
    """Write `chunks(index, output)` per output, the usage chunk (if asked for), [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        async for index, output in group.outputs():
            events = [sse(c) for c in chunks(index, output)]
            if output.finish_reason == "abort":
                events.append(sse(openai_error(503, ABORTED)))
                await response.write(b"".join(events))
                break
            await response.write(b"".join(events))
        else:
            if usage_chunk is not None:
                await response.write(sse(usage_chunk(group.final)))
    except EngineFailure as e:
        await response.write(sse(openai_error(e.status, str(e))))
    except ConnectionError:  # the client left; leaving the group aborts its requests
        return response
    await response.write(sse("[DONE]"))
    await response.write_eof()
    return response


async def final_outputs(group: RequestGroup) -> list[RequestOutput]:
    """Every request's final output; 500 or 503 when the engine failed one (EngineFailure),
    503 when aborted."""
    try:
        finals = await group.results()
    except EngineFailure as e:
        raise ApiError(e.status, str(e), e.headers) from e
    if any(f.finish_reason == "abort" for f in finals):
        raise ApiError(503, ABORTED, {"Retry-After": "1"})
    return finals


# ---- POST /v1/completions -------------------------------------------------------------------

class CompletionChoices:
    """The JSON objects of one completion: chunks, choices and OpenAI's logprobs object.
    Choice `i * n + j` is sequence j of prompt i (n sequences per prompt)."""

    def __init__(self, request_id: str, model: str, logprobs: TokenLogprobs,
                 num_logprobs: int | None, n: int, continuous_usage: bool = False,
                 echo: bool = False):
        self.base = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                     "model": model}
        self.logprobs = logprobs
        self.num_logprobs = num_logprobs
        self.n = n
        self.text_offset: dict[int, int] = {}
        self.continuous_usage = continuous_usage
        self.echo = echo
        self.echoed: set[int] = set()   # choices whose prompt went out (streaming)

    def _logprobs(self, index: int, tables, tokens) -> dict | None:
        """OpenAI's logprobs object for `tokens` (position, id, _), whose tables (None: the
        first prompt token, which has no log-probability) are `tables[position]`."""
        if self.num_logprobs is None or tables is None:
            return None
        result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for position, token_id, _ in tokens:
            table = tables[position]
            text = self.logprobs.text(token_id)
            result["tokens"].append(text)
            result["token_logprobs"].append(None if table is None else
                                            self.logprobs.chosen(table, token_id))
            result["top_logprobs"].append(None if table is None else {
                self.logprobs.text(t): lp for t, lp in self.logprobs.top(table,
                                                                         self.num_logprobs)})
            result["text_offset"].append(self.text_offset.get(index, 0))
            self.text_offset[index] = self.text_offset.get(index, 0) + len(text)
        return result

    def _prompt_part(self, index: int, output: RequestOutput) -> tuple[str, dict | None]:
        """With echo: the prompt's text and (when logprobs are asked) its logprobs object."""
        ids = output.prompt_token_ids
        text = output.prompt if output.prompt is not None else (
            self.logprobs.tokenizer.decode(ids) if self.logprobs.tokenizer is not None else "")
        tokens = [(p, t, "") for p, t in enumerate(ids)]
        return text, self._logprobs(index, output.prompt_logprobs, tokens)

    def _choice(self, index: int, seq, tokens, text: str, finished: bool,
                prefix: tuple[str, dict | None] | None = None) -> dict:
        # Its tables read in place (positions before its length): copying them all per
        # streamed token would make a stream with logprobs quadratic in its length.
        logprobs = self._logprobs(index, seq.history.logprobs, tokens)
        if prefix is not None:
            text = prefix[0] + text
            if prefix[1] is not None and logprobs is not None:
                logprobs = {k: prefix[1][k] + logprobs[k] for k in logprobs}
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": seq.finish_reason if finished else None}

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict]:
        """One chunk per new token of each sequence, OpenAI-style."""
        chunks = []
        for seq in output.outputs:
            index = prompt_index * self.n + seq.index
            prefix = None
            if self.echo and index not in self.echoed:
                self.echoed.add(index)
                prefix = self._prompt_part(index, output)
            tokens = new_tokens(seq)
            if not tokens and prefix is not None:
                chunks.append({**self.base, "choices": [self._choice(index, seq, [], "", False,
                                                                     prefix)]})
            for i, token in enumerate(tokens):
                last = seq.finished and i == len(tokens) - 1
                chunk = {**self.base, "choices": [self._choice(index, seq, [token], token[2],
                                                               last, prefix if i == 0 else None)]}
                if self.continuous_usage:
                    chunk["usage"] = usage_so_far(output, token[0] + 1)
                chunks.append(chunk)
        return chunks

    def usage_chunk(self, finals: list[RequestOutput]) -> dict:
        return {**self.base, "choices": [], "usage": usage(finals)}

    def answer(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, final in enumerate(finals):
            for seq in final.outputs:
                index = i * self.n + seq.index
                # Per choice: each choice's text_offset counts from its own echoed prompt.
                prefix = self._prompt_part(index, final) if self.echo else None
                choices.append(self._choice(index, seq, [(p, t, "") for p, t in
                                                         enumerate(seq.token_ids)],
                                            seq.text or "", True, prefix))
        return {**self.base, "choices": choices, "usage": usage(finals)}


def check_streamable(params: SamplingParams, stream: bool) -> None:
    if stream and params.num_samples > params.n:
        raise ApiError(400, "best_of > n cannot be streamed: the best sequences are known only "
                            "at the end; set stream false or best_of equal to n",
                       param="best_of")


# ---- a body checked, then tokenized: what the handlers and the batch job share ---------------

@dataclasses.dataclass(frozen=True)
class EngineJob:
    """A checked, tokenized body: its engine requests, and the writer of its answer."""
    prompts: list[list[int]]
    params: list[SamplingParams]
    id_prefix: str
    stream: bool
    final_usage: bool                  # streams: a usage chunk before [DONE]
    formatter: Callable[[str], Any]    # the group's id -> CompletionChoices | ChatChoices
    cache_salt: str | None = None      # its prompts' prefix-cache salt


@dataclasses.dataclass(frozen=True)
class CheckedBody:
    """A body whose fields passed their checks; its text prompts are still to be tokenized
    (on the event loop by the server, on pipeline threads by the batch job)."""
    prompts: list[str | list[int]]
    add_special_tokens: bool
    to_job: Callable[[list[list[int]]], EngineJob]   # each prompt's token ids -> the job

    async def job(self, ctx: ServingContext) -> EngineJob:
        return self.to_job([await ctx.prompt_ids(p, self.add_special_tokens)
                            for p in self.prompts])

    def job_blocking(self, ctx: ServingContext) -> EngineJob:
        return self.to_job([ctx.prompt_ids_blocking(p, self.add_special_tokens)
                            for p in self.prompts])


BodyCheck = Callable[[ServingContext, dict], CheckedBody]


async def json_answer(ctx: ServingContext, job: EngineJob) -> dict:
    """The whole answer of a job that does not stream, once every output is final."""
    with ctx.client.submit(job.prompts, job.params, id_prefix=job.id_prefix,
                           stream=False, cache_salt=job.cache_salt) as group:
        return job.formatter(group.id).answer(await final_outputs(group))


def openai_handler(ctx: ServingContext, check: BodyCheck) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        job = await check(ctx, await ctx.read_body(request)).job(ctx)
        if not job.stream:
            return web.json_response(await json_answer(ctx, job))
        with ctx.client.submit(job.prompts, job.params, id_prefix=job.id_prefix,
                               stream=True, cache_salt=job.cache_salt) as group:
            fmt = job.formatter(group.id)
            return await stream_sse(request, group, fmt.chunks,
                                    fmt.usage_chunk if job.final_usage else None)
    return handle


def check_completion(ctx: ServingContext, body: dict) -> CheckedBody:
    """A /v1/completions body, checked."""
    values = read_fields(body, COMPLETION_FIELDS)
    model = ctx.model_name(values.get("model"))
    if "prompt" not in values:
        raise ApiError(400, "field 'prompt' is required: a string, a list of token ids, or "
                            "a list of either (a batch)", param="prompt")
    prompts = read_prompts(values["prompt"], ctx.max_model_len)
    final_usage, continuous_usage = stream_usage(values)
    # echo with logprobs returns the prompt's log-probabilities too (vLLM's prompt_logprobs).
    echo = values.get("echo", False)
    scored = {"prompt_logprobs": values["logprobs"]} if echo and "logprobs" in values else {}
    stream = bool(values.get("stream"))

    def to_job(ids: list[list[int]]) -> EngineJob:
        params = [sampling_params(values, COMPLETION_FIELDS, max_tokens=ctx.max_tokens(
                      prompt_ids, values.get("max_tokens"), DEFAULT_MAX_TOKENS), **scored)
                  for prompt_ids in ids]
        check_streamable(params[0], stream)
        return EngineJob(ids, params, "cmpl", stream, final_usage, lambda group_id: (
            CompletionChoices(group_id, model, TokenLogprobs(ctx.tokenizer), params[0].logprobs,
                              params[0].n, continuous_usage, echo)), values.get("cache_salt"))
    return CheckedBody(prompts, values.get("add_special_tokens", True), to_job)


def completions_handler(ctx: ServingContext) -> Handler:
    return openai_handler(ctx, check_completion)


# ---- GET /v1/models -------------------------------------------------------------------------

def model_card(ctx: ServingContext, name: str) -> dict:
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "dsjax",
            "root": ctx.root, "parent": None, "max_model_len": ctx.max_model_len}


def models_handler(ctx: ServingContext) -> Handler:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list",
                                  "data": [model_card(ctx, n) for n in ctx.model_names]})
    return models


def model_handler(ctx: ServingContext) -> Handler:
    async def model(request: web.Request) -> web.Response:
        return web.json_response(model_card(ctx, ctx.model_name(request.match_info["model"])))
    return model
