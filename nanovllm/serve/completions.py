"""POST /v1/completions: prompts in, OpenAI's text_completion objects out (whole or streamed)."""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from nanovllm.serve.logprobs import completion_logprobs
from nanovllm.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from nanovllm.serve.run import Run
from nanovllm.serve.sse import sse_response
from nanovllm.serve.state import ServerState


async def create_completion(state: ServerState, body: CompletionRequest,
                            request: Request) -> CompletionResponse | StreamingResponse:
    prompts = [state.tokenize(p) for p in body.prompts()]
    run = await state.start("cmpl", prompts, body)
    if body.stream:
        return sse_response(run, completion_chunks(state, body, run))
    completions = await run.collect(request)
    choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                logprobs=None if c.logprobs is None else
                                completion_logprobs(state.tokenizer, c.logprobs, 0))
               for i, c in enumerate(completions)]
    return CompletionResponse(id=run.request_id, created=run.created, model=state.served_model_name,
                              choices=choices, usage=run.usage())


async def completion_chunks(state: ServerState, body: CompletionRequest, run: Run) -> AsyncIterator[CompletionResponse]:
    """A chunk per completion delta (finish_reason on each choice's last), then usage if asked."""
    sent_chars: dict[int, int] = {}  # per choice, for logprobs' text_offset
    async for choice in run.choices():
        delta = choice.delta
        offset = sent_chars.get(choice.index, 0)
        sent_chars[choice.index] = offset + len(delta.text)
        logprobs = None if delta.logprobs is None else completion_logprobs(state.tokenizer, delta.logprobs, offset)
        yield CompletionResponse(id=run.request_id, created=run.created, model=state.served_model_name,
                                 choices=[CompletionChoice(index=choice.index, text=delta.text, logprobs=logprobs,
                                                           finish_reason=delta.finish_reason)])
    if body.include_usage:
        yield CompletionResponse(id=run.request_id, created=run.created, model=state.served_model_name,
                                 choices=[], usage=run.usage())
