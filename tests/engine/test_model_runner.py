"""ModelRunner pieces that the GPU path depends on, exercised on CPU."""
from __future__ import annotations

import torch

from nanovllm import LLM
from nanovllm.attention.backends.torch_ref import TorchRefBackend


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
