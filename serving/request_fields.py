"""Reading request bodies, and the one table of request fields every endpoint parses.

Each endpoint's table (GENERATE_FIELDS, COMPLETION_FIELDS, CHAT_FIELDS) says per field: its JSON
kind, its bounds, the SamplingParams keyword it sets, and, for what dsjax cannot do yet, the
only values it accepts (`allowed`) and what to do instead. Switching a feature on is editing its
row: drop `allowed`, give `param`. Every failure is an ApiError naming the field and the fix.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from typing import Any

from aiohttp import web

from dsjax.sampling_params import MAX_LOGPROBS, MAX_SAMPLES, SamplingParams
from serving.api_errors import ApiError
from serving.content_encoding import decode_body


def _dump(value: Any, limit: int = 60) -> str:
    try:
        return json.dumps(value)[:limit]
    except RecursionError:   # parsed just under the parser's depth limit, too deep to write
        return f"a {type(value).__name__} nested too deeply"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    # NaN and infinities parse from JSON (NaN, 1e400) but no sampling setting means them.
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# kind -> (check, what the message says it should be)
KINDS = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "strs": (lambda v: isinstance(v, str) or (isinstance(v, list) and
                                              all(isinstance(s, str) for s in v)),
             "a string or a list of strings"),
    # type() is int: not bool, and no call per element (a body may hold millions)
    "ints": (lambda v: isinstance(v, list) and all(type(t) is int for t in v),
             "a list of integers"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "any": (lambda v: True, "anything"),
}

# The engine's arrays hold int32 (seeds: 64 bits); larger JSON integers would fail inside it.
INT_BITS = {"seed": 64}
DEFAULT_INT_BITS = 32


@dataclasses.dataclass(frozen=True)
class Field:
    kind: str
    param: str | None = None          # the SamplingParams keyword it sets; None: read elsewhere
    low: float | None = None          # inclusive bounds (each element, for "ints")
    high: float | None = None
    allowed: tuple | None = None      # the only values dsjax honours for now (null always is)
    fix: str = ""                     # what to do instead, when a value is not allowed

    def check(self, name: str, value: Any) -> None:
        check_kind(name, value, self.kind)
        numbers = value if self.kind == "ints" else [value] if self.kind in ("int", "float") \
            else []
        outside = _first_outside(numbers, self.low, self.high)
        if outside is not None:
            raise ApiError(400, f"field {name!r} is {outside}: it must be "
                                f"{_range_text(self.low, self.high)}", param=name)
        if self.allowed is not None and value not in self.allowed:
            raise ApiError(400, f"{name}={_dump(value)} is not supported by dsjax: {self.fix}",
                           param=name)


def _first_outside(numbers: list, low: float | None, high: float | None):
    """The first of `numbers` outside [low, high] (None bounds: open), or None. min() and max()
    first, at C speed: a 16 MiB body holds millions of ids, checked on the event loop."""
    if not numbers or ((low is None or min(numbers) >= low) and
                       (high is None or max(numbers) <= high)):
        return None
    return next(n for n in numbers if (low is not None and n < low) or
                (high is not None and n > high))


def _range_text(low, high) -> str:
    if high is None:
        return f">= {low}"
    return f"<= {high}" if low is None else f"in [{low}, {high}]"


def _unsupported(kind: str, neutral, fix: str) -> Field:
    return Field(kind, allowed=(neutral,), fix=fix)


# Fields of all three endpoints (vLLM's SamplingParams names).
SAMPLING_FIELDS = {
    "temperature": Field("float", "temperature", low=0),
    "top_p": Field("float", "top_p", high=1),
    "top_k": Field("int", "top_k", low=-1),
    "seed": Field("int", "seed"),
    "max_tokens": Field("int", "max_tokens", low=1),
    "min_tokens": Field("int", "min_tokens", low=0),
    "ignore_eos": Field("bool", "ignore_eos"),
    "stop": Field("strs", "stop"),
    "stop_token_ids": Field("ints", "stop_token_ids", low=0),
    "skip_special_tokens": Field("bool", "skip_special_tokens"),
    # Accepted without effect: dsjax's detokenizer always spaces special tokens.
    "spaces_between_special_tokens": Field("bool"),
    "stream": Field("bool"),
    "n": Field("int", "n", low=1, high=MAX_SAMPLES),
    "presence_penalty": Field("float", "presence_penalty", low=-2, high=2),
    "frequency_penalty": Field("float", "frequency_penalty", low=-2, high=2),
    "repetition_penalty": Field("float", "repetition_penalty", low=0, high=2),
    # {"token id": bias}: JSON keys are strings; SamplingParams turns them into ids.
    "logit_bias": Field("object", "logit_bias"),
    "use_beam_search": _unsupported("bool", False, "use sampling or greedy (temperature 0)"),
    "min_p": _unsupported("float", 0, "leave it unset or 0; use top_p or top_k"),
    "include_stop_str_in_output": _unsupported("bool", False, "leave it unset or false"),
}

# vLLM 0.2's extra SamplingParams fields, which DistServe's client and old scripts send.
VLLM_02_FIELDS = {
    "best_of": Field("int", "best_of", low=1, high=MAX_SAMPLES),
    "length_penalty": _unsupported("float", 1, "leave it unset or 1 (no beam search)"),
    "early_stopping": _unsupported("bool", False, "leave it unset or false (no beam search)"),
    "prompt_logprobs": Field("int", "prompt_logprobs", low=0, high=MAX_LOGPROBS),
    "logits_processors": _unsupported("any", [], "leave logits_processors unset"),
}

COMPLETION_LOGPROBS = Field("int", "logprobs", low=0, high=20)

GENERATE_FIELDS = {**SAMPLING_FIELDS, **VLLM_02_FIELDS, "prompt": Field("any"),
                   "logprobs": COMPLETION_LOGPROBS}

def _absent(kind: str, fix: str) -> Field:
    """A field no value of which dsjax honours: null or absent only."""
    return Field(kind, allowed=(), fix=fix)


NO_STRUCTURED_OUTPUT = "dsjax has no structured (guided) output: leave it unset"

# Fields of both OpenAI endpoints: OpenAI's, and vLLM's extensions that change the output.
OPENAI_FIELDS = {
    "model": Field("str"),
    "user": Field("str"),
    "stream_options": Field("object"),
    "add_special_tokens": Field("bool"),
    "cache_salt": Field("str"),
    "echo": Field("bool"),
    "response_format": Field("object", allowed=({"type": "text"},),
                             fix=f'leave it unset or {{"type": "text"}}; {NO_STRUCTURED_OUTPUT}'),
    "truncate_prompt_tokens": _absent("int", "shorten the prompt yourself"),
    "allowed_token_ids": _unsupported("ints", [], "leave allowed_token_ids unset"),
    "bad_words": _unsupported("strs", [], "leave bad_words unset"),
    "priority": _unsupported("int", 0, "leave it unset or 0: requests are served first come, "
                                       "first served"),
    "return_tokens_as_token_ids": _unsupported("bool", False, "leave it unset or false"),
    **{name: _absent("any", NO_STRUCTURED_OUTPUT) for name in (
        "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")},
}

COMPLETION_FIELDS = {**SAMPLING_FIELDS, **VLLM_02_FIELDS, **OPENAI_FIELDS,
                     "prompt": Field("any"), "logprobs": COMPLETION_LOGPROBS,
                     "suffix": _unsupported("str", "", "leave suffix unset")}

NO_TOOLS = "dsjax parses no tool calls: describe the tools in a message"
CHAT_FIELDS = {
    **SAMPLING_FIELDS, **OPENAI_FIELDS,
    "best_of": VLLM_02_FIELDS["best_of"],   # vLLM's chat takes it too
    "messages": Field("list"),
    "logprobs": Field("bool"),
    "top_logprobs": Field("int", low=0, high=20),
    "max_completion_tokens": Field("int", low=1),
    "add_generation_prompt": Field("bool"),
    "continue_final_message": Field("bool"),
    "chat_template_kwargs": Field("object"),
    "documents": Field("list"),
    "tools": _unsupported("list", [], NO_TOOLS),
    "functions": _unsupported("list", [], NO_TOOLS),
    "tool_choice": Field("any", allowed=("none", "auto"), fix=f"leave it unset, 'none' or "
                                                              f"'auto'; {NO_TOOLS}"),
    "function_call": Field("any", allowed=("none", "auto"), fix=NO_TOOLS),
    "parallel_tool_calls": Field("bool"),
    "modalities": Field("strs", allowed=(["text"], "text"), fix="this model writes text only"),
    "audio": _absent("object", "this model writes text only"),
    "prediction": _absent("object", "leave prediction unset"),
    "web_search_options": _absent("object", "dsjax does not search the web"),
    "chat_template": _absent("str", "start the server with --chat-template FILE instead"),
}

STREAM_OPTION_FIELDS = {"include_usage": Field("bool"), "continuous_usage_stats": Field("bool")}


def check_kind(name: str, value: Any, kind: str) -> None:
    check, expected = KINDS[kind]
    if value is not None and not check(value):
        raise ApiError(400, f"field {name!r} must be {expected}, got {_dump(value)}", param=name)
    if kind in ("int", "ints") and value is not None:
        bits = INT_BITS.get(name, DEFAULT_INT_BITS)
        outside = _first_outside(value if kind == "ints" else [value], -(1 << (bits - 1)),
                                 (1 << (bits - 1)) - 1)
        if outside is not None:
            raise ApiError(400, f"field {name!r} holds {outside}, outside the {bits}-bit "
                                f"integer range", param=name)


def read_fields(body: dict, table: dict[str, Field]) -> dict[str, Any]:
    """The body's fields named in `table`, checked; fields absent or null are left out."""
    values = {}
    for name, field in table.items():
        if body.get(name) is not None:
            field.check(name, body[name])
            values[name] = body[name]
    return values


def reject_unknown_fields(body: dict, table: dict[str, Field]) -> None:
    unknown = sorted(set(body) - set(table))
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}: known fields are {sorted(table)}")


def sampling_params(values: dict, table: dict[str, Field], **overrides) -> SamplingParams:
    """SamplingParams from checked field values (read_fields), then `overrides`."""
    kwargs = {f.param: values[name] for name, f in table.items() if f.param and name in values}
    kwargs.update(overrides)
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:   # SamplingParams' messages start with the field
        first = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param=first if first in table else None) from e


def stream_usage(values: dict) -> tuple[bool, bool]:
    """stream_options -> (a usage chunk at the end, usage in every chunk). As OpenAI: usage
    only when include_usage asks for it; as vLLM: continuous_usage_stats adds it per chunk."""
    options = read_fields(values.get("stream_options") or {}, STREAM_OPTION_FIELDS)
    if options and not values.get("stream"):
        raise ApiError(400, "stream_options is only allowed with stream=true",
                       param="stream_options")
    final = bool(options.get("include_usage"))
    return final, final and bool(options.get("continuous_usage_stats"))


# ---- prompts ---------------------------------------------------------------------------------

def _is_token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def read_prompt(value: Any, max_len: int | None = None) -> str | list[int]:
    """One prompt: text, or a list of token ids (at most `max_len`: no more fit the context,
    and the longest lists are refused before any per-id check)."""
    if max_len is not None and isinstance(value, list) and len(value) > max_len:
        raise ApiError(400, f"prompt of {len(value)} token ids cannot fit the context of "
                            f"{max_len} tokens (max_model_len): shorten it", param="prompt")
    if isinstance(value, str) and value or _is_token_ids(value):
        check_kind("prompt", value, "ints" if isinstance(value, list) else "str")
        return value
    if value in ("", []):
        raise ApiError(400, "field 'prompt' is empty: give some text or token ids", param="prompt")
    raise ApiError(400, f"field 'prompt' must be a string or a list of token ids, got "
                        f"{_dump(value)}", param="prompt")


def read_prompts(value: Any, max_len: int | None = None) -> list:
    """OpenAI's prompt: a string, a list of token ids, or a list of either (a batch); lists of
    ids of at most `max_len`."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        return [read_prompt(p, max_len) for p in value]
    return [read_prompt(value, max_len)]


# ---- the body --------------------------------------------------------------------------------

async def read_json_object(request: web.Request, timeout: float) -> dict:
    """The body as a JSON object: 413 over the size limit (sent or decoded), 408 when it does
    not arrive within `timeout` seconds, 400 when it is not a JSON object or does not decode
    whole per its Content-Encoding (content_encoding.py)."""
    limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body of {request.content_length} bytes is over the limit of "
                            f"{limit}: send a smaller body, or start the server with a larger "
                            f"--max-body-bytes")
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s: send it "
                            f"whole, or start the server with a larger --body-timeout",
                       {"Connection": "close"}) from None
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, f"request body too large ({e.text}): send a smaller body, or start "
                            f"the server with a larger --max-body-bytes") from e
    except web.RequestPayloadError as e:
        raise ApiError(400, f"request body could not be read ({str(e).strip()}): check that it "
                            f"matches its Content-Length or chunked framing") from e
    encoding = request.headers.get("Content-Encoding", "")

    def parsed() -> dict:
        return parse_json_object(decode_body(raw, encoding, limit))
    if len(raw) <= OFF_LOOP_BODY_BYTES and not encoding:
        return parsed()
    # Parsing 16 MiB takes the loop 0.2-1.4 s; on a thread it shares the GIL with the loop.
    return await asyncio.get_running_loop().run_in_executor(None, parsed)


OFF_LOOP_BODY_BYTES = 1 << 20   # larger bodies (and compressed ones) are parsed on a thread

# No field needs more than a few levels; the parser's own limit depends on the caller's stack.
MAX_JSON_DEPTH = 32


def _too_deep(what: str) -> ApiError:
    return ApiError(400, f"{what} is JSON nested too deeply: no field needs more than "
                         f"{MAX_JSON_DEPTH} levels")


def _json_depth_exceeds(value: Any, limit: int) -> bool:
    # Level by level, holding only references: as fast as the parse even for a 16 MiB body
    # of tiny lists, and no recursion to run out of.
    level, depth = [value], 1
    while level:
        if depth > limit:
            return True
        children = []
        for node in level:
            children += [c for c in (node.values() if type(node) is dict else node)
                         if type(c) in (list, dict)]
        level, depth = children, depth + 1
    return False


def parse_json_object(raw: bytes, what: str = "request body",
                      example: str = '{"prompt": "Hello", "max_tokens": 16}') -> dict:
    """`raw` as a JSON object; 400 naming `what` it is (and showing `example`) otherwise."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _too_deep(what) from None
    except (UnicodeDecodeError, ValueError) as e:   # ValueError: also ints over 4300 digits
        raise ApiError(400, f"{what} is not valid JSON ({e}): send a JSON object such as "
                            f"{example}") from e
    if not isinstance(body, dict):
        raise ApiError(400, f"{what} must be a JSON object, got {type(body).__name__}")
    if _json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise _too_deep(what)
    return body
