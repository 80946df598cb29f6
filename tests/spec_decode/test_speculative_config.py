"""speculative_config: parsing, vLLM's defaults, and the ValueErrors for bad input."""
from __future__ import annotations

import pytest
import transformers
from conftest import TINY, TINY_MODELS

from nanovllm import LLM, BeamSearchParams, SamplingParams
from nanovllm.config import Config
from nanovllm.spec_decode.config import SpeculativeConfig


def config(path: str, spec: dict) -> SpeculativeConfig:
    return Config.from_engine_args(path, device="cpu", speculative_config=spec).speculative_config


def test_ngram_defaults_follow_vllm(tiny_model):
    path, _ = tiny_model("qwen3")
    spec = config(path, {"method": "ngram", "num_speculative_tokens": 3})
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max, spec.disable_by_batch_size) == (5, 5, 8)
    spec = config(path, {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (4, 4)
    spec = config(path, {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
                         "prompt_lookup_max": 5, "disable_by_batch_size": 16})
    assert (spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == (3, 2, 5)
    assert spec.disable_by_batch_size == 16


@pytest.mark.parametrize("spec, match", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "'eagle'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens.*0"),
    ({"method": "ngram", "num_speculative_tokens": 2.0}, "num_speculative_tokens.*2.0"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "'lookahead'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min=4"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size.*0"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a model path"),
])
def test_bad_config_is_value_error(tiny_model, spec, match):
    path, _ = tiny_model("qwen3")
    with pytest.raises(ValueError, match=match):
        LLM(path, device="cpu", skip_tokenizer_init=True, speculative_config=spec)


def test_draft_with_another_vocabulary(tiny_model, tmp_path):
    path, _ = tiny_model("qwen3")
    config_cls, _, overrides = TINY_MODELS["qwen3"]
    getattr(transformers, config_cls)(**{**TINY, **overrides, "vocab_size": 512}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=512.*384"):
        LLM(path, device="cpu", speculative_config={"method": "draft_model", "model": str(tmp_path),
                                                    "num_speculative_tokens": 2})


def test_draft_that_cannot_be_loaded(tiny_model, tmp_path):
    path, _ = tiny_model("qwen3")
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"draft model '{missing}' cannot be loaded"):
        LLM(path, device="cpu", speculative_config={"method": "draft_model", "model": missing,
                                                    "num_speculative_tokens": 2})
    config_cls, _, overrides = TINY_MODELS["qwen3"]
    getattr(transformers, config_cls)(**{**TINY, **overrides}).save_pretrained(tmp_path)  # a config, no weights
    with pytest.raises(ValueError, match="cannot be loaded"):
        LLM(path, device="cpu", speculative_config={"method": "draft_model", "model": str(tmp_path),
                                                    "num_speculative_tokens": 2})


def test_parallel_sampling_and_beam_search_are_refused(tiny_model):
    path, _ = tiny_model("qwen3")
    llm = LLM(path, device="cpu", skip_tokenizer_init=True, num_kvcache_blocks=32,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="n=2"):
        llm.generate([[1, 2, 3]], SamplingParams(n=2), use_tqdm=False)
    with pytest.raises(ValueError, match="beam search"):
        llm.beam_search([[1, 2, 3]], BeamSearchParams(beam_width=2, max_tokens=4), use_tqdm=False)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids
