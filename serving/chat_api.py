"""OpenAI-compatible POST /v1/chat/completions: messages -> the chat template -> one request.

The prompt is the model's chat template rendered over the messages (chat_template.py) and
tokenized without adding BOS, as vLLM does (`add_special_tokens` turns it on): templates write
their own special tokens. Without max_tokens the answer may fill the context. Streams send the
assistant role first, then one delta per token, as OpenAI's do.
"""
from __future__ import annotations

import time

from dsjax.engine.request import RequestOutput
from serving.api_errors import ApiError
from serving.chat_template import ChatTemplateError
from serving.context import ServingContext
from serving.openai_api import (CheckedBody, EngineJob, Handler, TokenLogprobs,
                                check_streamable, new_tokens, openai_handler, usage,
                                usage_so_far)
from serving.request_fields import CHAT_FIELDS, read_fields, sampling_params, stream_usage

ROLES = ("system", "developer", "user", "assistant", "tool")


def _text_of(content, index: int) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content holds a {kind or 'malformed'} "
                                    f"part: this model reads text only, send "
                                    f'{{"type": "text", "text": "..."}} parts', param="messages")
            texts.append(part["text"])
        return "\n".join(texts)   # vLLM's "string" content format
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts",
                   param="messages")


def read_messages(value: list) -> list[dict]:
    """Messages with text content, checked; other keys (name, tool_call_id...) kept for the
    template."""
    if not value:
        raise ApiError(400, "field 'messages' is empty: send at least one message",
                       param="messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a role among {ROLES}",
                           param="messages")
        message = {k: v for k, v in message.items() if v is not None}
        if "content" in message:
            message["content"] = _text_of(message["content"], i)
        messages.append(message)
    return messages


class ChatChoices:
    """The JSON objects of one chat completion: chunks with deltas, choices, logprobs."""

    def __init__(self, request_id: str, model: str, logprobs: TokenLogprobs,
                 num_top: int | None, continuous_usage: bool = False):
        self.base = {"id": request_id, "created": int(time.time()), "model": model}
        self.logprobs = logprobs
        self.num_top = num_top          # None: no logprobs asked for
        self.continuous_usage = continuous_usage
        self.started: set[int] = set()  # choices whose role chunk went out

    def _entry(self, token_id: int, logprob: float | None) -> dict:
        return {"token": self.logprobs.text(token_id), "logprob": logprob,
                "bytes": self.logprobs.bytes(token_id)}

    def _logprobs(self, output, tokens) -> dict | None:
        if self.num_top is None or output.history.logprobs is None:
            return None
        content = []
        for position, token_id, _ in tokens:
            table = output.token_at(position)[2]   # without copying every table so far
            entry = self._entry(token_id, self.logprobs.chosen(table, token_id))
            entry["top_logprobs"] = [self._entry(t, lp)
                                     for t, lp in self.logprobs.top(table, self.num_top)]
            content.append(entry)
        return {"content": content}

    def _chunk(self, index: int, output: RequestOutput, tokens_so_far: int, delta: dict,
               logprobs=None, reason=None) -> dict:
        chunk = {**self.base, "object": "chat.completion.chunk", "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
        if self.continuous_usage:
            chunk["usage"] = usage_so_far(output, tokens_so_far)
        return chunk

    def chunks(self, _prompt: int, output: RequestOutput) -> list[dict]:
        """Per sequence (choice): the assistant role first, then one delta per new token."""
        chunks = []
        for seq in output.outputs:
            index = seq.index
            if index not in self.started:
                self.started.add(index)
                chunks.append(self._chunk(index, output, 0, {"role": "assistant",
                                                             "content": ""}))
            tokens = new_tokens(seq)
            for i, token in enumerate(tokens):
                last = seq.finished and i == len(tokens) - 1
                chunks.append(self._chunk(index, output, token[0] + 1, {"content": token[2]},
                                          self._logprobs(seq, [token]),
                                          seq.finish_reason if last else None))
        return chunks

    def usage_chunk(self, finals: list[RequestOutput]) -> dict:
        return {**self.base, "object": "chat.completion.chunk", "choices": [],
                "usage": usage(finals)}

    def answer(self, finals: list[RequestOutput]) -> dict:
        final = finals[0]   # a chat is one engine request
        choices = [{"index": seq.index,
                    "message": {"role": "assistant", "content": seq.text or ""},
                    "logprobs": self._logprobs(seq, [(p, t, "") for p, t in
                                                     enumerate(seq.token_ids)]),
                    "finish_reason": seq.finish_reason} for seq in final.outputs]
        return {**self.base, "object": "chat.completion", "choices": choices,
                "usage": usage([final])}


def render_chat(ctx: ServingContext, values: dict, model: str) -> str:
    """The prompt text of a chat request's fields: its messages through the chat template."""
    if ctx.chat_template is None:
        raise ApiError(400, f"model {model!r} has no chat template (no 'chat_template' in "
                            f"its tokenizer_config.json): start the server with "
                            f"--chat-template FILE, or send a plain prompt (/v1/completions)")
    if "messages" not in values:
        raise ApiError(400, "field 'messages' is required: a list of {role, content}",
                       param="messages")
    messages = read_messages(values["messages"])
    continue_final = values.get("continue_final_message", False)
    if continue_final and values.get("add_generation_prompt"):
        raise ApiError(400, "continue_final_message and add_generation_prompt exclude each "
                            "other: set one", param="continue_final_message")
    try:
        return ctx.chat_template.render(
            messages, add_generation_prompt=values.get("add_generation_prompt",
                                                       not continue_final),
            continue_final_message=continue_final, documents=values.get("documents"),
            variables=values.get("chat_template_kwargs"))
    except ChatTemplateError as e:
        raise ApiError(400, str(e), param="messages") from e


def check_chat(ctx: ServingContext, body: dict) -> CheckedBody:
    """A /v1/chat/completions body, checked: its messages rendered into one prompt."""
    values = read_fields(body, CHAT_FIELDS)
    model = ctx.model_name(values.get("model"))
    text = render_chat(ctx, values, model)
    final_usage, continuous_usage = stream_usage(values)

    def to_job(ids: list[list[int]]) -> EngineJob:
        max_tokens = ctx.max_tokens(ids[0], values.get("max_completion_tokens",
                                                       values.get("max_tokens")))
        if "top_logprobs" in values and not values.get("logprobs"):
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        num_top = values.get("top_logprobs", 0) if values.get("logprobs") else None
        params = sampling_params(values, CHAT_FIELDS, max_tokens=max_tokens, logprobs=num_top)
        check_streamable(params, bool(values.get("stream")))
        return EngineJob(ids, [params], "chatcmpl", bool(values.get("stream")), final_usage,
                         lambda group_id: ChatChoices(group_id, model, TokenLogprobs(ctx.tokenizer),
                                                      num_top, continuous_usage),
                         values.get("cache_salt"))
    return CheckedBody([text], values.get("add_special_tokens", False), to_job)


def chat_handler(ctx: ServingContext) -> Handler:
    return openai_handler(ctx, check_chat)
