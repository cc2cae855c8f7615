"""What every route shares: the engine bridge, the names served, the context length, limits.

The HTTP server (api_server.py) and the batch job (batch_runner.py) build it the same way
(`build_context`), so both check and answer a body alike.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

from aiohttp import web

from serving.admission import Admission, AdmissionBounds
from serving.api_errors import ApiError
from serving.chat_template import ChatTemplate, load_chat_template
from serving.engine_client import EngineClient
from serving.metrics import ServerMetrics
from serving.request_fields import read_json_object


def max_model_len(engine) -> int:
    """The longest request (prompt + output tokens) this engine can hold: the model's context,
    the per-request block cap, and the smallest instance's KV pool."""
    cfg = engine.config
    smallest_pool = min(s["blocks_total"] for s in engine.stats())
    return min(engine.model_config.max_position_embeddings,
               cfg.max_num_blocks_per_req * cfg.block_size, smallest_pool * cfg.block_size)


def longest_token_bytes(tokenizer) -> int:
    """The most bytes one token spells: a text over max_model_len times this many characters
    cannot fit the context, so it is refused without tokenizing it (tokenizing 15 MiB takes
    2 s and holds the GIL, and so the event loop, for 0.3 s of it)."""
    if tokenizer is None:
        return 0
    return max(len(tokenizer.token_bytes(i, skip_special_tokens=False))
               for i in range(tokenizer.vocab_size))


def default_model_names(engine) -> list[str]:
    """The --model given, then the model's own size name."""
    names = [str(engine.config.model)]
    own = getattr(engine.model_config, "name", None)
    if own and own not in names and own != "opt":
        names.append(own)
    return names


@dataclasses.dataclass(frozen=True)
class ServingContext:
    client: EngineClient
    model_names: tuple[str, ...]    # the first is the default and the metrics' model_name
    root: str                       # what was loaded (--model)
    max_model_len: int
    longest_token: int              # longest_token_bytes(tokenizer)
    body_timeout: float
    chat_template: ChatTemplate | None
    created: int                    # the model cards' creation time

    @property
    def tokenizer(self):
        return self.client.engine.tokenizer

    async def read_body(self, request: web.Request) -> dict:
        return await read_json_object(request, self.body_timeout)

    def model_name(self, requested: str | None) -> str:
        """The served name a request asked for (default: the first); 404 for another model."""
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names:
            raise ApiError(404, f"model {requested!r} is not served here: use one of "
                                f"{list(self.model_names)} (GET /v1/models)", param="model")
        return requested

    def _check_prompt_chars(self, prompt: str) -> None:
        if self.longest_token and len(prompt) > self.max_model_len * self.longest_token:
            # (a character is at least a byte)
            raise ApiError(400, f"prompt of {len(prompt)} characters cannot fit the context of "
                                f"{self.max_model_len} tokens (max_model_len; no token spells "
                                f"more than {self.longest_token} bytes): shorten it",
                           param="prompt")

    async def prompt_ids(self, prompt: str | list[int], add_special_tokens: bool = True
                         ) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        self._check_prompt_chars(prompt)
        return await self.client.tokenize(prompt, add_special_tokens)

    def prompt_ids_blocking(self, prompt: str | list[int], add_special_tokens: bool = True
                            ) -> list[int]:
        """prompt_ids on the caller's thread: for workers off the event loop (the batch job's
        pipeline)."""
        if isinstance(prompt, list):
            return prompt
        self._check_prompt_chars(prompt)
        return self.client.encode(prompt, add_special_tokens)

    def max_tokens(self, ids: list[int], requested: int | None, default: int | None = None
                   ) -> int:
        """The request's max_tokens; when not given, `default` or (None) all the room the
        context leaves, cut to that room. 400 when the prompt or max_tokens does not fit."""
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ApiError(400, f"prompt of {len(ids)} tokens leaves no room in the context of "
                                f"{self.max_model_len} tokens (max_model_len): shorten it",
                           param="prompt")
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({requested}) "
                                f"exceeds the context of {self.max_model_len} tokens "
                                f"(max_model_len): lower max_tokens to at most {room}, or "
                                f"shorten the prompt", param="max_tokens")
        return requested


def build_context(engine, *, max_queue: int, max_queue_delay: float = math.inf,
                  max_tpot: float = math.inf, served_model_names: Sequence[str] | None = None,
                  chat_template: str | None = None, body_timeout: float = 30.0
                  ) -> ServingContext:
    """The context of `engine`: its admission (bounds: admission.py; infinite ones refuse
    nothing), metrics (watching the engine), names and chat template (`chat_template`:
    --chat-template, else the tokenizer directory's)."""
    names = list(served_model_names or default_model_names(engine))
    metrics = ServerMetrics(names[0])
    admission = Admission(engine, AdmissionBounds(max_queue, max_queue_delay, max_tpot),
                          metrics.observe_rejection)
    client = EngineClient(engine, admission, metrics)
    metrics.watch(engine, lambda: client.num_active)
    tokenizer_dir = engine.config.tokenizer or engine.config.model
    return ServingContext(client=client, model_names=tuple(names),
                          root=str(engine.config.model), max_model_len=max_model_len(engine),
                          longest_token=longest_token_bytes(engine.tokenizer),
                          body_timeout=body_timeout,
                          chat_template=load_chat_template(chat_template, tokenizer_dir),
                          created=int(time.time()))
