"""Per-request sampling parameters, with vLLM's names and meanings."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick each next token of a request, and when to stop.

    temperature 0 means greedy. top_k -1 or 0 turns top-k off. A request with a
    seed draws the same tokens whatever else shares its batch. `stop` may be given
    as a bare str and `stop`/`stop_token_ids` as None: construction turns those
    into lists.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self.validate()

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the first bad field; changes nothing.

        The engine calls it again when a request is added, so fields changed after
        construction are checked too (a bare str assigned to `stop` then is an error).
        """
        require_int("n", self.n, low=1)
        require_int("max_tokens", self.max_tokens, low=1)
        require_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        require_finite("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        require_int("top_k", self.top_k, low=-1)
        require_finite("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        require_finite("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            require_finite(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        require_finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            require_int("seed", self.seed, low=0)
        if self.logprobs is not None:
            require_int("logprobs", self.logprobs, low=0)
        require_bool("ignore_eos", self.ignore_eos)
        require_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        self._validate_stops()

    def _validate_stops(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must be a str or a list of str, got {self.stop!r}")
        if not all(self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list):
            raise TypeError(f"stop_token_ids must be a list of int, got {type(self.stop_token_ids).__name__}")
        for token in self.stop_token_ids:
            require_int("stop_token_ids", token, low=0)


def require_int(name: str, value: object, low: int) -> None:
    """TypeError unless value is an int (not a bool); ValueError if below `low`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def require_finite(name: str, value: object) -> None:
    """TypeError unless value is a real number (not a bool); ValueError for NaN and ±inf."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def require_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
