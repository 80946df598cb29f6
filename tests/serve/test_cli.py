"""`nanovllm serve`: its flags, the API key, the bound on pending requests, and shutdown on SIGTERM."""
from __future__ import annotations

import dataclasses
import json
import signal
import threading

import httpx
import pytest
from server_process import ServerProcess

from nanovllm.config import Config
from nanovllm.serve.cli import engine_args, main, serve_parser

KEY = "secret-key"


def test_every_engine_argument_is_a_flag():
    parser = serve_parser()
    flags = {action.dest for action in parser._actions}
    assert {f.name for f in dataclasses.fields(Config) if f.init} - {"model"} <= flags


def test_flags_parse_to_engine_arguments():
    spec = {"method": "ngram", "num_speculative_tokens": 2}
    args = serve_parser().parse_args(["m", "--device", "cpu", "--max-model-len", "128", "--enforce-eager",
                                      "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5",
                                      "--speculative-config", json.dumps(spec)])
    assert args.model == "m" and args.port == 8000 and args.host == "127.0.0.1"
    assert engine_args(args) == dict(device="cpu", max_model_len=128, enforce_eager=True,
                                     enable_prefix_caching=False, gpu_memory_utilization=0.5,
                                     speculative_config=spec)
    assert engine_args(serve_parser().parse_args([])) == {}  # unset flags keep Config's defaults
    assert not args.engine_in_thread and serve_parser().parse_args(["--engine-in-thread"]).engine_in_thread


def test_console_script_runs_serve(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--help"])
    assert exit.value.code == 0 and "usage: nanovllm serve" in capsys.readouterr().out


def test_bad_flag_value_is_an_error():
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--max-num-seqs", "many"])


@pytest.fixture(scope="module")
def server(tiny_chat_model, tmp_path_factory):
    """One running sequence at a time and one pending: a third live request is refused."""
    proc = ServerProcess(tiny_chat_model, "--api-key", KEY, "--max-num-seqs", "1", "--max-pending", "1",
                         "--num-kvcache-blocks", "256", log_path=str(tmp_path_factory.mktemp("log") / "server.log"))
    yield proc
    proc.stop()


def complete(server: ServerProcess, key: str | None, **body: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base_url}/v1/completions", headers=headers, timeout=60,
                      json={"prompt": "hello", "max_tokens": 2, **body})


def test_api_key(server):
    assert complete(server, None).status_code == 401
    assert complete(server, "wrong").json()["error"]["code"] == 401
    assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
    assert complete(server, KEY).status_code == 200
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # no key needed


def open_stream(http: httpx.Client, ready: threading.Event) -> list[str]:
    """Stream a long completion; set `ready` at its first event; return its events."""
    body = {"prompt": "tell me a story", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    events = []
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(line)
                ready.set()
    return events


def test_max_pending_then_sigterm_ends_streams_and_exits_0(server):
    """Two live requests fill the bound (1 running + 1 pending); a third gets 503. SIGTERM then ends
    both streams with [DONE] and the process exits 0."""
    http = httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    results: list[list[str]] = []
    readies = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=lambda r=r: results.append(open_stream(http, r))) for r in readies]
    threads[0].start()
    assert readies[0].wait(30)
    threads[1].start()
    server.wait_for_metric("nanovllm:num_requests_waiting", 1)
    refused = complete(server, KEY)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    assert len(results) == 2 and all(events[-1] == "data: [DONE]" for events in results)
    assert all(len(events) < 1000 for events in results)  # cut short, not run to max_tokens
    assert server.stop() == 0, server.log()
