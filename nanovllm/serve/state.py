"""What every handler of one app shares: the engine, its metrics, the served name, and prompt handling."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from nanovllm.async_llm import AsyncLLM
from nanovllm.serve.errors import APIError, bad_request
from nanovllm.serve.metrics import Metrics
from nanovllm.serve.protocol import ChatMessage, SamplingRequest
from nanovllm.serve.run import Run


@dataclass
class ServerState:
    llm: AsyncLLM
    served_model_name: str
    api_key: str | None = None
    metrics: Metrics | None = None

    def __post_init__(self) -> None:
        self.metrics = self.metrics or Metrics()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.llm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm.config.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.served_model_name!r}", "not_found_error", "model")

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids, as the engine would encode it (its length sets the default max_tokens)."""
        if not isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send token ids", param="prompt")
        return self.tokenizer.encode(prompt)

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation through the model's chat template, ending with the assistant's turn."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template's own checks (roles, order) raise jinja errors
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def start(self, kind: str, prompts: list[list[int]], request: SamplingRequest) -> Run:
        """Add the prompts to the engine; a bad value of the request is a 400.

        max_tokens defaults to what is left of the context (vLLM's rule).
        """
        self.check_model(request.model)
        try:
            params = [request.sampling_params(max(self.max_model_len - len(p), 1)) for p in prompts]
            return await Run.start(self.llm, self.metrics, kind, prompts, params)
        except (ValueError, TypeError) as e:
            raise bad_request(e) from e
