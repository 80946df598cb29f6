"""A request's token stream and its place in the paged KV cache."""
from __future__ import annotations

from enum import Enum, auto

from nanovllm.sampling_params import SamplingParams

# A sampled token whose value is still on the GPU: the next decode step reads it from there.
PLACEHOLDER = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One stream of tokens: the prompt followed by what has been generated.

    Two counts say where the sequence stands, both prefixes of `token_ids`:

    - `num_computed_tokens`: tokens launched to the device; their K/V are in the cache
      once the launched steps finish. The tokens after it are what the next forward
      computes; a sequence whose only uncomputed token is its last one is decoding.
    - `num_committed_tokens`: tokens whose K/V are in the cache and whose values are
      read back and final. Only blocks full of committed tokens are hashed for prefix
      sharing (speculative decoding rolls `num_computed_tokens` back, never this).

    Transitions (admit, fork, step, preempt, finish) belong to the `Scheduler`.
    """

    def __init__(self, seq_id: int, token_ids: list[int], sampling_params: SamplingParams, request_id: str = ""):
        self.seq_id = seq_id
        self.request_id = request_id
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_committed_tokens = 0
        self.block_table: list[int] = []
        self.sampling_params = sampling_params
        self.sample_seed: int | None = sampling_params.seed
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.pending_forks = 0  # n > 1: children to fork once the prompt is computed
        # speculative rollbacks that cut this sequence's tokens: a step launched before one is void for it
        self.num_rollbacks = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def at_length_limit(self, max_model_len: int) -> bool:
        """Whether the sequence holds all the tokens it may have (max_tokens or the context)."""
        return self.num_completion_tokens >= self.sampling_params.max_tokens or self.num_tokens >= max_model_len
