"""What the scheduler asks of a proposer, and how the engine makes one from its config."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from nanovllm.config import Config
    from nanovllm.engine.sequence import Sequence


class Proposer(Protocol):
    # Whether `propose` takes sequences whose last token is still on the device (PLACEHOLDER), after
    # proposals not verified yet: it then guesses that all are accepted and what that token is, and
    # proposes what follows it. Speculative steps then overlap like plain ones (the engine's `step`).
    guesses_ahead: bool

    def propose(self, seqs: list[Sequence], max_lens: list[int]) -> list[list[int]]:
        """Up to `max_lens[i]` tokens guessed to follow `seqs[i]`'s tokens (all known, unless
        `guesses_ahead`)."""

    def release(self, seq: Sequence) -> None:
        """Forget what the proposer keeps for seq (it finished or was preempted)."""


def make_proposer(config: Config) -> Proposer | None:
    """The proposer `config.speculative_config` asks for; None without speculation."""
    spec = config.speculative_config
    if spec is None:
        return None
    if spec.method == "ngram":
        from nanovllm.spec_decode.ngram_proposer import NgramProposer

        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    from nanovllm.spec_decode.draft_model_proposer import DraftModelProposer

    return DraftModelProposer(spec, config)
