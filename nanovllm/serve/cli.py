"""`nanovllm serve [MODEL] [options]`: the OpenAI-compatible server from the command line.

Every engine argument (a field of `Config`) is a flag of the same name with dashes,
so a new engine argument is a server flag without touching this file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import typing

from nanovllm.config import Config
from nanovllm.utils.model_source import DEFAULT_MODEL_NAME

DEFAULT_MAX_PENDING = 1024
SWITCH_INTERVAL_S = 0.0005


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """A flag per init field of Config, typed from its annotation; unset flags keep Config's default."""
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("engine arguments (see LLM(model, **engine_args))")
    for field in dataclasses.fields(Config):
        if not field.init or field.name == "model":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None))
        default = field.default if field.default is not dataclasses.MISSING else None
        help = f"default: {default}"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif kind is dict:
            group.add_argument(flag, type=json.loads, default=None, help=f"JSON object; {help}")
        else:
            group.add_argument(flag, type=kind, default=None, help=help)


def engine_args(args: argparse.Namespace) -> dict[str, object]:
    """The engine arguments given on the command line."""
    names = {f.name for f in dataclasses.fields(Config) if f.init} - {"model"}
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm serve", description="An OpenAI-compatible HTTP server.")
    parser.add_argument("model", nargs="?", default=None,
                        help=f"a model directory, .gguf file or hub id (default: {DEFAULT_MODEL_NAME})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    parser.add_argument("--max-pending", type=int, default=DEFAULT_MAX_PENDING,
                        help="requests that may wait beyond the max-num-seqs running ones; more get 503")
    parser.add_argument("--engine-in-thread", action="store_true",
                        help="step the engine on a thread of the server's process instead of in a process of its "
                             "own (it then shares the GIL with the HTTP side: slower); for debugging, or where "
                             "spawning a process is not possible")
    add_engine_args(parser)
    return parser


def serve(argv: list[str] | None = None) -> None:
    """Start the engine (in a process of its own unless --engine-in-thread), then serve until
    SIGINT/SIGTERM; returns (exit status 0) after a clean shutdown, the engine process stopped."""
    import uvicorn  # the [serve] extra; imported here so that `--help` works without it

    from nanovllm.async_llm import AsyncLLM
    from nanovllm.serve.api_server import build_app

    args = serve_parser().parse_args(argv)
    llm = AsyncLLM.from_engine_args(args.model, max_pending=args.max_pending,
                                    engine_process=not args.engine_in_thread, **engine_args(args))
    app = build_app(llm, args.served_model_name or args.model or DEFAULT_MODEL_NAME, args.api_key)

    class Server(uvicorn.Server):
        """At the first signal, also stop the engine: in-flight streams end (an error event, then
        [DONE]) instead of running to their max_tokens while uvicorn waits for them."""

        def handle_exit(self, sig: int, frame: object) -> None:
            super().handle_exit(sig, frame)
            llm.stop()

    # uvicorn shuts down gracefully on these signals, then raises the signal again so that the previous
    # handler runs; the default handlers would kill the process (status 130/143) after a clean shutdown.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    if args.engine_in_thread:
        # The engine thread and the event loop share the GIL. A thread that wants it back waits for
        # the holder to block or for the switch interval (5 ms by default, a whole decode step);
        # 0.5 ms bounds that wait (CPU, 256 streams of a tiny model: +7 % throughput). With the engine
        # in its own process, only its reader thread shares this GIL: no gain measured there.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    Server(uvicorn.Config(app, host=args.host, port=args.port)).run()


def main(argv: list[str] | None = None) -> None:
    """The `nanovllm` console script: `nanovllm serve ...`."""
    parser = argparse.ArgumentParser(prog="nanovllm")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the OpenAI-compatible server", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        serve(rest)
