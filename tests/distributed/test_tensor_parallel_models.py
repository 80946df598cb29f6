"""TP=2 on CPU on the other tiny models, each engine shut down by its context manager: greedy equals
TP=1 and HF (qwen2 and llama: one KV head, replicated on both ranks; llama-hd128: tied embeddings,
vocabulary-parallel on both ends; llama with n-gram speculation, whose verify steps are just another
batch shape). Then no worker process is left, each having exited by itself; a worker that dies is an
error in the driver, not a hang.
"""
from __future__ import annotations

import os
import signal

import pytest
from conftest import hf_greedy, random_prompts

from nanovllm import LLM, SamplingParams

ARGS = dict(skip_tokenizer_init=True, device="cpu", max_model_len=256, num_kvcache_blocks=16, max_num_seqs=4)
MAX_TOKENS = 10
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def token_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize(("name", "extra"), [("qwen2", {}), ("llama", {"speculative_config": NGRAM}),
                                             ("llama-hd128", {})])
def test_greedy_matches_tp1_and_hf_then_workers_exit(tiny_model, name, extra):
    path, hf_model = tiny_model(name)
    pattern = random_prompts([5], seed=6)[0]
    prompts = random_prompts([7, 30]) + [pattern * 4]  # the repeated pattern gives n-grams to propose
    with LLM(path, tensor_parallel_size=2, **ARGS, **extra) as llm:
        procs = llm.model_runner.workers.procs
        ours = token_ids(llm, prompts)
        if extra:
            assert llm.stats()["spec_proposed_tokens"] > 0
    assert all(gone(p.pid) for p in procs)
    assert [p.exitcode for p in procs] == [0]  # it left the group with rank 0 and exited, not killed
    assert ours == token_ids(LLM(path, **ARGS), prompts)
    assert ours == [hf_greedy(hf_model, p, MAX_TOKENS) for p in prompts]


def test_dead_worker_is_an_error_not_a_hang(tiny_model):
    llm = LLM(tiny_model("qwen2")[0], tensor_parallel_size=2, **ARGS)
    worker = llm.model_runner.workers.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    with pytest.raises(RuntimeError, match="worker rank 1 exited"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    llm.shutdown()
    assert gone(worker.pid)
