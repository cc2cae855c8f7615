"""Reading request bodies: JSON parsing, field type checks, and SamplingParams from the fields.

Both APIs accept every field of vLLM 0.2's SamplingParams (DistServe's client sends some of them),
so one table of field kinds serves /generate and /v1/completions. Every failure is an ApiError
whose message names the field and what it should be.
"""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from dsjax.sampling_params import SamplingParams
from serving.engine_client import ApiError

# kind -> (check, what the message says it should be)
KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "strs": (lambda v: isinstance(v, str) or (isinstance(v, list) and
                                              all(isinstance(s, str) for s in v)),
             "a string or a list of strings"),
    "ints": (lambda v: isinstance(v, list) and all(KINDS["int"][0](t) for t in v),
             "a list of integers"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "any": (lambda v: True, "anything"),
}

# SamplingParams fields: name -> kind. None is accepted for all of them and means the default.
SAMPLING_FIELDS = {
    "n": "int", "best_of": "int", "temperature": "float", "top_p": "float", "top_k": "int",
    "seed": "int", "max_tokens": "int", "min_tokens": "int", "ignore_eos": "bool", "stop": "strs",
    "stop_token_ids": "ints", "logprobs": "int", "presence_penalty": "float",
    "frequency_penalty": "float", "use_beam_search": "bool", "skip_special_tokens": "bool",
}

# vLLM 0.2 fields dsjax does not implement: accepted with their neutral value only.
NEUTRAL_FIELDS = {
    "repetition_penalty": ("float", 1.0), "min_p": ("float", 0.0),
    "length_penalty": ("float", 1.0), "early_stopping": ("bool", False),
    "include_stop_str_in_output": ("bool", False), "prompt_logprobs": ("int", None),
    "logits_processors": ("any", None),
}
# Accepted and without effect on the tokens (dsjax's detokenizer always spaces them).
IGNORED_FIELDS = {"spaces_between_special_tokens": "bool"}


async def read_json_object(request: web.Request) -> dict:
    """The body as a JSON object; 413 over the size limit, 400 when it is not a JSON object."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, f"request body too large ({e.text}): send a smaller body, or "
                            f"start the server with a larger --max-body-bytes") from e
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e}): send a JSON object such as "
                            f'{{"prompt": "Hello", "max_tokens": 16}}') from e
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


# The engine's arrays hold int32 (seeds: 64 bits); larger JSON integers would fail inside it.
INT_BITS = {"seed": 64}
DEFAULT_INT_BITS = 32


def check_kind(name: str, value: Any, kind: str) -> None:
    check, expected = KINDS[kind]
    if value is not None and not check(value):
        raise ApiError(400, f"field {name!r} must be {expected}, got {json.dumps(value)[:80]}")
    if kind in ("int", "ints") and value is not None:
        bound = 1 << (INT_BITS.get(name, DEFAULT_INT_BITS) - 1)
        for number in value if kind == "ints" else [value]:
            if not -bound <= number < bound:
                raise ApiError(400, f"field {name!r} holds {number}, outside the "
                                    f"{INT_BITS.get(name, DEFAULT_INT_BITS)}-bit integer range")


def check_prompt(value: Any, allow_list_of_one: bool = False) -> str | list[int]:
    """A text prompt or a list of token ids (OpenAI also wraps either in a list of one)."""
    if allow_list_of_one and isinstance(value, list) and len(value) == 1 and \
            isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str) or KINDS["ints"][0](value):
        if not value:
            raise ApiError(400, "field 'prompt' is empty: give some text or token ids")
        return value
    if isinstance(value, list) and allow_list_of_one and len(value) > 1 and \
            all(isinstance(v, (str, list)) for v in value):
        raise ApiError(400, f"field 'prompt' holds {len(value)} prompts: send one prompt per "
                            f"request (batched prompts are not supported)")
    raise ApiError(400, f"field 'prompt' must be a string or a list of token ids, got "
                        f"{json.dumps(value)[:80]}")


def sampling_params_from(body: dict, defaults: dict | None = None) -> SamplingParams:
    """SamplingParams from the body's sampling fields (types checked; None = default)."""
    kwargs = dict(defaults or {})
    for name, kind in SAMPLING_FIELDS.items():
        if name in body:
            check_kind(name, body[name], kind)
            if body[name] is not None:
                kwargs[name] = body[name]
    for name, (kind, neutral) in NEUTRAL_FIELDS.items():
        value = body.get(name)
        check_kind(name, value, kind)
        if value is not None and value != neutral:
            raise ApiError(400, f"{name}={json.dumps(value)[:40]} is not supported by dsjax: "
                                f"leave {name} unset or {json.dumps(neutral)}")
    for name, kind in IGNORED_FIELDS.items():
        check_kind(name, body.get(name), kind)
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e)) from e


def reject_unknown_fields(body: dict, known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}: known fields are {sorted(known)}")


SAMPLING_FIELD_NAMES = set(SAMPLING_FIELDS) | set(NEUTRAL_FIELDS) | set(IGNORED_FIELDS)
