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


def _table(table: dict[int, float] | None) -> dict[str, float] | None:
    return None if table is None else {str(t): lp for t, lp in table.items()}


def _sequence(seq) -> dict:
    answer = {"text": seq.text or "", "token_ids": seq.token_ids,
              "timestamps": seq.token_timestamps, "finish_reason": seq.finish_reason}
    if seq.logprobs is not None:
        answer["logprobs"] = [_table(t) for t in seq.logprobs]
    return answer


def generate_answer(output: RequestOutput) -> dict:
    """The first sequence at the top level (DistServe's shape); with n > 1 every sequence in
    `outputs`; the prompt's log-probabilities when asked for (prompt_logprobs)."""
    answer = {**_sequence(output.outputs[0]), "lifetime_events": output.lifetime_events}
    if len(output.outputs) > 1:
        answer["outputs"] = [_sequence(seq) for seq in output.outputs]
    if output.prompt_logprobs is not None:
        answer["prompt_logprobs"] = [_table(t) for t in output.prompt_logprobs]
    return answer


def generate_stream_records(output: RequestOutput) -> list[dict]:
    """One record per new token of each sequence (with its `index` when n > 1); the text a
    sequence adds rides on its last new token, and so does its finish_reason once it ended.
    The stream's last record says `finished` and carries the lifetime events, whichever
    sequence it belongs to (with n > 1 the sequence that ends last need not be the last)."""
    records = []
    for seq in output.outputs:
        new = seq.new_token_ids
        first = seq.num_tokens - len(new)
        for i, token_id in enumerate(new):
            last = i == len(new) - 1
            _, timestamp, table = seq.token_at(first + i)
            record = {"text": (seq.new_text or "") if last else "", "token_id": token_id,
                      "timestamp": timestamp, "finished": False}
            if len(output.outputs) > 1:
                record["index"] = seq.index
            if table is not None:
                record["logprobs"] = _table(table)
            if last and seq.finished:
                record["finish_reason"] = seq.finish_reason
            records.append(record)
    if output.finished and (records or output.finish_reason != "abort"):
        if not records:   # every sequence had ended before: a record without a token ends it
            records.append({"text": "", "token_id": None, "timestamp": None})
        records[-1].update(finished=True, finish_reason=records[-1].get(
            "finish_reason", output.finish_reason), lifetime_events=output.lifetime_events)
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
        ids = await ctx.prompt_ids(read_prompt(values["prompt"], ctx.max_model_len))
        max_tokens = ctx.max_tokens(ids, values.get("max_tokens"), DEFAULT_MAX_TOKENS)
        params = sampling_params(values, GENERATE_FIELDS, max_tokens=max_tokens)
        with ctx.client.submit([ids], [params], id_prefix="gen",
                              stream=bool(values.get("stream"))) as group:
            if values.get("stream"):
                return await _stream(request, group)
            return web.json_response(generate_answer((await final_outputs(group))[0]))
    return generate
