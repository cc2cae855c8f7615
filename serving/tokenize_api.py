"""vLLM's POST /tokenize and POST /detokenize: the served tokenizer over HTTP.

/tokenize takes a completion prompt ({"prompt": text}, BOS added unless add_special_tokens is
false) or a chat ({"messages": [...]}, rendered by the chat template, no BOS unless asked), as
vLLM does, and answers {"count", "max_model_len", "tokens", "token_strs"}; token_strs (with
return_token_strs) spell the tokens as Hugging Face's convert_ids_to_tokens does. No context
check: clients ask precisely to learn whether a prompt fits. /detokenize answers {"prompt"},
special tokens spelled out.

Both bound their input (a text of max_tokenize_chars, ids of max_detokenize_ids: what the
context holds, or more) and do large work (the tokenizing, the spelling of each token, the
JSON of the answer) on a worker thread, so the event loop keeps serving: 15 MiB with
token_strs held it for 3.4 s, 2.3M ids for 1.2 s.
"""
from __future__ import annotations

import asyncio
import json

from aiohttp import web

from dsjax.tokenizer import OPT_BOS
from serving.api_errors import ApiError
from serving.chat_api import render_chat
from serving.context import ServingContext
from serving.openai_api import Handler
from serving.request_fields import CHAT_FIELDS, Field, read_fields

TOKEN_STRS = {"return_token_strs": Field("bool")}
TOKENIZE_PROMPT_FIELDS = {"model": Field("str"), "prompt": Field("str"),
                          "add_special_tokens": Field("bool"), **TOKEN_STRS}
TOKENIZE_CHAT_FIELDS = {name: CHAT_FIELDS[name] for name in (
    "model", "messages", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "chat_template_kwargs", "documents", "chat_template", "tools")}
TOKENIZE_CHAT_FIELDS.update(TOKEN_STRS)
DETOKENIZE_FIELDS = {"model": Field("str"), "tokens": Field("ints", low=0)}
MIN_TOKENIZE_CHARS = 1 << 20     # what /tokenize takes at least, whatever the context
MIN_DETOKENIZE_IDS = 1 << 16     # what /detokenize takes at least
OFF_LOOP_IDS = 1 << 14           # more ids than this are spelled or decoded on a thread


def max_tokenize_chars(ctx: ServingContext) -> int:
    """The longest text /tokenize takes: any that could fit the context, and at least 1 MiB."""
    return max(MIN_TOKENIZE_CHARS, ctx.max_model_len * ctx.longest_token)


def max_detokenize_ids(ctx: ServingContext) -> int:
    return max(MIN_DETOKENIZE_IDS, ctx.max_model_len)


async def json_answer_off_loop(work, size: int, threshold: int) -> web.Response:
    """The JSON answer of `work()` (a dict), computed and encoded on a worker thread when
    `size` is over `threshold`."""
    def encoded() -> bytes:
        return json.dumps(work()).encode()
    body = encoded() if size <= threshold else \
        await asyncio.get_running_loop().run_in_executor(None, encoded)
    return web.Response(body=body, content_type="application/json")


def _tokenizer(ctx: ServingContext):
    if ctx.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer: start the server with --tokenizer "
                            "DIR (a Hugging Face tokenizer directory)")
    return ctx.tokenizer


def tokenize_handler(ctx: ServingContext) -> Handler:
    async def tokenize(request: web.Request) -> web.Response:
        body = await ctx.read_body(request)
        chat = body.get("messages") is not None   # null: a prompt request, as vLLM reads it
        values = read_fields(body, TOKENIZE_CHAT_FIELDS if chat else TOKENIZE_PROMPT_FIELDS)
        model = ctx.model_name(values.get("model"))
        tokenizer = _tokenizer(ctx)
        if chat:
            text, bos = render_chat(ctx, values, model), values.get("add_special_tokens", False)
        elif "prompt" in values:
            text, bos = values["prompt"], values.get("add_special_tokens", True)
        else:
            raise ApiError(400, "send field 'prompt' (text) or 'messages' (a chat)",
                           param="prompt")
        limit = max_tokenize_chars(ctx)
        if len(text) > limit:
            raise ApiError(400, f"text of {len(text)} characters is over /tokenize's limit of "
                                f"{limit}: send it in pieces", param="prompt")
        ids = await ctx.client.tokenize(text, bos)

        def answer() -> dict:
            strs = None
            if values.get("return_token_strs"):
                strs = [tokenizer.token_string(i) for i in ids]
                if bos:   # the GPT-2 fallback's BOS id is also GPT-2's '#': spell it as OPT
                    strs[0] = OPT_BOS
            return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
                    "token_strs": strs}
        return await json_answer_off_loop(answer, len(ids), OFF_LOOP_IDS)
    return tokenize


def detokenize_handler(ctx: ServingContext) -> Handler:
    async def detokenize(request: web.Request) -> web.Response:
        body, limit = await ctx.read_body(request), max_detokenize_ids(ctx)
        if isinstance(body.get("tokens"), list) and len(body["tokens"]) > limit:
            # before the per-id checks, which would take the loop as long as decoding them
            raise ApiError(400, f"{len(body['tokens'])} token ids are over /detokenize's limit "
                                f"of {limit}: send them in pieces", param="tokens")
        values = read_fields(body, DETOKENIZE_FIELDS)
        ctx.model_name(values.get("model"))
        tokenizer = _tokenizer(ctx)
        if "tokens" not in values:
            raise ApiError(400, "field 'tokens' is required: a list of token ids",
                           param="tokens")
        ids = values["tokens"]
        vocab = ctx.client.engine.model_config.vocab_size
        outside = [t for t in ids if t >= vocab]
        if outside:
            raise ApiError(400, f"token id {outside[0]} is outside the model's vocabulary of "
                                f"{vocab}: send ids in [0, {vocab})", param="tokens")
        # Special tokens spelled out, as vLLM (Hugging Face's decode default).
        return await json_answer_off_loop(
            lambda: {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}, len(ids),
            OFF_LOOP_IDS)
    return detokenize
