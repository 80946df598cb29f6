"""The engine core's loop: commands in, each step's deltas out, between steps.

AsyncLLM runs it on a background thread of its own process (`core_thread.EngineThread`) or in
a child process (`core_process.EngineProcess`). Either way one loop owns the engine: it applies
the commands that came (add, abort, stats, stop), steps while any request is live, and hands out
each step's news as one list of deltas. The commands are plain data, so that they can be pickled.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nanovllm.engine.llm_engine import LLMEngine, Prompt
from nanovllm.outputs import CompletionOutput
from nanovllm.sampling_params import SamplingParams

# A request's news from one step: its id, its completions' deltas, whether it finished. Not the
# prompt: the side that added the request has it, and it would cross the process boundary every step.
Delta = tuple[str, list[CompletionOutput], bool]


@dataclass(frozen=True)
class AddRequest:
    """Answered with None, or with the ValueError/TypeError that rejected the request."""

    command_id: int
    request_id: str
    prompt: Prompt
    sampling_params: SamplingParams | None


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class GetStats:
    """Answered with the engine's `stats()`."""

    command_id: int


@dataclass(frozen=True)
class Stop:
    """End the loop after the current step; commands behind it are not applied."""


Command = AddRequest | AbortRequest | GetStats | Stop
Reply = Callable[[int, object, Exception | None], None]  # (command_id, result, error)


class CoreLoop:
    """Drives one engine; `reply` answers AddRequest and GetStats, `emit` takes each step's deltas."""

    def __init__(self, engine: LLMEngine, reply: Reply, emit: Callable[[list[Delta]], None]):
        self.engine = engine
        self.reply = reply
        self.emit = emit

    def run(self, receive: Callable[[bool], Iterable[Command]]) -> None:
        """Until Stop: apply the commands that came, then step if any request is live.

        `receive(block)` yields the commands waiting; with block, it waits for the first one
        (the engine is idle then). An error in a step ends the loop: it is the caller's to report.
        """
        engine = self.engine
        while True:
            for command in receive(not engine.has_unfinished_requests()):
                if isinstance(command, Stop):
                    return
                self.apply(command)
            if engine.has_unfinished_requests():
                deltas = [(out.request_id, out.outputs, out.finished) for out in engine.step()]
                if deltas:
                    self.emit(deltas)

    def apply(self, command: AddRequest | AbortRequest | GetStats) -> None:
        if isinstance(command, AbortRequest):
            self.engine.abort_request(command.request_id)
            return
        try:
            if isinstance(command, AddRequest):
                result = self.engine.add_request(command.request_id, command.prompt, command.sampling_params)
            else:
                result = self.engine.stats()
        except Exception as e:  # add_request raises before queueing: the engine is as it was
            self.reply(command.command_id, None, e)
        else:
            self.reply(command.command_id, result, None)
