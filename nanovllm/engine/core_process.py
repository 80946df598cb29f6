"""The engine core in a child process: AsyncLLM's process mode, the server's default.

In one process the engine's host work (scheduling, bookkeeping, detokenizing) and the HTTP side
(pydantic, SSE, uvicorn: ~100 us per streamed chunk) share one GIL: with 256 streams on an H200
the server ran at 57 % of offline `generate`. So, as in vLLM v1, the core runs in a process of its
own (spawned: CUDA cannot be forked) and the parent only does HTTP.

Two pipes. Parent -> child: pickled commands (`core_loop`), written by one sender thread, so that
`send` may be called from any thread or a signal handler and never waits for the child. Child ->
parent, read by one reader thread: first `Ready` (the engine's config and tokenizer) or `Died`;
then per step one list of deltas, a `Reply` per command that answers, and `Died` if the loop
fails. The child ignores SIGINT (Ctrl-C reaches the whole process group; the parent stops it) and
ends when the parent's end of the command pipe closes, so it does not outlive the parent.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection

from transformers import PreTrainedTokenizerBase

from nanovllm.config import Config
from nanovllm.engine.core_loop import Command, CoreLoop, Delta, Reply, Stop
from nanovllm.engine.llm_engine import LLMEngine

STOP_TIMEOUT_S = 30.0  # for the child to finish its step and exit (its tensor-parallel workers too); then it is killed


@dataclass
class Ready:
    config: Config
    tokenizer: PreTrainedTokenizerBase | None


@dataclass
class Answer:
    """The answer to an AddRequest or GetStats (what `core_loop.Reply` is called with), crossing the pipe."""

    command_id: int
    result: object
    error: BaseException | None


class RemoteTraceback(Exception):
    """The child's traceback, as the `__cause__` of its error raised in the parent."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class Died:
    """What ended the child, with its traceback."""

    error: BaseException
    traceback: str

    @classmethod
    def of(cls, error: BaseException) -> Died:
        return cls(portable(error), "".join(traceback.format_exception(error)))

    def exception(self) -> BaseException:
        self.error.__cause__ = RemoteTraceback(self.traceback)
        return self.error


def portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - whatever pickling raises
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


# -- the child ---------------------------------------------------------------


def run_engine_core(model: str | os.PathLike | None, engine_args: dict[str, object], commands: Connection,
                    outputs: Connection) -> None:
    """The child's main: build the engine, send Ready (or Died), run the loop until Stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def reply(command_id: int, result: object, error: Exception | None) -> None:
        outputs.send(Answer(command_id, result, None if error is None else portable(error)))

    try:
        with LLMEngine(model, **engine_args) as engine:
            outputs.send(Ready(engine.config, engine.tokenizer))
            CoreLoop(engine, reply, outputs.send).run(lambda block: _receive(commands, block))
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        with suppress(OSError):  # a broken pipe: the parent is gone, nobody to tell
            outputs.send(Died.of(e))


def _receive(commands: Connection, block: bool) -> Iterator[Command]:
    """The commands waiting (EOFError once the parent is gone)."""
    while block or commands.poll():
        yield commands.recv()
        block = False


# -- the parent --------------------------------------------------------------


class EngineProcess:
    """The parent's handle on the child: spawns it and waits for Ready (raising what stopped it
    instead), then carries commands to it and, once started, its answers and deltas back."""

    def __init__(self, model: str | os.PathLike | None, engine_args: dict[str, object]):
        ctx = multiprocessing.get_context("spawn")
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._outputs, child_outputs = ctx.Pipe(duplex=False)
        # not a daemon: a daemon may not start processes, and the child starts tensor-parallel workers
        self._proc = ctx.Process(target=run_engine_core, args=(model, engine_args, child_commands, child_outputs),
                                 name="nanovllm-engine-core")
        self._proc.start()
        child_commands.close()  # the child's ends: closed here, so that its exit reads as EOF
        child_outputs.close()
        # registered after multiprocessing's own exit hook (which waits for non-daemon children), so it runs first
        atexit.register(self.close)
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_all, name="nanovllm-engine-sender", daemon=True)
        self._sender.start()
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._reap_lock = threading.Lock()
        try:
            ready = self._wait_ready()
        except BaseException:
            self.close(timeout=0)
            raise
        self.config: Config = ready.config
        self.tokenizer: PreTrainedTokenizerBase | None = ready.tokenizer

    def _wait_ready(self) -> Ready:
        try:
            message = self._outputs.recv()
        except EOFError:
            raise RuntimeError(f"the engine core process exited during startup "
                               f"(exit code {self._reap(STOP_TIMEOUT_S)})") from None
        if isinstance(message, Died):
            raise message.exception()
        return message

    def start(self, reply: Reply, emit: Callable[[list[Delta]], None],
              end: Callable[[BaseException | None], None]) -> None:
        """Read the child's messages on a new thread: deltas to `emit`, answers to `reply`, and
        `end(error)` last, once the child has ended (error None after `stop()`)."""
        self._reader = threading.Thread(target=self._read, args=(reply, emit, end), name="nanovllm-engine-reader",
                                        daemon=True)
        self._reader.start()

    def _read(self, reply: Reply, emit: Callable[[list[Delta]], None],
              end: Callable[[BaseException | None], None]) -> None:
        try:
            error = self._read_until_end(reply, emit)
        except BaseException as e:  # noqa: BLE001 - every live request must hear of it
            error = e
        end(error)

    def _read_until_end(self, reply: Reply, emit: Callable[[list[Delta]], None]) -> BaseException | None:
        while True:
            try:
                message = self._outputs.recv()
            except EOFError:  # the child has exited
                code = self._reap(STOP_TIMEOUT_S)
                if self._stopping and code == 0:
                    return None
                return RuntimeError(f"the engine core process exited (exit code {code})")
            if isinstance(message, list):
                emit(message)
            elif isinstance(message, Answer):
                reply(message.command_id, message.result, message.error)
            else:
                return message.exception()

    def _send_all(self) -> None:
        """The sender thread, the only writer of the command pipe."""
        while (data := self._outbox.get()) is not None:
            try:
                self._commands.send_bytes(data)
            except OSError:  # the child has exited: the reader reports it
                return

    def send(self, command: Command) -> None:
        """Queue a command for the child; from any thread, a signal handler too. It is pickled
        here, so what does not pickle raises here."""
        self._outbox.put(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))

    def stop(self) -> None:
        self._stopping = True
        self.send(Stop())

    def join(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """After `stop()`: wait for the child to exit (killed after timeout seconds), then for the threads."""
        self._reap(timeout)
        if self._reader is not None:
            self._reader.join()
        self._outbox.put(None)
        self._sender.join()
        self._commands.close()
        self._outputs.close()
        atexit.unregister(self.close)

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the child and wait for it (at exit, or when it failed to start)."""
        self.stop()
        self.join(timeout)

    def _reap(self, timeout: float) -> int:
        """Wait for the child to exit, killing it after timeout seconds; its exit code. The reader
        and a joining thread may both wait: one at a time, so that both get the code."""
        with self._reap_lock:
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            return self._proc.exitcode
