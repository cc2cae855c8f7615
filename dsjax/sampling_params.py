"""Per-request sampling parameters, vLLM-style, validated on construction."""
from __future__ import annotations

import dataclasses

import math

MAX_LOGPROBS = 20
INT32_LIMIT = 2 ** 31  # token ids and top_k travel to the device as int32
MAX_SAMPLES = 64        # n and best_of: sequences decoded from one prompt
MAX_LOGIT_BIAS = 300    # entries, as OpenAI caps it
LOGIT_BIAS_RANGE = 100.0


def _unsupported(feature: str, fix: str) -> ValueError:
    return ValueError(f"{feature} is not supported by dsjax: {fix}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request and when to stop.

    temperature 0 means greedy; top_k -1 or 0 and top_p 1 switch those filters off.
    logprobs=N returns, per generated token, the chosen token's log-probability and the
    N most likely tokens' ones, taken from the model's raw distribution (before
    penalties, temperature, top-k and top-p). prompt_logprobs=N does the same for every
    prompt token after the first (OpenAI's `echo` with logprobs).

    n sequences are returned, chosen among best_of (>= n) sampled from one prefill: they share
    the prompt's KV pages. With best_of > n the n of highest cumulative log-probability win.
    Penalties follow vLLM: presence/frequency subtract from the logits of tokens generated so
    far (once / per occurrence), repetition divides positive and multiplies negative logits of
    tokens in the prompt or the output; logit_bias adds to the given tokens' logits first.
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
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | tuple[tuple[int, float], ...] | None = None
    prompt_logprobs: int | None = None
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
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else \
            (self.logit_bias or ())
        try:
            bias = tuple(sorted((int(t), float(v)) for t, v in bias))
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map token ids to numbers, got "
                             f"{self.logit_bias!r:.80}") from None
        object.__setattr__(self, "logit_bias", bias)
        self._validate()

    def _validate(self) -> None:
        if not 1 <= self.n <= MAX_SAMPLES:
            raise ValueError(f"n must be in [1, {MAX_SAMPLES}], got {self.n}")
        if self.best_of is not None and not self.n <= self.best_of <= MAX_SAMPLES:
            raise ValueError(f"best_of must be in [n={self.n}, {MAX_SAMPLES}], got {self.best_of}")
        if self.use_beam_search:
            raise _unsupported("use_beam_search=True", "use sampling or greedy (temperature=0)")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2] (1 = off), got "
                             f"{self.repetition_penalty}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias holds {len(self.logit_bias)} entries; at most "
                             f"{MAX_LOGIT_BIAS}")
        for token, bias in self.logit_bias:
            if not 0 <= token < INT32_LIMIT:
                raise ValueError(f"logit_bias token id {token} is not a valid token id")
            if not (math.isfinite(bias) and -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE):
                raise ValueError(f"logit_bias for token {token} must be in [-100, 100], got "
                                 f"{bias}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be None or in [0, {MAX_LOGPROBS}], got "
                             f"{self.prompt_logprobs}")
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
        if len(self.stop_token_ids) > MAX_LOGIT_BIAS:
            raise ValueError(f"stop_token_ids holds {len(self.stop_token_ids)} ids; at most "
                             f"{MAX_LOGIT_BIAS}")
        if any(not 0 <= t < INT32_LIMIT for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must hold non-negative ints, got {self.stop_token_ids!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_samples(self) -> int:
        """Sequences decoded from the prompt (best_of, or n)."""
        return self.best_of or self.n

    @property
    def has_penalties(self) -> bool:
        """Whether the sampler needs this request's token history or bias."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or
                    self.repetition_penalty != 1.0)
