"""One HTTP request's run on the engine: a request per prompt, their deltas merged into one stream."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request

from nanovllm.async_llm import AsyncLLM, RequestStream
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.serve.metrics import Metrics
from nanovllm.serve.protocol import Usage


@dataclass
class Choice:
    """A completion delta, numbered as OpenAI numbers choices: prompt index * n + completion index."""

    index: int
    delta: CompletionOutput


class Run:
    """Engine requests for an HTTP request's prompts; `close()` aborts whichever have not finished."""

    def __init__(self, request_id: str, streams: list[RequestStream], n: int, metrics: Metrics):
        self.request_id = request_id
        self.streams = streams
        self.n = n
        self.metrics = metrics
        self.created = int(time.time())
        self.prompt_tokens = 0
        self.completion_tokens = 0  # so far

    @classmethod
    async def start(cls, llm: AsyncLLM, metrics: Metrics, kind: str, prompts: list[list[int]],
                    params: list[SamplingParams]) -> Run:
        """Add a request per prompt; ValueError/TypeError (a bad request) before any keeps running."""
        run = cls(f"{kind}-{uuid.uuid4().hex}", [], params[0].n, metrics)
        run.prompt_tokens = sum(len(p) for p in prompts)
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                run.streams.append(await llm.add_request(f"{run.request_id}-{i}", prompt, p))
        except BaseException:
            run.close()
            raise
        return run

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)

    async def choices(self) -> AsyncIterator[Choice]:
        """Every completion delta of every prompt as it comes, counting tokens for `usage`."""
        tracked = [self.metrics.track(stream) for stream in self.streams]
        async for i, output in merge(tracked):
            self.completion_tokens += sum(len(c.token_ids) for c in output.outputs)
            for completion in output.outputs:
                yield Choice(i * self.n + completion.index, completion)

    async def collect(self, request: Request) -> list[CompletionOutput]:
        """The whole completions, by choice index; then the run is closed. A client that
        disconnects first aborts the run (CancelledError)."""
        whole: dict[int, CompletionOutput] = {}

        async def gather() -> None:
            async for choice in self.choices():
                if choice.index in whole:
                    whole[choice.index].add(choice.delta)
                else:
                    whole[choice.index] = choice.delta

        try:
            await until_disconnected(request, gather())
        finally:
            self.close()
        return [whole[i] for i in sorted(whole)]


async def until_disconnected(request: Request, work: object) -> None:
    """Await `work`; if the client disconnects first, cancel it and raise CancelledError."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise asyncio.CancelledError("the client disconnected")
    task.result()


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone (the body is read, so `receive` only reports that)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Items of several async iterators as they come, each with its iterator's index."""
    if len(streams) == 1:  # the common case needs no tasks
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
            queue.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
