"""Per-request sampling parameters, vLLM-style, validated on construction."""
from __future__ import annotations

import dataclasses

MAX_LOGPROBS = 20
INT32_LIMIT = 2 ** 31  # token ids and top_k travel to the device as int32


def _unsupported(feature: str, fix: str) -> ValueError:
    return ValueError(f"{feature} is not supported by dsjax: {fix}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request and when to stop.

    temperature 0 means greedy; top_k -1 or 0 and top_p 1 switch those filters off.
    logprobs=N returns, per generated token, the chosen token's log-probability and the
    N most likely tokens' ones, taken from the model's raw distribution (before
    temperature, top-k and top-p).
    """
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | list[str] | tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = ()
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    use_beam_search: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Normalise to hashable tuples so the frozen dataclass stays hashable.
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        self._validate()

    def _validate(self) -> None:
        if self.n != 1:
            raise _unsupported(f"n={self.n}", "send n separate requests with n=1")
        if self.best_of is not None and self.best_of > 1:
            raise _unsupported(f"best_of={self.best_of}", "leave best_of unset or 1")
        if self.use_beam_search:
            raise _unsupported("use_beam_search=True", "use sampling or greedy (temperature=0)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise _unsupported(f"{name}={getattr(self, name)}", f"set {name}=0")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not -1 <= self.top_k < INT32_LIMIT:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive int below 2**31, "
                             f"got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if any(not 0 <= t < INT32_LIMIT for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must hold non-negative ints, got {self.stop_token_ids!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
