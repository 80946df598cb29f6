"""An asyncio face over the engine core: many concurrent requests, one engine loop.

The engine core is single-threaded, so one loop owns it (`engine/core_loop.py`): it takes
commands (add, abort, stats, stop), steps while any request is live, and hands each step's
deltas to the requests' asyncio queues on the event loop. The loop runs on a background thread
of this process (`AsyncLLM(engine)`), or in a child process of its own
(`from_engine_args(..., engine_process=True)`, what the server uses), where the engine does not
share the GIL with whatever serves the streams. Requests added from any number of coroutines share
the engine's continuous batching.

    llm = AsyncLLM.from_engine_args("path/to/model", device="cpu", engine_process=True)
    async for delta in llm.generate("Hello", SamplingParams(max_tokens=32)):
        print(delta.outputs[0].text, end="")
    await llm.shutdown()
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable

from transformers import PreTrainedTokenizerBase

from nanovllm.config import Config
from nanovllm.engine.core_loop import AbortRequest, AddRequest, Command, Delta, GetStats
from nanovllm.engine.core_process import EngineProcess
from nanovllm.engine.core_thread import EngineThread
from nanovllm.engine.llm_engine import LLMEngine, Prompt, tokenize_prompt
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped (an error in a step, the engine process gone, or shutdown); no request can run."""


class QueueFullError(RuntimeError):
    """More requests wait than `max_pending` allows; the caller should retry later."""


class AsyncLLM:
    """Streams each request's deltas from one engine core, stepped by a background thread or
    in a child process.

    `engine`: an `LLMEngine` (an `LLM` too) to step on a thread of this process, or an
    `EngineProcess`; `from_engine_args` builds either. In process mode there is no local engine
    (`self.engine` is None): `config` and `tokenizer` are the child's, sent at startup.
    `max_pending` bounds the requests that wait beyond those the engine runs at once
    (`max_num_seqs`): a request over the bound raises `QueueFullError` instead of queueing.
    """

    def __init__(self, engine: LLMEngine | EngineProcess, max_pending: int | None = None):
        check_max_pending(max_pending)
        self.engine: LLMEngine | None = engine if isinstance(engine, LLMEngine) else None
        self._core = EngineThread(engine) if isinstance(engine, LLMEngine) else engine
        self.max_pending = max_pending
        self.error: BaseException | None = None  # what killed the loop, if anything did
        self._streams: dict[str, RequestStream] = {}  # by request id
        self._replies: dict[int, concurrent.futures.Future] = {}  # by command id, until answered
        self._command_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead = False  # set, with the pending replies failed, under _lock once the loop has ended
        self._lock = threading.Lock()

    @classmethod
    def from_engine_args(cls, model: str | os.PathLike | None = None, max_pending: int | None = None,
                         engine_process: bool = False, **engine_args: object) -> AsyncLLM:
        """Build the engine here, or with `engine_process` in a spawned child process; an error that
        stops the child's startup is raised here, with the child's traceback as its cause."""
        check_max_pending(max_pending)
        engine = EngineProcess(model, engine_args) if engine_process else LLMEngine(model, **engine_args)
        return cls(engine, max_pending)

    @property
    def config(self) -> Config:
        return self._core.config

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self._core.tokenizer

    # -- the loop -------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._loop is not None and not self._dead

    def start(self) -> None:
        """Start the engine loop's thread (or the thread that reads the engine process), bound to the
        running event loop; requests start it too."""
        if self._loop is not None:
            if asyncio.get_running_loop() is not self._loop:
                raise RuntimeError("an AsyncLLM serves the event loop it was first used in, not another one")
            return
        self._loop = asyncio.get_running_loop()
        self._core.start(self._on_reply, self._on_deltas, self._on_end)

    # called on the core's thread (the engine's, or the engine process's reader)

    def _on_reply(self, command_id: int, result: object, error: Exception | None) -> None:
        with self._lock:
            future = self._replies.pop(command_id)
        if future.set_running_or_notify_cancel():  # False: its caller was cancelled
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _on_deltas(self, deltas: list[Delta]) -> None:
        self._loop.call_soon_threadsafe(self._dispatch, deltas)

    def _on_end(self, error: BaseException | None) -> None:
        with self._lock:
            self._dead, self.error = True, error
            pending, self._replies = self._replies, {}
        for future in pending.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineDeadError("the engine loop has stopped"))
        reason = f"the engine loop died: {error!r}" if error else "the engine was shut down"
        if not self._loop.is_closed():  # else nobody is listening
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(reason))

    # on the event loop

    def _dispatch(self, deltas: list[Delta]) -> None:
        for request_id, completions, finished in deltas:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(completions, finished)

    def _fail_all(self, error: EngineDeadError) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(error)

    async def _call(self, command: Callable[[int], Command]) -> object:
        """Send `command(command_id)` to the loop, applied between steps; its result or exception comes back."""
        self.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # sent and registered before the loop's end can fail what is registered
            command_id = next(self._command_ids)
            self._send(command(command_id))
            self._replies[command_id] = future
        return await asyncio.wrap_future(future)

    def _send(self, command: Command) -> None:
        """Hand a command to the core (the caller holds _lock); EngineDeadError once the loop has ended."""
        if self._dead:
            raise EngineDeadError(f"the engine loop is not running (error: {self.error!r})")
        self._core.send(command)

    def _post(self, command: Command) -> None:
        """Hand a command to the core unless the loop has ended."""
        with self._lock:
            if not self._dead:
                self._core.send(command)

    # -- requests -------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: Prompt,
                          sampling_params: SamplingParams | None = None) -> RequestStream:
        """Queue a request; its deltas come from the returned stream, which must be closed.

        A bad prompt or bad parameters raise ValueError/TypeError here, before
        anything runs; a full queue raises QueueFullError. A text prompt is tokenized
        here (in the server's process, not the engine's).
        """
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_capacity()
        text, token_ids = tokenize_prompt(self.tokenizer, prompt)
        stream = RequestStream(self, request_id, text, token_ids)
        self._streams[request_id] = stream
        try:
            await self._call(lambda command_id: AddRequest(command_id, request_id, token_ids, sampling_params))
        except asyncio.CancelledError:  # the command may still run: undo it
            del self._streams[request_id]
            self._post(AbortRequest(request_id))
            raise
        except BaseException:
            del self._streams[request_id]
            raise
        return stream

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas as the engine produces them; the last one has `finished`.

        Closing the generator early (cancellation, or `break` inside
        `contextlib.aclosing(...)`) aborts the request and frees its KV blocks at
        once; a generator merely dropped after `break` is closed later, by the event loop.
        """
        stream = await self.add_request(request_id or uuid.uuid4().hex, prompt, sampling_params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def _release(self, request_id: str, finished: bool) -> None:
        if self._streams.pop(request_id, None) is not None and not finished:
            self._post(AbortRequest(request_id))

    def _check_capacity(self) -> None:
        if self.max_pending is None:
            return
        limit = self.config.max_num_seqs + self.max_pending
        if len(self._streams) >= limit:
            raise QueueFullError(f"{len(self._streams)} requests are in flight, the limit is {limit} "
                                 f"(max_num_seqs={self.config.max_num_seqs} + "
                                 f"max_pending={self.max_pending}); retry later")

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks before the next step; its stream ends without a
        finished output."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.queue.put_nowait(None)
        self.start()
        with self._lock:
            self._send(AbortRequest(request_id))

    async def stats(self) -> dict[str, float]:
        """The engine's `stats()`, read between steps (or, in thread mode, directly once the loop has stopped)."""
        if self._dead and self.engine is not None:
            return self.engine.stats()
        return await self._call(GetStats)

    def stop(self) -> None:
        """Ask the loop to stop after the current step (from any thread, a signal handler too);
        live requests then end with EngineDeadError. In process mode the engine process then exits."""
        self._core.stop()

    async def shutdown(self) -> None:
        """Stop the loop and wait until it has stopped (in process mode: until the engine process has exited)."""
        self.stop()
        await asyncio.to_thread(self._core.join)


def check_max_pending(max_pending: int | None) -> None:
    if max_pending is not None and max_pending < 0:
        raise ValueError(f"max_pending must be >= 0 or None, got {max_pending}")


class RequestStream:
    """One live request's deltas, as an async iterator; `close()` aborts it unless it finished.

    Deltas that arrive while the consumer is busy come out merged into one: when streaming
    falls behind the engine (many streams, each written to its socket in Python), each
    stream's work per step shrinks instead of its queue growing.
    """

    def __init__(self, llm: AsyncLLM, request_id: str, prompt: str | None, prompt_token_ids: list[int]):
        self.llm = llm
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        # its deltas, then an exception (the loop died) or None (aborted)
        self.queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self.finished = False
        self._held: list[BaseException | None] = []  # an end met while merging, for the next call

    def put(self, completions: list[CompletionOutput], finished: bool) -> None:
        """A delta from the engine; the prompt is the stream's (the engine does not send it)."""
        self.queue.put_nowait(RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions, finished))

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        output = self._held.pop() if self._held else await self.queue.get()
        if output is None:
            raise StopAsyncIteration
        if isinstance(output, BaseException):
            raise output
        while not output.finished and not self.queue.empty():
            later = self.queue.get_nowait()
            if not isinstance(later, RequestOutput):
                self._held.append(later)
                break
            output.add(later)
        self.finished = output.finished
        return output

    def close(self) -> None:
        """Forget the request; abort it in the engine (freeing its KV blocks) unless it finished."""
        self.llm._release(self.request_id, self.finished)
