"""What `generate` returns, shaped like vLLM's outputs."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a request. From `engine.step()` it is a delta: the tokens, text and
    logprobs produced since the completion's previous output; from `generate`, the whole."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None

    def add(self, delta: CompletionOutput) -> None:
        """Append a later delta of the same completion."""
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += delta.logprobs
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        self.cumulative_logprob = delta.cumulative_logprob


@dataclass
class RequestOutput:
    """One request's prompt and its completions; `out["text"]` reads outputs[0] as nano-vllm did."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False

    def add(self, delta: RequestOutput) -> None:
        """Merge a later delta of the same request (`engine.step()` hands out deltas)."""
        by_index = {c.index: c for c in self.outputs}
        for completion in delta.outputs:
            if completion.index in by_index:
                by_index[completion.index].add(completion)
            else:
                self.outputs.append(completion)
        self.finished = delta.finished

    def __getitem__(self, key: str) -> object:
        if key == "text":
            return self.outputs[0].text
        if key == "token_ids":
            return self.outputs[0].token_ids
        raise KeyError(f"{key!r}: a RequestOutput reads only 'text' and 'token_ids' by key")


@dataclass
class BeamSearchSequence:
    """One finished beam. `tokens` holds the prompt and the generated tokens, as in vLLM.

    `cum_logprob` is the sum of the generated tokens' log-probabilities (log_softmax of
    the raw logits); `score` is it divided by (number of generated tokens) ** length_penalty,
    HF's ranking score. `text` is the decoded generated part ('' without a tokenizer).
    """

    tokens: list[int]
    num_prompt_tokens: int
    cum_logprob: float
    score: float
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS) or "length"

    @property
    def completion_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    """One prompt's beams, best first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)
