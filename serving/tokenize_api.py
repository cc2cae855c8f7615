"""vLLM's POST /tokenize and POST /detokenize: the served tokenizer over HTTP.

/tokenize takes a completion prompt ({"prompt": text}, BOS added unless add_special_tokens is
false) or a chat ({"messages": [...]}, rendered by the chat template, no BOS unless asked), as
vLLM does, and answers {"count", "max_model_len", "tokens", "token_strs"}; token_strs (with
return_token_strs) spell the tokens as Hugging Face's convert_ids_to_tokens does. No context
check: clients ask precisely to learn whether a prompt fits. /detokenize answers {"prompt"},
special tokens spelled out.
"""
from __future__ import annotations

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
        ids = await ctx.client.tokenize(text, bos)
        strs = None
        if values.get("return_token_strs"):
            strs = [tokenizer.token_string(i) for i in ids]
            if bos:   # the GPT-2 fallback's BOS id is also GPT-2's '#': spell it as OPT does
                strs[0] = OPT_BOS
        return web.json_response({"count": len(ids), "max_model_len": ctx.max_model_len,
                                  "tokens": ids, "token_strs": strs})
    return tokenize


def detokenize_handler(ctx: ServingContext) -> Handler:
    async def detokenize(request: web.Request) -> web.Response:
        values = read_fields(await ctx.read_body(request), DETOKENIZE_FIELDS)
        ctx.model_name(values.get("model"))
        tokenizer = _tokenizer(ctx)
        if "tokens" not in values:
            raise ApiError(400, "field 'tokens' is required: a list of token ids",
                           param="tokens")
        vocab = ctx.client.engine.model_config.vocab_size
        outside = [t for t in values["tokens"] if t >= vocab]
        if outside:
            raise ApiError(400, f"token id {outside[0]} is outside the model's vocabulary of "
                                f"{vocab}: send ids in [0, {vocab})", param="tokens")
        # Special tokens spelled out, as vLLM (Hugging Face's decode default).
        text = tokenizer.decode(values["tokens"], skip_special_tokens=False)
        return web.json_response({"prompt": text})
    return detokenize
