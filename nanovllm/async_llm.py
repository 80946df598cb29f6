"""An asyncio face over the engine core: many concurrent requests, one stepping thread.

The engine core is single-threaded, so one background thread owns it: it takes
commands (add, abort, stats, stop) from a queue, steps while any request is live,
and hands each request's deltas to its asyncio queue on the event loop. Requests
added from any number of coroutines share the engine's continuous batching.

    llm = AsyncLLM.from_engine_args("path/to/model", device="cpu")
    async for delta in llm.generate("Hello", SamplingParams(max_tokens=32)):
        print(delta.outputs[0].text, end="")
    await llm.shutdown()
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable

from nanovllm.engine.llm_engine import LLMEngine, Prompt
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped (an error in a step, or shutdown); no request can run."""


class QueueFullError(RuntimeError):
    """More requests wait than `max_pending` allows; the caller should retry later."""


class AsyncLLM:
    """Streams each request's deltas from one engine core stepped by a background thread.

    `max_pending` bounds the requests that wait beyond those the engine runs at once
    (`max_num_seqs`): a request over the bound raises `QueueFullError` instead of queueing.
    """

    def __init__(self, engine: LLMEngine, max_pending: int | None = None):
        if max_pending is not None and max_pending < 0:
            raise ValueError(f"max_pending must be >= 0 or None, got {max_pending}")
        self.engine = engine
        self.max_pending = max_pending
        self.error: BaseException | None = None  # what killed the loop, if anything did
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], concurrent.futures.Future | None]] = (
            queue.SimpleQueue())
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException | None]] = {}  # by request id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead = False  # set, with the queue drained, under _lock once the loop has ended
        self._lock = threading.Lock()

    @classmethod
    def from_engine_args(cls, model: str | os.PathLike | None = None, max_pending: int | None = None,
                         **engine_args: object) -> AsyncLLM:
        return cls(LLMEngine(model, **engine_args), max_pending)

    # -- the loop -------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        """Start the stepping thread, bound to the running event loop; requests start it too."""
        if self._thread is not None:
            if asyncio.get_running_loop() is not self._loop:
                raise RuntimeError("an AsyncLLM serves the event loop it was first used in, not another one")
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands(block=not self.engine.has_unfinished_requests())
                if not self._stopping and self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as e:  # noqa: BLE001 - every live request must hear of it
            self.error = e
        finally:
            self._fail_pending_commands()
            reason = f"the engine loop died: {self.error!r}" if self.error else "the engine was shut down"
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(reason))

    def _apply_commands(self, block: bool) -> None:
        """Run queued commands on the engine; wait for one first when there is nothing to step."""
        while True:
            try:
                command, future = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            try:
                result = command()
            except Exception as e:  # add_request raises before queueing: the engine is as it was
                if future is None:
                    raise
                future.set_exception(e)
            else:
                if future is not None:
                    future.set_result(result)

    def _fail_pending_commands(self) -> None:
        with self._lock:
            self._dead = True
            while True:
                try:
                    _, future = self._commands.get_nowait()
                except queue.Empty:
                    return
                if future is not None:
                    future.set_exception(EngineDeadError("the engine loop has stopped"))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)

    def _fail_all(self, error: EngineDeadError) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

    async def _call(self, command: Callable[[], object]) -> object:
        """Run `command` on the engine thread, between steps; its result or exception comes back."""
        self.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._dead:
                raise EngineDeadError(f"the engine loop is not running (error: {self.error!r})")
            self._commands.put((command, future))
        return await asyncio.wrap_future(future)

    def _post(self, command: Callable[[], object]) -> None:
        """Queue `command` for the engine thread without waiting for it."""
        with self._lock:
            if not self._dead:
                self._commands.put((command, None))

    # -- requests -------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: Prompt,
                          sampling_params: SamplingParams | None = None) -> RequestStream:
        """Queue a request; its deltas come from the returned stream, which must be closed.

        A bad prompt or bad parameters raise ValueError/TypeError here, before
        anything runs; a full queue raises QueueFullError.
        """
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_capacity()
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream.queue
        try:
            await self._call(lambda: self.engine.add_request(request_id, prompt, sampling_params))
        except asyncio.CancelledError:  # the command may still run: undo it
            del self._streams[request_id]
            self._post(lambda: self.engine.abort_request(request_id))
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
            self._post(lambda: self.engine.abort_request(request_id))

    def _check_capacity(self) -> None:
        if self.max_pending is None:
            return
        limit = self.engine.config.max_num_seqs + self.max_pending
        if len(self._streams) >= limit:
            raise QueueFullError(f"{len(self._streams)} requests are in flight, the limit is {limit} "
                                 f"(max_num_seqs={self.engine.config.max_num_seqs} + "
                                 f"max_pending={self.max_pending}); retry later")

    async def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; its stream ends without a finished output."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put_nowait(None)
        await self._call(lambda: self.engine.abort_request(request_id))

    async def stats(self) -> dict[str, float]:
        """The engine's `stats()`, read between steps (or directly once the loop has stopped)."""
        if not self.is_running and self._thread is not None:
            return self.engine.stats()
        return await self._call(self.engine.stats)

    def stop(self) -> None:
        """Ask the loop to stop after the current step (from any thread, a signal handler too);
        live requests then end with EngineDeadError."""
        self._stopping = True
        self._commands.put((lambda: None, None))  # wake the loop if it waits for a command

    async def shutdown(self) -> None:
        """Stop the loop and wait until it has stopped."""
        if self._thread is None:
            return
        self.stop()
        await asyncio.to_thread(self._thread.join)


class RequestStream:
    """One live request's deltas, as an async iterator; `close()` aborts it unless it finished.

    Deltas that arrive while the consumer is busy come out merged into one: when streaming
    falls behind the engine (many streams, each written to its socket in Python), each
    stream's work per step shrinks instead of its queue growing.
    """

    def __init__(self, llm: AsyncLLM, request_id: str):
        self.llm = llm
        self.request_id = request_id
        # its deltas, then an exception (the loop died) or None (aborted)
        self.queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self.finished = False
        self._held: list[BaseException | None] = []  # an end met while merging, for the next call

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
