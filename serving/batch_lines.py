"""One request of an OpenAI batch file: read, checked and tokenized, and its output line.

Input lines are OpenAI's (and vLLM's run_batch's) {"custom_id", "method": "POST", "url",
"body"}, with url /v1/completions or /v1/chat/completions. The body goes through the HTTP
server's own checks (openai_api.check_completion, chat_api.check_chat), so the batch job
accepts the fields the server accepts and refuses the rest with the server's messages.
Output lines are {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}: the body is what the server would answer (its JSON, or its error object {"error":
{message, type, param, code}}), and `error` repeats that error object's inside (null on
success), where vLLM's readers look for it. A line that fails never stops the run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import uuid

from serving.api_errors import ApiError, openai_error
from serving.chat_api import check_chat
from serving.context import ServingContext
from serving.openai_api import EngineJob, check_completion
from serving.request_fields import parse_json_object

log = logging.getLogger("serving.batch")

ENDPOINTS = {"/v1/completions": check_completion, "/v1/chat/completions": check_chat}
LINE_EXAMPLE = ('{"custom_id": "request-1", "method": "POST", "url": "/v1/completions", '
                '"body": {"prompt": "Hello", "max_tokens": 16}}')


@dataclasses.dataclass(frozen=True)
class BatchLine:
    """An input line, ready for the engine (job) or already answered (error)."""
    index: int                  # among the file's non-blank lines (of this shard's file)
    line_number: int            # in the file, 1-based: what messages name
    custom_id: str | None
    job: EngineJob | None = None
    error: ApiError | None = None


def _envelope(ctx: ServingContext, request: dict, where: str):
    """(the endpoint's check, the body) of a parsed line, or ApiError 400 naming the fix."""
    if not isinstance(request.get("custom_id"), str):
        raise ApiError(400, f"{where} has no string 'custom_id': give every request one, to "
                            f"match its output line", param="custom_id")
    method = request.get("method", "POST")
    if method != "POST":
        raise ApiError(400, f"{where}: method {json.dumps(method)[:40]} is not served: batch "
                            f"requests are POST", param="method")
    url = request.get("url")
    if url not in ENDPOINTS:
        raise ApiError(400, f"{where}: url {json.dumps(url)[:80]} is not served by the batch "
                            f"job: use one of {list(ENDPOINTS)}", param="url")
    body = request.get("body")
    if not isinstance(body, dict):
        raise ApiError(400, f"{where}: 'body' must be a JSON object of {url}'s fields",
                       param="body")
    return ENDPOINTS[url], body


def read_line(ctx: ServingContext, index: int, line_number: int, raw: bytes) -> BatchLine:
    """Parse, check and tokenize one input line (on a grain reader thread)."""
    custom_id = None
    where = f"input line {line_number}"
    try:
        request = parse_json_object(raw, where, LINE_EXAMPLE)
        if isinstance(request.get("custom_id"), str):
            custom_id = request["custom_id"]
        check, body = _envelope(ctx, request, where)
        job = check(ctx, body).job_blocking(ctx)
        if job.stream:
            raise ApiError(400, "stream=true cannot be answered in a batch file: leave stream "
                                "unset or false", param="stream")
        return BatchLine(index, line_number, custom_id, job=job)
    except ApiError as e:
        return BatchLine(index, line_number, custom_id, error=e)
    except Exception as e:   # a bug: this line fails alone with a 500, as the server answers
        log.exception("error while reading %s", where)
        return BatchLine(index, line_number, custom_id, error=ApiError(
            500, f"internal server error: {type(e).__name__}: {e}"))


def output_line(custom_id: str | None, status: int, body: dict,
                request_id: str | None = None) -> bytes:
    """One output line (newline included): `body` is the server's answer, `status` its HTTP
    status."""
    error = None if status == 200 else body.get("error")
    return (json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                        "response": {"status_code": status,
                                     "request_id": request_id or f"batch-{uuid.uuid4().hex}",
                                     "body": body},
                        "error": error}, ensure_ascii=False) + "\n").encode()


def error_line(custom_id: str | None, error: ApiError) -> bytes:
    return output_line(custom_id, error.status,
                       openai_error(error.status, error.message, error.param))
