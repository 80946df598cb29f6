"""The engine's per-token logprob dicts in OpenAI's two shapes (legacy completions, chat)."""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from nanovllm.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

# Each entry is {sampled token: logprob, then the top-N alternatives} (the engine's order).
Entries = list[dict[int, float]]


def token_text(tokenizer: PreTrainedTokenizerBase | None, token_id: int) -> str:
    """A token's text; without a tokenizer vLLM's `token_id:N`."""
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def completion_logprobs(tokenizer: PreTrainedTokenizerBase | None, entries: Entries,
                        text_offset: int) -> CompletionLogprobs:
    """The legacy shape; `text_offset` is where these tokens' text starts in the choice's text."""
    out = CompletionLogprobs()
    for entry in entries:
        (token, logprob), *_ = entry.items()
        text = token_text(tokenizer, token)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append({token_text(tokenizer, t): lp for t, lp in entry.items()})
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def chat_logprobs(tokenizer: PreTrainedTokenizerBase | None, entries: Entries, top: int) -> ChatLogprobs:
    """The chat shape: each sampled token with the `top` most likely tokens at its position."""
    def item(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return dict(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for entry in entries:
        (token, logprob), *_ = entry.items()
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:top]
        content.append(TokenLogprob(**item(token, logprob), top_logprobs=[TopLogprob(**item(*kv)) for kv in best]))
    return ChatLogprobs(content=content)
