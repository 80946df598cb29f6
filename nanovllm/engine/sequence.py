"""A request's token stream and its place in the paged KV cache."""
from __future__ import annotations

import itertools
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

    `num_cached_tokens` counts the leading tokens whose K/V are already in the
    cache. The tokens after it are what the next forward must compute; a
    sequence whose only uncomputed token is its last one is decoding.
    """

    _ids = itertools.count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams | None = None, request_id: str = ""):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.sampling_params = sampling_params or SamplingParams()
        self.sample_seed: int | None = self.sampling_params.seed
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.pending_forks = 0  # n > 1: children to fork once the prompt is computed

    def __len__(self) -> int:
        return len(self.token_ids)

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
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
