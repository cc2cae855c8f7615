"""DistServe's POST /generate: text or token ids in; tokens, server timestamps and lifetime
events out, whole or as newline-delimited JSON (one object per token). Field names are
DistServe's and vLLM 0.2's; unknown fields answer 400 (docs/api.md)."""
from __future__ import annotations

import json

from aiohttp import web

from dsjax.engine.request import RequestOutput
from serving.api_errors import ApiError
from serving.context import ServingContext
from serving.engine_client import EngineFailure, RequestGroup
from serving.openai_api import ABORTED, DEFAULT_MAX_TOKENS, Handler, final_outputs
from serving.request_fields import (GENERATE_FIELDS, read_fields, read_prompt,
                                    reject_unknown_fields, sampling_params)


def _logprobs_at(output: RequestOutput, index: int) -> dict[str, float] | None:
    if output.logprobs is None or index >= len(output.logprobs):
        return None
    return {str(t): lp for t, lp in output.logprobs[index].items()}


def generate_answer(output: RequestOutput) -> dict:
    answer = {"text": output.text or "", "token_ids": output.token_ids,
              "timestamps": output.token_timestamps, "lifetime_events": output.lifetime_events,
              "finish_reason": output.finish_reason}
    if output.logprobs is not None:
        answer["logprobs"] = [_logprobs_at(output, i) for i in range(len(output.token_ids))]
    return answer


def generate_stream_records(output: RequestOutput) -> list[dict]:
    """One record per new token; the text the output adds rides on its last token."""
    new = output.new_token_ids
    first = len(output.token_ids) - len(new)
    records = []
    for i, token_id in enumerate(new):
        last = i == len(new) - 1
        record = {"text": (output.new_text or "") if last else "", "token_id": token_id,
                  "timestamp": output.token_timestamps[first + i],
                  "finished": output.finished and last}
        if output.logprobs is not None:
            record["logprobs"] = _logprobs_at(output, first + i)
        if record["finished"]:
            record["finish_reason"] = output.finish_reason
            record["lifetime_events"] = output.lifetime_events
        records.append(record)
    return records


async def _stream(request: web.Request, group: RequestGroup) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        async for _, output in group.outputs():
            records = generate_stream_records(output)
            if output.finish_reason == "abort":
                records.append({"error": ABORTED})
            if records:
                await response.write("".join(json.dumps(r) + "\n" for r in records).encode())
    except EngineFailure as e:  # the engine failed this request after the stream began
        await response.write((json.dumps({"error": str(e)}) + "\n").encode())
    except ConnectionError:  # the client left; leaving the group aborts the request
        return response
    await response.write_eof()
    return response


def generate_handler(ctx: ServingContext) -> Handler:
    async def generate(request: web.Request) -> web.StreamResponse:
        body = await ctx.read_body(request)
        reject_unknown_fields(body, GENERATE_FIELDS)
        values = read_fields(body, GENERATE_FIELDS)
        if "prompt" not in values:
            raise ApiError(400, "field 'prompt' is required: text or a list of token ids",
                           param="prompt")
        ids = await ctx.prompt_ids(read_prompt(values["prompt"]))
        max_tokens = ctx.max_tokens(ids, values.get("max_tokens"), DEFAULT_MAX_TOKENS)
        params = sampling_params(values, GENERATE_FIELDS, max_tokens=max_tokens)
        with ctx.client.submit([ids], [params], id_prefix="gen") as group:
            if values.get("stream"):
                return await _stream(request, group)
            return web.json_response(generate_answer((await final_outputs(group))[0]))
    return generate
