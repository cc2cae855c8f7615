"""Workloads that declare their prefix reuse, for the simulator and the placement search: each
request says how many of its prompt tokens a prefix cache already holds (`cached_len`, whole
blocks), so the latency model charges only the rest.

- multi_turn: a chat conversation resends its whole history every turn; turn k's cached
  prefix is turn k-1's prompt and answer (as an engine that served turn k-1 caches them).
- shared_system_prompt: one system prompt heads every request.
The simulator assumes the cache holds what is declared where the request is served (a cache
large enough, prefix-aware routing): an upper bound on what caching saves.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class ReusedRequest:
    prompt: str
    prompt_len: int
    output_len: int
    cached_len: int


def whole_blocks(tokens: int, block_size: int) -> int:
    return tokens // block_size * block_size


def multi_turn(conversations: Sequence[dict], tokenizer, block_size: int = 16,
               max_total: int = 2048, max_conversations: int | None = None,
               seed: int = 0) -> list[ReusedRequest]:
    """ShareGPT conversations as their real turns: request k's prompt is every message before
    answer k, its output answer k's length, its cached prefix request k-1's prompt and answer
    (minus the answer's last token, whose KV is never written). Conversations of >= 2 turns, in
    a seeded order; a turn that would exceed max_total ends its conversation."""
    convs = [c for c in conversations if len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(convs)
    out = []
    for conv in convs[:max_conversations]:
        turns = [t["value"] for t in conv["conversations"]]
        history, cached = [], 0
        for k in range(0, len(turns) - 1, 2):
            history.append(turns[k])
            prompt = "\n".join(history)
            prompt_len = len(tokenizer.encode(prompt))
            output_len = len(tokenizer.encode(turns[k + 1]))
            if prompt_len + output_len >= max_total or output_len < 1:
                break
            out.append(ReusedRequest(prompt, prompt_len, output_len,
                                     whole_blocks(min(cached, prompt_len - 1), block_size)))
            history.append(turns[k + 1])
            cached = prompt_len + output_len - 1
    return out


def shared_system_prompt(reqs: Sequence, system_len: int,
                         block_size: int = 16) -> list[ReusedRequest]:
    """Every request headed by one system prompt of system_len tokens."""
    return [ReusedRequest(r.prompt, r.prompt_len + system_len, r.output_len,
                          whole_blocks(system_len, block_size)) for r in reqs]


def without_reuse(reqs: Sequence[ReusedRequest]) -> list[ReusedRequest]:
    """The same requests with caching off."""
    return [dataclasses.replace(r, cached_len=0) for r in reqs]
