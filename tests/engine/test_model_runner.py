"""ModelRunner pieces that the GPU path depends on, exercised on CPU."""
from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.attention.backends.torch_ref import TorchRefBackend
from nanovllm.engine.model_runner import ModelRunner, padded_tokens


def test_warmup_runs_both_prefill_paths(tiny_model, monkeypatch):
    """The warm-up (CUDA only at startup) prefills without and then over a cached prefix, so neither
    path's kernels are first compiled under a request."""
    path, _ = tiny_model("qwen3")
    llm = LLM(path, device="cpu", skip_tokenizer_init=True, num_kvcache_blocks=64, max_num_batched_tokens=300,
              max_model_len=128)
    seen = []
    forward = TorchRefBackend.forward

    def spy(self, query, key, value, cache, meta, scale):
        seen.append((meta.has_prefix, query.shape[0]))
        return forward(self, query, key, value, cache, meta, scale)

    monkeypatch.setattr(TorchRefBackend, "forward", spy)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: None)
    llm.model_runner._warmup()
    assert {prefix for prefix, _ in seen} == {False, True}
    assert sum(n for prefix, n in seen if not prefix) == 300 * llm.config.hf_config.num_hidden_layers


def test_padded_tokens_round_up_to_few_counts():
    assert [padded_tokens(n) for n in (1, 2, 3, 17, 1024, 1025, 1536, 1537, 8192)] == \
        [1, 2, 4, 32, 1024, 1536, 1536, 2048, 8192]


def test_padded_eager_steps_give_the_same_outputs(tiny_model, monkeypatch):
    """Eager prefill and verify steps padded with query tokens no sequence owns (as on CUDA): chunked
    prefills, over a cached prefix too, and n-gram verify steps give the same greedy tokens and logprobs."""
    from conftest import random_prompts

    path, _ = tiny_model("qwen3")
    pattern = random_prompts([9], seed=5)[0]
    prompts = [pattern * 3 + tail for tail in random_prompts([3, 40, 90], seed=6)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    args = dict(device="cpu", skip_tokenizer_init=True, num_kvcache_blocks=64, max_num_batched_tokens=64,
                speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    expected = LLM(path, **args).generate(prompts, params, use_tqdm=False)
    llm = LLM(path, **args)
    llm.model_runner.pad_tokens = True
    padded = []
    execute = ModelRunner.execute

    def spy(self, step, extra):
        padded.append((step.is_decode, len(step.input_ids) - int(step.layout.query_start_loc[-1])))
        return execute(self, step, extra)

    monkeypatch.setattr(ModelRunner, "execute", spy)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(expected, outputs):
        a, b = a.outputs[0], b.outputs[0]
        assert b.token_ids == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert list(y) == list(x) and list(y.values()) == pytest.approx(list(x.values()), abs=1e-5)
    assert any(pad for is_decode, pad in padded if not is_decode) and llm.stats()["spec_proposed_tokens"] > 0


def test_rows_that_overflow_the_candidates_are_finished_within_the_step(tiny_model, monkeypatch):
    """On the GPU a filtered row whose set does not fit its candidates is finished on the device, with no
    host sync (`sampling_kernels.exact_rows`), before the next step reads its token. Here the Triton path
    runs in the interpreter with 16 candidates a row, so that rows overflow at most steps, on an overlapping
    engine (the graphs' path without capture, as on a GPU, and eager prefills): the tokens equal the torch
    path's (the same seeds, the same noise)."""
    from conftest import random_prompts

    from nanovllm.layers import sampler as S

    path, _ = tiny_model("qwen3")
    prompts = random_prompts([5, 9, 14, 3], seed=90)
    params = [SamplingParams(temperature=1.5, top_p=0.95, seed=10 + i, max_tokens=12, ignore_eos=True)
              for i in range(len(prompts))]
    from nanovllm.layers import sampling_kernels as K

    overflowed = []
    exact_rows = K.exact_rows
    monkeypatch.setattr(K, "exact_rows", lambda *args: overflowed.append(int((args[8] == 0).sum())) or
                        exact_rows(*args))

    def tokens(on_triton: bool) -> list[list[int]]:
        with monkeypatch.context() as m:
            m.setattr(ModelRunner, "_capture_graphs", lambda self: self.decode_graphs(capture=False))
            llm = LLM(path, skip_tokenizer_init=True, device="cpu", max_num_seqs=8)
            llm.overlap_steps = True
            m.setattr(S.Sampler, "_on_triton", staticmethod(lambda logits: on_triton))
            m.setattr(S, "CANDIDATES", 16)
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert tokens(True) == tokens(False)
    assert sum(n > 0 for n in overflowed) >= 6, overflowed  # of the 12 steps
