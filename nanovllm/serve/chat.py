"""POST /v1/chat/completions: messages through the chat template, chat.completion objects out."""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from nanovllm.outputs import CompletionOutput
from nanovllm.serve.logprobs import chat_logprobs
from nanovllm.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
)
from nanovllm.serve.run import Run
from nanovllm.serve.sse import sse_response
from nanovllm.serve.state import ServerState


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest,
                                 request: Request) -> ChatCompletionResponse | StreamingResponse:
    run = await state.start("chatcmpl", [state.chat_prompt(body.messages)], body)
    if body.stream:
        return sse_response(run, chat_chunks(state, body, run))
    completions = await run.collect(request)
    choices = [ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                          logprobs=logprobs(state, body, c)) for i, c in enumerate(completions)]
    return ChatCompletionResponse(id=run.request_id, created=run.created, model=state.served_model_name,
                                  choices=choices, usage=run.usage())


def logprobs(state: ServerState, body: ChatCompletionRequest, completion: CompletionOutput) -> ChatLogprobs | None:
    if completion.logprobs is None:
        return None
    return chat_logprobs(state.tokenizer, completion.logprobs, body.top_logprobs or 0)


async def chat_chunks(state: ServerState, body: ChatCompletionRequest, run: Run) -> AsyncIterator[ChatCompletionChunk]:
    """A chunk per delta; a choice's first carries the assistant role, its last the finish_reason."""
    started: set[int] = set()
    async for choice in run.choices():
        role = None if choice.index in started else "assistant"
        started.add(choice.index)
        delta = choice.delta
        yield ChatCompletionChunk(
            id=run.request_id, created=run.created, model=state.served_model_name,
            choices=[ChatChunkChoice(index=choice.index, delta=DeltaMessage(role=role, content=delta.text),
                                     logprobs=logprobs(state, body, delta), finish_reason=delta.finish_reason)])
    if body.include_usage:
        yield ChatCompletionChunk(id=run.request_id, created=run.created, model=state.served_model_name,
                                  choices=[], usage=run.usage())
