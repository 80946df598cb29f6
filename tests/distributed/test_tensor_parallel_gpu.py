"""TP=2 on two CUDA GPUs (NCCL) in bfloat16: greedy output equals TP=1 up to bf16 near-ties, and
CUDA graphs are captured on both ranks; the engine then shuts down (NCCL's teardown hangs while a
graph that captured its collectives lives). Skipped without 2 GPUs (`bash scripts/tp_check.sh`).

The model and the near-tie-aware comparison are those of tests/engine/test_gpu_e2e.py (its
Qwen3-0.6B-shaped model: 16 query / 8 KV heads, split 8 / 4 per rank).
"""
from __future__ import annotations

import pytest
import torch
import transformers
from conftest import random_prompts
from engine.test_gpu_e2e import COMMON, MODELS, VOCAB, compare_runs, free_cuda, generate

from nanovllm import LLM

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

ARGS = dict(skip_tokenizer_init=True, dtype="bfloat16", device="cuda", max_model_len=1024, max_num_seqs=32,
            gpu_memory_utilization=0.5)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    config_cls, model_cls, overrides = MODELS["qwen3"]
    config = getattr(transformers, config_cls)(**COMMON, **overrides)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tp-gpu-qwen3"))
    getattr(transformers, model_cls)(config).eval().save_pretrained(path)
    return path


def test_tp2_matches_tp1_with_cuda_graphs_on_both_ranks(model_path):
    prompts = random_prompts([20, 37, 64, 100, 150, 211, 256, 300], seed=12, vocab=VOCAB)
    tp1 = LLM(model_path, **ARGS)
    reference = generate(tp1, prompts, 32)
    del tp1
    free_cuda()
    with LLM(model_path, tensor_parallel_size=2, **ARGS) as tp2:
        assert tp2.model_runner.graphs is not None
        assert tp2.model_runner.tp.one_shot is not None  # decode's all-reduces bypass NCCL
        assert all(info["cuda_graph_sizes"] for info in tp2.model_runner.workers.worker_info)
        completions = generate(tp2, prompts, 32)
        workers = tp2.model_runner.workers.procs
    assert [p.exitcode for p in workers] == [0]  # left the group with rank 0 and exited, not killed
    compare_runs(reference, completions, "TP=2 vs TP=1")  # all-reduce sums in another order: near-ties part
