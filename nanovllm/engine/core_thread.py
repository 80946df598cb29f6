"""The engine core stepped by a background thread of this process: AsyncLLM's thread mode.

The engine and whatever serves its streams share one GIL here (see `core_process` for the
other way); it is the mode for an engine built in this process (`AsyncLLM(engine)`, an `LLM`
included), for debugging, and where spawning a process is not possible.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from transformers import PreTrainedTokenizerBase

from nanovllm.config import Config
from nanovllm.engine.core_loop import Command, CoreLoop, Delta, Reply, Stop
from nanovllm.engine.llm_engine import LLMEngine


class EngineThread:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> Config:
        return self.engine.config

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.engine.tokenizer

    def start(self, reply: Reply, emit: Callable[[list[Delta]], None],
              end: Callable[[BaseException | None], None]) -> None:
        """Run the loop on a new thread; `end(error)` is its last call (error None after Stop)."""
        loop = CoreLoop(self.engine, reply, emit)
        self._thread = threading.Thread(target=self._run, args=(loop, end), name="nanovllm-engine", daemon=True)
        self._thread.start()

    def _run(self, loop: CoreLoop, end: Callable[[BaseException | None], None]) -> None:
        error = None
        try:
            loop.run(self._receive)
        except BaseException as e:  # noqa: BLE001 - every live request must hear of it
            error = e
        end(error)

    def _receive(self, block: bool) -> Iterator[Command]:
        while True:
            try:
                yield self._commands.get(block=block)
            except queue.Empty:
                return
            block = False

    def send(self, command: Command) -> None:
        """Queue a command for the loop; from any thread, a signal handler too (SimpleQueue.put is reentrant)."""
        self._commands.put(command)

    def stop(self) -> None:
        self.send(Stop())

    def join(self) -> None:
        """Wait until the loop has ended (after `stop()`); at once if it never started."""
        if self._thread is not None:
            self._thread.join()
