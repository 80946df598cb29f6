"""One sampled position of a verify step, seen by the sampler as if it were a sequence of its own."""
from __future__ import annotations

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


class VerifyRow:
    """The sampler's view (`SamplingRow`) of `seq` cut to its first `num_tokens` tokens.

    A verify step samples the token at index `num_tokens` for every proposed position;
    the proposals before it count as generated tokens, exactly as if they had been
    sampled one step at a time: penalties see them, min_tokens counts them, and a
    seeded row's noise is keyed by the same position.
    """

    def __init__(self, seq: Sequence, num_tokens: int):
        self.seq = seq
        self.num_tokens = num_tokens

    @property
    def seq_id(self) -> int:
        return self.seq.seq_id

    @property
    def sampling_params(self) -> SamplingParams:
        return self.seq.sampling_params

    @property
    def sample_seed(self) -> int | None:
        return self.seq.sample_seed

    @property
    def num_prompt_tokens(self) -> int:
        return self.seq.num_prompt_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[: self.num_tokens]

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.seq.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.seq.token_ids[self.seq.num_prompt_tokens : self.num_tokens]
