"""Parameters of `LLM.beam_search`, with vLLM's names."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BeamSearchParams:
    """Deterministic beam search, ranked like HF transformers' `generate(num_beams=beam_width)`.

    A finished beam scores cum_logprob / (generated tokens, EOS included) ** length_penalty.
    `early_stopping` has HF's meaning: False (HF's default) stops once the best running
    beam, at its current length, cannot beat the worst of beam_width finished ones; True
    stops as soon as beam_width beams have finished; "never" stops only when no running
    beam can improve even at max_tokens (with length_penalty > 0) or at max_tokens itself.
    """

    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            raise TypeError(f"length_penalty must be a number, got {type(self.length_penalty).__name__}")
        if self.length_penalty != self.length_penalty or abs(self.length_penalty) == float("inf"):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
