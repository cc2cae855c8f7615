"""OpenAI-compatible POST /v1/completions (legacy completions API), with SSE streaming.

Follows OpenAI's wire format closely enough for the official `openai` client: one SSE event
per generated token, then a usage chunk with empty `choices`, then `data: [DONE]`. Unknown
fields are ignored, as OpenAI-compatible servers do; fields dsjax cannot honour answer 400.
"""
from __future__ import annotations

import json
import time
from typing import Awaitable, Callable

from aiohttp import web

from dsjax.engine.request import RequestOutput
from serving.engine_client import ApiError, EngineClient
from serving.request_fields import check_kind, check_prompt, read_json_object, sampling_params_from

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _check_unsupported(body: dict) -> None:
    if body.get("echo"):
        raise ApiError(400, "echo=true is not supported by dsjax: leave echo unset or false")
    if body.get("suffix"):
        raise ApiError(400, "suffix is not supported by dsjax: leave suffix unset")
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported by dsjax: leave logit_bias unset")
    for name, kind in (("echo", "bool"), ("stream", "bool"), ("user", "str"),
                       ("stream_options", "object")):
        check_kind(name, body.get(name), kind)


class CompletionFormatter:
    """Builds the OpenAI JSON objects of one completion."""

    def __init__(self, request_id: str, model: str, tokenizer, num_logprobs: int | None):
        self.base = {"id": request_id, "object": "text_completion",
                     "created": int(time.time()), "model": model}
        self.tokenizer = tokenizer
        self.num_logprobs = num_logprobs
        self.text_offset = 0

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def logprobs(self, output: RequestOutput, token_ids: list[int], start: int) -> dict | None:
        """OpenAI's logprobs object for token_ids, the tokens at output positions start..."""
        if self.num_logprobs is None or output.logprobs is None:
            return None
        result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, token_id in enumerate(token_ids):
            table = output.logprobs[start + i]
            text = self._token_text(token_id)
            top = sorted(table.items(), key=lambda kv: -kv[1])[:self.num_logprobs]
            result["tokens"].append(text)
            result["token_logprobs"].append(table.get(token_id))
            result["top_logprobs"].append({self._token_text(t): lp for t, lp in top})
            result["text_offset"].append(self.text_offset)
            self.text_offset += len(text)
        return result

    def choice(self, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {**self.base, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


def usage(output: RequestOutput) -> dict:
    prompt, completion = len(output.prompt_token_ids), len(output.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _stream_chunks(fmt: CompletionFormatter, output: RequestOutput) -> list[dict]:
    """One chunk per new token (the token's text rides on the last), OpenAI-style."""
    new = output.new_token_ids
    first = len(output.token_ids) - len(new)
    chunks = []
    for i, token_id in enumerate(new):
        last = i == len(new) - 1
        text = (output.new_text or "") if last else ""
        reason = output.finish_reason if output.finished and last else None
        chunks.append(fmt.chunk([fmt.choice(text, fmt.logprobs(output, [token_id], first + i),
                                            reason)]))
    return chunks


async def _stream_completion(request: web.Request, active, fmt: CompletionFormatter
                             ) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        async for output in active.outputs():
            events = [_sse(c) for c in _stream_chunks(fmt, output)]
            if output.finished and output.finish_reason == "abort":
                events.append(_sse({"error": {"message": "request aborted: the server is "
                                              "shutting down", "type": "unavailable"}}))
            elif output.finished:
                events.append(_sse(fmt.chunk([], usage(output))))
            if events:
                await response.write(b"".join(events))
    except RuntimeError as e:  # the engine failed after the stream began
        await response.write(_sse({"error": {"message": str(e), "type": "internal_error"}}))
    except ConnectionResetError:  # the client left; leaving the `with` aborts the request
        return response
    await response.write(_sse("[DONE]"))
    await response.write_eof()
    return response


def completions_handler(client: EngineClient, model_names: list[str], tokenizer) -> Handler:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        model = body.get("model")
        check_kind("model", model, "str")
        if model is None:
            raise ApiError(400, f"field 'model' is required: use {model_names[0]!r} "
                                f"(GET /v1/models)")
        if model not in model_names:
            raise ApiError(404, f"model {model!r} is not served here: use {model_names[0]!r} "
                                f"(GET /v1/models)", error_type="not_found_error")
        if "prompt" not in body:
            raise ApiError(400, "field 'prompt' is required: a string or a list of token ids")
        prompt = check_prompt(body["prompt"], allow_list_of_one=True)
        _check_unsupported(body)
        params = sampling_params_from(body)
        with client.submit(prompt, params, id_prefix="cmpl") as active:
            fmt = CompletionFormatter(active.request_id, model, tokenizer, params.logprobs)
            if body.get("stream"):
                return await _stream_completion(request, active, fmt)
            try:
                final = await active.result()
            except RuntimeError as e:
                raise ApiError(500, str(e), error_type="internal_error") from e
            if final.finish_reason == "abort":
                raise ApiError(503, "request aborted: the server is shutting down",
                               error_type="unavailable")
            choice = fmt.choice(final.text or "", fmt.logprobs(final, final.token_ids, 0),
                                final.finish_reason)
            return web.json_response(fmt.chunk([choice], usage(final)))
    return completions
