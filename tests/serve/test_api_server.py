"""The OpenAI-compatible server, end to end: a real server process, the official `openai` client."""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import httpx
import openai
import pytest
from conftest import WORDS
from server_process import ROOT, ServerProcess

from nanovllm import LLM, SamplingParams

NAME = "tiny"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tiny_chat_model, tmp_path_factory):
    proc = ServerProcess(tiny_chat_model, "--served-model-name", NAME, "--num-kvcache-blocks", "512",
                         "--max-num-seqs", "64", log_path=str(tmp_path_factory.mktemp("log") / "server.log"))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def offline(tiny_chat_model):
    """The same model offline: what greedy decoding must give."""
    return LLM(tiny_chat_model, device="cpu", num_kvcache_blocks=512)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def greedy_text(llm: LLM, prompt: str | list[int], max_tokens: int = MAX_TOKENS) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))


def check_stream_shape(chunks: list, num_choices: int, usage) -> None:
    """finish_reason only on each choice's last chunk; a last chunk without choices carries usage."""
    *body, last = chunks
    assert last.choices == [] and last.usage == usage
    assert all(c.usage is None for c in body)
    finishes = [(c.choices[0].index, i) for i, c in enumerate(body) if c.choices[0].finish_reason is not None]
    assert sorted(index for index, _ in finishes) == list(range(num_choices))
    for index, position in finishes:
        assert all(c.choices[0].index != index for c in body[position + 1:])


def test_health_and_models(server, client):
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_stream_equals_whole(client, offline):
    prompt = "tell me a story of the river town"
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].text == greedy_text(offline, prompt)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    check_stream_shape(chunks, 1, whole.usage)
    assert whole.usage.prompt_tokens == len(offline.tokenizer.encode(prompt))


def test_chat_stream_equals_whole(client, offline):
    messages = [{"role": "system", "content": "you are a baker"}, {"role": "user", "content": "hello what is it"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    prompt = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token_ids = offline.tokenizer.encode(prompt, add_special_tokens=False)
    assert whole.choices[0].message.content == greedy_text(offline, token_ids)
    assert whole.usage.prompt_tokens == len(token_ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    check_stream_shape(chunks, 1, whole.usage)


def test_token_prompts_and_default_max_tokens(client, offline):
    """Several token-id prompts in one request; max_tokens absent means the rest of the context."""
    prompts = [[5, 6, 7] * 330, [9] * 1000]
    whole = client.completions.create(model=NAME, prompt=prompts, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[1].text == greedy_text(offline, prompts[1], max_tokens=24)  # 1024 - 1000
    assert whole.usage.prompt_tokens == 1990 and whole.usage.completion_tokens == 34 + 24


def test_64_concurrent_streams_match_offline(server, offline):
    rng = random.Random(0)
    prompts = [sentence(rng) for _ in range(64)]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    expected = [o.outputs[0] for o in offline.generate(prompts, params, use_tqdm=False)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, list[str | None], int]:
        stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        return ("".join(c.choices[0].text for c in chunks[:-1]),
                [c.choices[0].finish_reason for c in chunks[:-1]], chunks[-1].usage.completion_tokens)

    async def run_all() -> list:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                                    http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64)))
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(run_all())
    for (text, finishes, num_tokens), want in zip(results, expected):
        assert text == want.text
        assert finishes[-1] == want.finish_reason and finishes[:-1] == [None] * (len(finishes) - 1)
        assert num_tokens == len(want.token_ids)
    server.wait_for_metric("nanovllm:kv_blocks_used", 0)


def test_n3_seeded_is_distinct_and_repeatable(client):
    def texts() -> list[str]:
        out = client.completions.create(model=NAME, prompt="the baker", n=3, seed=7, temperature=1.0,
                                        max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
        assert [c.index for c in out.choices] == [0, 1, 2]
        return [c.text for c in out.choices]

    first = texts()
    assert len(set(first)) == 3
    assert texts() == first


def test_logprobs(client):
    out = client.completions.create(model=NAME, prompt="hello", max_tokens=4, temperature=0, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert "".join(logprobs.tokens).replace(" ", "") == out.choices[0].text.replace(" ", "")
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == t.logprob for t in content)  # greedy picks the most likely


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_blocks(server, stream):
    before = server.metric("nanovllm:generation_tokens_total")
    body = {"model": NAME, "prompt": "tell me a story", "max_tokens": 1000, "ignore_eos": True, "stream": stream}
    with httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(60, read=0.3 if not stream else 60)) as http:
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                assert server.metric("nanovllm:kv_blocks_used") > 0
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=body)
    server.wait_for_metric("nanovllm:kv_blocks_used", 0)
    assert server.metric("nanovllm:generation_tokens_total") - before < 1000  # stopped early, not finished
    assert server.metric("nanovllm:num_requests_running") == 0


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"prompt": "hello", "max_tokens": "many"}, 400),
    ("/v1/completions", {"prompt": 12}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": [[]]}, 400),
    ("/v1/completions", {"prompt": "hello", "logit_bias": {}}, 400),
    ("/v1/completions", {"prompt": [1] * 1100}, 400),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 1024}, 400),
    ("/v1/completions", {"prompt": "hello", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "hello", "top_p": 2}, 400),
    ("/v1/completions", {"prompt": "hello", "n": 0}, 400),
    ("/v1/completions", {"prompt": "hello", "logprobs": 1000}, 400),
    ("/v1/completions", {"prompt": [99999]}, 400),
    ("/v1/completions", {"prompt": "hello", "model": "gpt-4"}, 404),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True, "min_p": 3}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, client, path, body, status):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.base_url + path, headers={"content-type": "application/json"}, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status and error["message"]
    good = client.completions.create(model=NAME, prompt="hello", max_tokens=2)
    assert good.choices[0].finish_reason in ("stop", "length")


def test_metrics_exposes_the_engine(server):
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_blocks_used", "kv_blocks_total",
                 "prefix_cache_hit_rate", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket"):
        assert f"nanovllm:{name}" in text
    assert server.metric("nanovllm:kv_blocks_total") == 512


def test_bench_serve_streams_bench_workload(server):
    """bench_serve.py against the real server: every drawn output length arrives in full."""
    sys.path.insert(0, ROOT)
    import bench_serve

    flags = ["--num-prompts", "6", "--max-concurrency", "3", "--min-input-len", "4", "--max-input-len", "12",
             "--min-output-len", "2", "--max-output-len", "7", "--max-token-id", "100", "--warmup", "1"]
    done = subprocess.run([sys.executable, "bench_serve.py", "--base-url", server.base_url, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    drawn = bench_serve.workload(bench_serve.parse_args(flags), 0)
    assert result["requests"] == 6 and result["output_tokens"] == sum(n for _, n in drawn)
    assert result["itl_ms"]["p50"] > 0 and result["ttft_ms"]["p99"] >= result["ttft_ms"]["p50"] > 0
