"""Parameters of `LLM.beam_search`, with vLLM's names."""
from __future__ import annotations

from dataclasses import dataclass

from nanovllm.sampling_params import require_bool, require_finite, require_int


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
        self.validate()

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the first bad field; changes nothing.

        The engine calls it again when a request is added, so fields changed after
        construction are checked too.
        """
        require_int("beam_width", self.beam_width, low=1)
        require_int("max_tokens", self.max_tokens, low=1)
        require_finite("length_penalty", self.length_penalty)
        require_bool("ignore_eos", self.ignore_eos)
        if isinstance(self.early_stopping, str):
            if self.early_stopping != "never":
                raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        else:
            require_bool("early_stopping", self.early_stopping)
