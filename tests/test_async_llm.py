"""AsyncLLM: the engine core on a thread or in its own process, streams of deltas, abort, bounds,
a dead loop, a killed engine process."""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from conftest import random_prompts

from nanovllm import LLM, RequestOutput, SamplingParams
from nanovllm.async_llm import AsyncLLM, EngineDeadError, QueueFullError

ENGINE_ARGS = dict(skip_tokenizer_init=True, device="cpu", num_kvcache_blocks=256)
DEADLINE_S = 30  # for what must not hang


@pytest.fixture(scope="module")
def engine(tiny_model):
    path, _ = tiny_model("qwen3")
    return LLM(path, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def engine_process(tiny_model):
    """One engine process for the module's process-mode tests (spawning one takes seconds), with
    the one event loop it serves: (loop, llm)."""
    path, _ = tiny_model("qwen3")
    llm = AsyncLLM.from_engine_args(path, engine_process=True, **ENGINE_ARGS)
    loop = asyncio.new_event_loop()
    yield loop, llm
    loop.run_until_complete(llm.shutdown())
    loop.close()


@pytest.fixture(params=["thread", "process"])
def run_in_mode(request, engine) -> Callable[[Callable[[AsyncLLM], Awaitable]], object]:
    """Run `body(llm)`: on a fresh thread-mode AsyncLLM over `engine`, or on the module's engine process."""
    if request.param == "thread":
        return lambda body: run(engine, body)
    loop, llm = request.getfixturevalue("engine_process")
    return lambda body: loop.run_until_complete(body(llm))


def spawned_since(before: set[multiprocessing.Process]) -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p not in before]


def run(engine: LLM, body, **kwargs) -> object:
    """Run `body(llm)` in a fresh event loop with an AsyncLLM over `engine`, shut down afterwards."""
    async def main() -> object:
        llm = AsyncLLM(engine, **kwargs)
        try:
            return await body(llm)
        finally:
            await llm.shutdown()

    return asyncio.run(main())


async def merged(llm: AsyncLLM, prompt: list[int], params: SamplingParams) -> RequestOutput:
    whole = None
    async for delta in llm.generate(prompt, params):
        if whole is None:
            whole = delta
        else:
            whole.add(delta)
    whole.outputs.sort(key=lambda c: c.index)
    return whole


def test_concurrent_streams_merge_to_generate(engine, run_in_mode):
    prompts = random_prompts([5, 17, 9, 30], seed=3)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(n=2, seed=5, temperature=1.0, max_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=1, max_tokens=20, ignore_eos=True)]
    expected = engine.generate(prompts, params, use_tqdm=False)

    async def body(llm: AsyncLLM) -> tuple[list[RequestOutput], dict]:
        return await asyncio.gather(*(merged(llm, p, sp) for p, sp in zip(prompts, params))), await llm.stats()

    outputs, stats = run_in_mode(body)
    for got, want in zip(outputs, expected):
        assert got.finished and got.prompt_token_ids == want.prompt_token_ids
        assert [(c.token_ids, c.finish_reason) for c in got.outputs] == \
               [(c.token_ids, c.finish_reason) for c in want.outputs]
        for c, w in zip(got.outputs, want.outputs):
            assert [list(e) for e in c.logprobs or []] == [list(e) for e in w.logprobs or []]
            assert [v for e in c.logprobs or [] for v in e.values()] == \
                   pytest.approx([v for e in w.logprobs or [] for v in e.values()], abs=1e-4)
    assert stats["kv_blocks_used"] == 0


def test_leaving_a_stream_aborts_it_and_frees_blocks(run_in_mode):
    async def body(llm: AsyncLLM) -> tuple[int, dict]:
        params = SamplingParams(max_tokens=500, ignore_eos=True)
        async with contextlib.aclosing(llm.generate(random_prompts([40])[0], params)) as stream:
            async for _ in stream:
                used = (await llm.stats())["kv_blocks_used"]
                break
        return used, await llm.stats()

    used, stats = run_in_mode(body)
    assert used > 0 and stats["kv_blocks_used"] == 0 and stats["num_requests_running"] == 0


def test_abort_ends_the_stream(run_in_mode):
    async def body(llm: AsyncLLM) -> tuple[list[RequestOutput], dict]:
        stream = await llm.add_request("r1", random_prompts([8])[0], SamplingParams(max_tokens=500, ignore_eos=True))
        first = await anext(stream)
        await llm.abort("r1")
        return [first] + [d async for d in stream], await llm.stats()

    deltas, stats = run_in_mode(body)
    assert not deltas[-1].finished and stats["kv_blocks_used"] == 0 and stats["num_requests_running"] == 0


def test_bad_request_is_rejected_and_the_loop_keeps_serving(run_in_mode):
    """The engine's own checks raise from add_request, in the engine process too."""
    async def body(llm: AsyncLLM) -> RequestOutput:
        with pytest.raises(ValueError, match="over max_model_len"):
            await llm.add_request("bad", [1] * 2000, SamplingParams())
        with pytest.raises(ValueError, match="token id 100000 is out of range"):
            await llm.add_request("bad", [1, 100000], SamplingParams())
        params = SamplingParams()
        params.temperature = -1.0  # after construction: the engine checks it again
        with pytest.raises(ValueError, match="temperature"):
            await llm.add_request("bad", [1], params)
        with pytest.raises(TypeError, match="a prompt must be"):
            await llm.add_request("bad", [1.5], SamplingParams())
        return await merged(llm, [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))

    output = run_in_mode(body)
    assert len(output.outputs[0].token_ids) == 4 and output.prompt_token_ids == [1, 2, 3]


def test_max_pending_bounds_live_requests(engine):
    async def body(llm: AsyncLLM) -> None:
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        limit = engine.config.max_num_seqs + 1
        streams = [await llm.add_request(f"r{i}", [1, 2], params) for i in range(limit)]
        with pytest.raises(QueueFullError, match="limit"):
            await llm.add_request("one-too-many", [1, 2], params)
        for stream in streams:
            stream.close()

    run(engine, body, max_pending=1)


def test_a_dying_loop_fails_live_requests(tiny_model):
    path, _ = tiny_model("qwen3")
    engine = LLM(path, skip_tokenizer_init=True, device="cpu", num_kvcache_blocks=64)

    def broken_step() -> list[RequestOutput]:
        raise RuntimeError("a device error")

    engine.step = broken_step  # a fault in the engine, injected: the loop must not hang its requests

    async def body(llm: AsyncLLM) -> bool:
        with pytest.raises(EngineDeadError, match="a device error"):
            async for _ in llm.generate([1, 2, 3], SamplingParams(max_tokens=4)):
                pass
        with pytest.raises(EngineDeadError):
            await llm.add_request("later", [1], SamplingParams())
        return llm.is_running

    assert run(engine, body) is False


def test_a_slow_consumer_gets_merged_deltas(engine, run_in_mode):
    """Deltas that pile up while the consumer is busy come out as one: fewer, longer deltas with
    the same tokens, in order, and finished only on the last."""
    prompt = random_prompts([12], seed=9)[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids

    async def body(llm: AsyncLLM) -> list[RequestOutput]:
        deltas = []
        async for delta in llm.generate(prompt, params):
            deltas.append(delta)
            await asyncio.sleep(0.05)  # the engine steps on meanwhile
        return deltas

    deltas = run_in_mode(body)
    assert [t for d in deltas for t in d.outputs[0].token_ids] == expected
    assert len(deltas) < len(expected) and max(len(d.outputs[0].token_ids) for d in deltas) > 1
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]


async def drain(stream: AsyncIterator[RequestOutput]) -> None:
    async for _ in stream:
        pass


def test_a_killed_engine_process_fails_live_requests(tiny_model):
    """The reader sees the pipe close: the live stream ends with EngineDeadError, later requests
    too, and is_running turns False (GET /health: 503); nothing hangs."""
    path, _ = tiny_model("qwen3")
    before = set(multiprocessing.active_children())

    async def body() -> None:
        llm = AsyncLLM.from_engine_args(path, engine_process=True, **ENGINE_ARGS)
        [child] = spawned_since(before)
        stream = await llm.add_request("r", [1, 2, 3], SamplingParams(max_tokens=1000, ignore_eos=True))
        await anext(stream)
        assert llm.is_running
        os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match=r"exit code -9"):
            await asyncio.wait_for(drain(stream), DEADLINE_S)
        assert not llm.is_running
        with pytest.raises(EngineDeadError):
            await llm.add_request("later", [1], SamplingParams())
        with pytest.raises(EngineDeadError):
            await llm.stats()
        await asyncio.wait_for(llm.shutdown(), DEADLINE_S)

    asyncio.run(body())
    assert spawned_since(before) == []


def test_shutdown_ends_the_engine_process(tiny_model):
    """shutdown() stops the loop after its step: the live stream ends with EngineDeadError and the
    process exits by itself (status 0, not killed)."""
    path, _ = tiny_model("qwen3")
    before = set(multiprocessing.active_children())

    async def body() -> multiprocessing.Process:
        llm = AsyncLLM.from_engine_args(path, engine_process=True, **ENGINE_ARGS)
        [child] = spawned_since(before)
        stream = await llm.add_request("r", [1, 2, 3], SamplingParams(max_tokens=1000, ignore_eos=True))
        await anext(stream)
        await asyncio.wait_for(llm.shutdown(), DEADLINE_S)
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(drain(stream), DEADLINE_S)
        assert not llm.is_running
        return child

    child = asyncio.run(body())
    assert not child.is_alive() and child.exitcode == 0
    assert spawned_since(before) == []


def test_an_engine_process_that_fails_to_start_raises_its_error(tiny_model):
    """from_engine_args raises the child's error (its traceback as the cause); no process is left."""
    path, _ = tiny_model("qwen3")
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="max_model_len must be in") as error:
        AsyncLLM.from_engine_args(path, engine_process=True, device="cpu", max_model_len=10**6)
    assert "Traceback" in str(error.value.__cause__)
    assert spawned_since(before) == []
